"""Fair record storage: one source (IP or signer key) cannot evict others' records."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from pymesh.proto.storage import RecordStore, StoredRecord

NOW = 1000.0


def tgt(name: str) -> bytes:
    return hashlib.sha1(name.encode()).digest()


def key(i: int) -> bytes:
    return i.to_bytes(32, "big")


def rec(source: str, ts: float = NOW, exp: float = NOW + 300) -> StoredRecord:
    return StoredRecord(b"r" * 40, ts, exp, 0, 4, source)


def check_invariants(rs: RecordStore) -> None:
    """Caps hold and the per-source / per-signer indexes agree with the records."""
    recs = [(t, s, r) for t, m in rs._targets.items() for s, r in m.items()]
    assert len(recs) == len(rs) <= rs.max_records
    assert len(rs._targets) <= rs.max_targets
    assert all(0 < len(m) <= rs.max_per_target for m in rs._targets.values())
    by_source: dict[str, set[tuple[bytes, bytes]]] = {}
    by_signer: dict[bytes, set[bytes]] = {}
    for t, s, r in recs:
        by_source.setdefault(r.source, set()).add((t, s))
        by_signer.setdefault(s, set()).add(t)
    assert {k: set(v) for k, v in rs._by_source.items()} == by_source
    assert {k: set(v) for k, v in rs._by_signer.items()} == by_signer
    assert all(len(v) <= rs.max_per_source for v in by_source.values())
    assert all(len(v) <= rs.max_targets_per_signer for v in by_signer.values())


def test_one_key_flooding_new_targets_only_displaces_its_own_records() -> None:
    rs = RecordStore(max_targets=64)
    real = tgt("real-model")
    for w in range(2):
        assert rs.put(real, key(w), rec("10.0.0.1"), NOW)
    for i in range(600):  # the e2e flood: one key, one IP, hundreds of made-up models
        rs.put(tgt(f"junk{i}"), key(99), rec("10.0.0.66"), NOW)
    assert rs.count(real) == 2
    assert len(rs._by_signer[key(99)]) == rs.max_targets_per_signer
    # the flooder keeps its most recent targets, not its first ones
    assert rs.count(tgt("junk599")) == 1 and rs.count(tgt("junk0")) == 0
    check_invariants(rs)


def test_one_ip_with_many_keys_is_held_to_its_source_quota() -> None:
    rs = RecordStore(max_targets=512, max_per_source=32)
    real = tgt("real-model")
    assert rs.put(real, key(1), rec("10.0.0.1"), NOW)
    for i in range(1000):
        rs.put(tgt(f"junk{i}"), key(1000 + i), rec("10.0.0.66"), NOW)
    assert rs.count(real) == 1
    assert rs.source_count("10.0.0.66") == 32
    check_invariants(rs)


def test_full_target_table_takes_room_from_the_heaviest_source() -> None:
    rs = RecordStore(max_targets=40, max_per_source=30)
    honest = [tgt(f"model{i}") for i in range(5)]
    for i, t in enumerate(honest):
        assert rs.put(t, key(i), rec("10.0.0.1"), NOW)
    for ip in ("10.0.0.66", "10.0.0.77"):  # two flooding addresses fill the target table
        for i in range(200):
            rs.put(tgt(f"{ip}-{i}"), key((1 if ip.endswith("66") else 2) * 100_000 + i), rec(ip), NOW)
    assert all(rs.count(t) == 1 for t in honest)
    assert len(rs._targets) == 40 and rs.evicted > 0
    check_invariants(rs)


def test_a_target_full_of_one_sources_records_keeps_the_others() -> None:
    rs = RecordStore(max_per_target=10, max_per_source=100)
    t = tgt("popular")
    for i in range(3):
        assert rs.put(t, key(i), rec(f"10.0.1.{i}"), NOW)
    for i in range(50):
        rs.put(t, key(100 + i), rec("10.0.0.66"), NOW)
    kept = {s for s in rs._targets[t] if rs._targets[t][s].source != "10.0.0.66"}
    assert kept == {key(0), key(1), key(2)}
    assert rs.count(t) == 10
    check_invariants(rs)


def test_refused_when_no_target_can_be_freed() -> None:
    rs = RecordStore(max_targets=2)
    for name in ("a", "b"):  # every target shared by two sources: nothing is a safe victim
        rs.put(tgt(name), key(1), rec("10.0.0.1"), NOW)
        rs.put(tgt(name), key(2), rec("10.0.0.2"), NOW)
    assert not rs.put(tgt("c"), key(3), rec("10.0.0.3"), NOW)
    assert rs.refused == 1 and len(rs) == 4
    check_invariants(rs)


def test_refresh_keeps_a_record_and_expired_ones_free_quota() -> None:
    rs = RecordStore(max_per_source=3)
    for i in range(3):
        assert rs.put(tgt(f"m{i}"), key(i), rec("10.0.0.1", exp=NOW + 10), NOW)
    assert not rs.put(tgt("m0"), key(0), rec("10.0.0.1", ts=NOW - 1), NOW)  # older: refused
    assert rs.put(tgt("m0"), key(0), rec("10.0.0.1", ts=NOW + 1, exp=NOW + 10), NOW + 1)
    # m0 was refreshed last, so the quota displaces m1 (least recently stored) first
    assert rs.put(tgt("m3"), key(3), rec("10.0.0.1"), NOW + 2)
    assert rs.count(tgt("m0")) == 1 and rs.count(tgt("m1")) == 0
    # after the TTL the old ones are swept, so the source has room again without evicting
    before = rs.evicted
    assert rs.put(tgt("m4"), key(4), rec("10.0.0.1"), NOW + 20)
    assert rs.evicted == before and rs.source_count("10.0.0.1") == 2
    check_invariants(rs)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 30), st.integers(0, 5), st.integers(0, 30)),
                max_size=300))
def test_flood_from_one_ip_never_evicts_another_sources_records(ops: list[tuple[int, int, int, int]]) -> None:
    rs = RecordStore(max_targets=24, max_per_target=6, max_records=40, max_per_source=12,
                     max_targets_per_signer=4)
    honest = {(tgt(f"h{i}"), key(500 + i)) for i in range(3)}
    for t, s in honest:
        assert rs.put(t, s, rec("10.0.0.1"), NOW)
    for t_i, k_i, _src, dt in ops:
        rs.put(tgt(f"x{t_i}"), key(k_i), rec("10.0.0.66", ts=NOW + dt), NOW + dt / 100)
        check_invariants(rs)
    assert all(s in rs._targets.get(t, {}) for t, s in honest)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 30), st.integers(0, 5), st.integers(0, 900)),
                max_size=300))
def test_caps_and_indexes_hold_for_any_sequence(ops: list[tuple[int, int, int, int]]) -> None:
    rs = RecordStore(max_targets=16, max_per_target=5, max_records=30, max_per_source=10,
                     max_targets_per_signer=3)
    for t_i, k_i, src, dt in ops:
        rs.put(tgt(f"x{t_i}"), key(k_i), rec(f"10.0.0.{src}", ts=NOW + dt, exp=NOW + dt + 300), NOW + dt)
        check_invariants(rs)
