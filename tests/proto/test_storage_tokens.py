"""Tokens (IP- and target-bound, rotating) and the stores' expiry, caps and paging."""

from __future__ import annotations

from pymesh.proto import krpc
from pymesh.proto.storage import ItemStore, PeerStore, RecordStore, StoredRecord
from pymesh.proto.tokens import TokenManager

T1, T2 = b"\x01" * 20, b"\x02" * 20


def test_token_bound_to_ip_and_target() -> None:
    tm = TokenManager(now=0.0, rotate_every=300)
    tok = tm.issue("10.0.0.1", T1, 0.0)
    assert tm.check(tok, "10.0.0.1", T1, 1.0)
    assert not tm.check(tok, "10.0.0.2", T1, 1.0)
    assert not tm.check(tok, "10.0.0.1", T2, 1.0)  # a token for one target is not good for another


def test_token_survives_one_rotation_not_two() -> None:
    tm = TokenManager(now=0.0, rotate_every=300)
    tok = tm.issue("10.0.0.1", T1, 0.0)
    assert tm.check(tok, "10.0.0.1", T1, 350.0)
    assert not tm.check(tok, "10.0.0.1", T1, 700.0)


def test_peer_store_expiry_and_caps() -> None:
    ps = PeerStore(ttl=10, max_hashes=2, max_peers=3)
    for port in range(1, 6):
        ps.add(T1, ("10.0.0.1", port), 0.0)
    assert len(ps.get(T1, 1.0)) == 3
    assert ps.get(T1, 11.0) == []
    ps.add(T1, ("10.0.0.1", 1), 20.0)
    ps.add(T2, ("10.0.0.1", 1), 20.0)
    ps.add(b"\x03" * 20, ("10.0.0.1", 1), 20.0)
    assert ps.get(T1, 21.0) == []  # least recently used hash dropped


def test_item_store_seq_and_cas() -> None:
    st = ItemStore(ttl=100)
    key = b"k" * 32
    assert st.put_mutable(key, b"", 5, b"s" * 64, b"1:a", None, 0.0) is None
    err = st.put_mutable(key, b"", 4, b"s" * 64, b"1:b", None, 0.0)
    assert err is not None and err[0] == krpc.SEQ_TOO_OLD
    err = st.put_mutable(key, b"", 6, b"s" * 64, b"1:b", 3, 0.0)
    assert err is not None and err[0] == krpc.CAS_MISMATCH
    assert st.put_mutable(key, b"", 6, b"s" * 64, b"1:b", 5, 0.0) is None
    t = st.put_immutable(b"1:x", 0.0)
    assert st.get(t, 50.0) is not None and st.get(t, 150.0) is None


def rec(raw: bytes, ts: float, exp: float, start: int = 0, stop: int = 4) -> StoredRecord:
    return StoredRecord(raw, ts, exp, start, stop)


def test_record_store_newest_wins_and_expiry() -> None:
    rs = RecordStore()
    assert rs.put(T1, b"A" * 32, rec(b"new", 10.0, 100.0), 0.0)
    assert not rs.put(T1, b"A" * 32, rec(b"old", 5.0, 100.0), 0.0)
    assert rs.page(T1, 1.0)[0] == [b"new"]
    assert rs.page(T1, 101.0) == ([], None)


def test_record_store_pages_within_budget_and_filters_blocks() -> None:
    rs = RecordStore()
    for i in range(10):
        rs.put(T1, bytes([i]) * 32, rec(bytes([65 + i]) * 250, 1.0, 100.0, start=i, stop=i + 2), 0.0)
    seen: list[bytes] = []
    after = b""
    pages = 0
    while True:
        page, nxt = rs.page(T1, 1.0, after=after, budget=950)
        assert sum(len(r) for r in page) <= 950
        seen += page
        pages += 1
        if nxt is None:
            break
        after = nxt
    assert len(seen) == 10 and len(set(seen)) == 10 and pages == 4
    only5, _ = rs.page(T1, 1.0, block=5, budget=10_000)
    assert [r[0] for r in only5] == [65 + 4, 65 + 5]
