"""DHTCore answering real encoded KRPC queries (BEP 5, BEP 44, pm_put/pm_get)."""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymesh import PROTOCOL_VERSION
from pymesh.proto import krpc
from pymesh.proto.bencode import encode
from pymesh.proto.dht_core import AMPLIFICATION, CLIENT_VERSION, DHTCore, padded_read_args
from pymesh.proto.identity import Identity
from pymesh.proto.krpc import ErrorReply, Response
from pymesh.proto.records import ALL_TARGET, WorkerRecord, model_target

NOW = 1_700_000_000.0
SRC = ("10.0.0.9", 4000)
ME = b"\x11" * 20
ALICE = Identity.from_seed(b"a" * 32)
BOB = Identity.from_seed(b"b" * 32)


@pytest.fixture
def core() -> DHTCore:
    return DHTCore(b"\x55" * 20, now=NOW, record_ttl=60, rng=random.Random(1))


def ask(core: DHTCore, method: bytes, args: dict[bytes, object], src: tuple[str, int] = SRC) -> Response | ErrorReply:
    data = krpc.encode_query(b"tx", method, {b"id": ME, **args})
    inc = core.receive(data, src, NOW)
    assert inc.reply is not None
    msg = krpc.decode_message_untrusted(inc.reply)
    assert isinstance(msg, (Response, ErrorReply)) and msg.tid == b"tx"
    return msg


def ok(msg: Response | ErrorReply) -> dict:  # type: ignore[type-arg]
    assert isinstance(msg, Response), msg
    return msg.values


def err(msg: Response | ErrorReply) -> int:
    assert isinstance(msg, ErrorReply), msg
    return msg.code


def test_ping_find_node_and_querier_added(core: DHTCore) -> None:
    assert ok(ask(core, b"ping", {}))[b"id"] == core.node_id
    assert core.routing.get(ME) is not None
    nodes = krpc.unpack_nodes_untrusted(ok(ask(core, b"find_node", {b"target": b"\x00" * 20}))[b"nodes"])
    assert [n.node_id for n in nodes] == [ME]


def test_protocol_errors(core: DHTCore) -> None:
    assert err(ask(core, b"find_node", {b"target": b"short"})) == krpc.PROTOCOL_ERROR
    assert err(ask(core, b"frobnicate", {})) == krpc.METHOD_UNKNOWN
    inc = core.receive(b"d1:t2:zz1:y1:q1:q4:ping1:ad2:id3:abcee", SRC, NOW)  # unsorted keys
    assert inc.reply is not None and err(krpc.decode_message_untrusted(inc.reply)) == krpc.PROTOCOL_ERROR
    assert core.receive(b"\xff" * 50, SRC, NOW).reply is None  # no tid: silently dropped


def test_get_peers_announce_with_token(core: DHTCore) -> None:
    ih = b"\x22" * 20
    r = ok(ask(core, b"get_peers", {b"info_hash": ih}))
    token = r[b"token"]
    assert b"values" not in r
    assert err(ask(core, b"announce_peer", {b"info_hash": ih, b"port": 6000, b"token": b"bad"})) == 203
    other = b"\x23" * 20  # a token for one info_hash is refused for another
    assert err(ask(core, b"announce_peer", {b"info_hash": other, b"port": 6000, b"token": token})) == 203
    assert err(ask(core, b"announce_peer", {b"info_hash": ih, b"port": 6000, b"token": token},
                   src=("10.0.0.8", 4000))) == 203
    ok(ask(core, b"announce_peer", {b"info_hash": ih, b"port": 6000, b"token": token}))
    ok(ask(core, b"announce_peer", {b"info_hash": ih, b"port": 1, b"implied_port": 1, b"token": token}))
    values = krpc.reply_peers_untrusted(ok(ask(core, b"get_peers", {b"info_hash": ih})))
    assert sorted(values) == [("10.0.0.9", 4000), ("10.0.0.9", 6000)]


def test_bep44_immutable(core: DHTCore) -> None:
    v = b"Hello World!"
    target = hashlib.sha1(encode(v)).digest()
    token = ok(ask(core, b"get", {b"target": target}))[b"token"]
    ok(ask(core, b"put", {b"v": v, b"token": token}))
    assert ok(ask(core, b"get", {b"target": target}))[b"v"] == v
    assert err(ask(core, b"put", {b"v": b"x" * 1001, b"token": token})) == krpc.MESSAGE_TOO_BIG


def put_mutable(core: DHTCore, ident: Identity, v: object, seq: int, salt: bytes = b"",
                cas: int | None = None, sig: bytes | None = None) -> Response | ErrorReply:
    target = hashlib.sha1(ident.public_key + salt).digest()
    token = ok(ask(core, b"get", {b"target": target}))[b"token"]
    args: dict[bytes, object] = {b"v": v, b"k": ident.public_key, b"seq": seq, b"token": token,
                                 b"sig": sig or ident.sign(krpc.mutable_sign_input(encode(v), seq, salt))}
    if salt:
        args[b"salt"] = salt
    if cas is not None:
        args[b"cas"] = cas
    return ask(core, b"put", args)


def test_bep44_mutable_seq_cas_signature(core: DHTCore) -> None:
    ok(put_mutable(core, ALICE, b"Hello World!", 1, b"foobar"))
    target = hashlib.sha1(ALICE.public_key + b"foobar").digest()
    r = ok(ask(core, b"get", {b"target": target}))
    assert r[b"v"] == b"Hello World!" and r[b"seq"] == 1 and r[b"k"] == ALICE.public_key
    assert b"v" not in ok(ask(core, b"get", {b"target": target, b"seq": 1}))  # nothing newer
    assert err(put_mutable(core, ALICE, b"older", 0, b"foobar")) == krpc.SEQ_TOO_OLD
    assert err(put_mutable(core, ALICE, b"cas", 5, b"foobar", cas=4)) == krpc.CAS_MISMATCH
    ok(put_mutable(core, ALICE, b"cas", 5, b"foobar", cas=1))
    assert err(put_mutable(core, ALICE, b"x", 9, b"foobar", sig=BOB.sign(b"x"))) == krpc.INVALID_SIGNATURE
    assert err(put_mutable(core, ALICE, b"x", 9, b"s" * 65)) == krpc.SALT_TOO_BIG


def record(ident: Identity, ts: float = NOW, **kw: object) -> WorkerRecord:
    base = WorkerRecord(model_id="m@1", start=0, stop=8, host="10.0.0.9", port=9100)
    return replace(base, **kw).signed(ident, timestamp=ts)  # type: ignore[arg-type]


def pm_put(core: DHTCore, raw: bytes, target: bytes | None = None) -> Response | ErrorReply:
    target = target or model_target("m@1")
    token = ok(ask(core, b"pm_get", {b"target": target}))[b"token"]
    return ask(core, b"pm_put", {b"target": target, b"rec": raw, b"token": token})


def stored(core: DHTCore, target: bytes | None = None) -> list[WorkerRecord]:
    target = target or model_target("m@1")
    token = ok(ask(core, b"pm_get", {b"target": target}))[b"token"]
    r = ok(ask(core, b"pm_get", {b"target": target, b"token": token}))
    return [WorkerRecord.from_bytes_untrusted(x) for x in r[b"recs"]]


def test_pm_put_get_and_newest_wins(core: DHTCore) -> None:
    a1 = record(ALICE)
    assert ok(pm_put(core, a1.to_bytes()))[b"stored"] == 1
    ok(pm_put(core, a1.to_bytes(), ALL_TARGET))
    assert stored(core) == [a1] and stored(core, ALL_TARGET) == [a1]
    older = replace(a1, state="offline").signed(ALICE, timestamp=NOW - 5)
    assert ok(pm_put(core, older.to_bytes()))[b"stored"] == 0
    newer = replace(a1, state="offline").signed(ALICE, timestamp=NOW + 1)
    assert ok(pm_put(core, newer.to_bytes()))[b"stored"] == 1
    assert [r.state for r in stored(core)] == ["offline"]


def test_pm_put_refuses_forgeries_and_other_versions(core: DHTCore) -> None:
    a1 = record(ALICE)
    # Bob rewrites Alice's record (her key inside) with his own signature: refused.
    forged = replace(a1, stop=30, signature=BOB.sign(b"pymesh-record\0" + b"x"))
    assert err(pm_put(core, forged.to_bytes())) == krpc.INVALID_SIGNATURE
    assert err(pm_put(core, replace(a1, port=1).to_bytes())) == krpc.INVALID_SIGNATURE
    v2 = record(ALICE, version=PROTOCOL_VERSION + 1)
    msg = pm_put(core, v2.to_bytes())
    assert err(msg) == krpc.PROTOCOL_ERROR and isinstance(msg, ErrorReply)
    assert f"version {PROTOCOL_VERSION}" in msg.message and f"{PROTOCOL_VERSION + 1}" in msg.message
    assert err(pm_put(core, a1.to_bytes(), target=b"\x00" * 20)) == krpc.PROTOCOL_ERROR
    stale = record(ALICE, ts=NOW - 3600)
    assert err(pm_put(core, stale.to_bytes())) == krpc.PROTOCOL_ERROR
    assert stored(core) == []
    # Bob's own record sits beside Alice's and cannot replace it.
    ok(pm_put(core, a1.to_bytes()))
    ok(pm_put(core, record(BOB, start=8, stop=16).to_bytes()))
    assert {r.peer_id for r in stored(core)} == {ALICE.peer_id, BOB.peer_id}


def test_pm_get_pages_fit_in_a_datagram_and_cover_everything(core: DHTCore) -> None:
    idents = [Identity.from_seed(bytes([i]) * 32) for i in range(25)]
    for i, ident in enumerate(idents):
        ok(pm_put(core, record(ident, start=i, stop=i + 1).to_bytes()))
    seen: set[bytes] = set()
    after = b""
    token = ok(ask(core, b"pm_get", {b"target": model_target("m@1")}))[b"token"]
    while True:
        args: dict[bytes, object] = {b"target": model_target("m@1"), b"token": token}
        if after:
            args[b"after"] = after
        data = krpc.encode_query(b"tx", b"pm_get", {b"id": ME, **args})
        inc = core.receive(data, SRC, NOW)
        assert inc.reply is not None and len(inc.reply) <= krpc.SAFE_PAYLOAD
        r = ok(krpc.decode_message_untrusted(inc.reply))  # type: ignore[arg-type]
        seen |= {WorkerRecord.from_bytes_untrusted(x).peer_id.key for x in r[b"recs"]}
        if b"next" not in r:
            break
        after = r[b"next"]
    assert len(seen) == 25
    one = ok(ask(core, b"pm_get", {b"target": model_target("m@1"), b"b": 7, b"token": token}))[b"recs"]
    assert [WorkerRecord.from_bytes_untrusted(x).start for x in one] == [7]


def pm_get_from(core: DHTCore, src: tuple[str, int], args: dict[bytes, object]) -> tuple[int, int, dict]:  # type: ignore[type-arg]
    """(query bytes, reply bytes, reply values) of one pm_get from ``src``."""
    data = krpc.encode_query(b"tx", b"pm_get", {b"id": ME, **args})
    inc = core.receive(data, src, NOW)
    assert inc.reply is not None
    return len(data), len(inc.reply), ok(krpc.decode_message_untrusted(inc.reply))  # type: ignore[arg-type]


def test_unverified_pm_get_reply_is_bounded_by_its_query(core: DHTCore) -> None:
    """Reflection: a pm_get whose source never showed it receives (no valid token) gets at
    most AMPLIFICATION x its size beyond what any BEP 5 node answers (id, token, nodes);
    a padded query gets a page, a query with the token a full page. Before the cap a
    75-byte query drew a ~1,300-byte reply (17x)."""
    for i in range(8):  # a full "nodes" field, as a real node answers
        core.routing.heard_from(krpc.Contact(bytes([0x56, i]) * 10, (f"10.1.0.{i}", 6881)), NOW, responded=True)
    for i, ident in enumerate(Identity.from_seed(bytes([i]) * 32) for i in range(25)):
        ok(pm_put(core, record(ident, start=i, stop=i + 1).to_bytes()))
    target = model_target("m@1")
    victim = ("10.66.0.1", 53)
    q, r, values = pm_get_from(core, victim, {b"target": target})
    bare = len(krpc.encode_response(b"tx", {b"id": values[b"id"], b"token": values[b"token"],
                                            b"nodes": values[b"nodes"], b"recs": [], b"next": b""},
                                    seen=victim, client=CLIENT_VERSION))
    assert values[b"recs"] == [] and values[b"next"] == b""  # come back with the token
    assert r <= max(AMPLIFICATION * q, bare)
    for args in ({b"target": target, b"pad": bytes(150)}, padded_read_args(ME, {b"target": target}),
                 {b"target": target, b"b": 3, b"pad": bytes(1000)}):
        q, r, values = pm_get_from(core, victim, args)
        assert r <= max(AMPLIFICATION * q, bare) and r <= krpc.SAFE_PAYLOAD, (q, r)
    _, _, padded = pm_get_from(core, victim, padded_read_args(ME, {b"target": target}))
    assert len(padded[b"recs"]) >= 3 and b"next" in padded  # a full first page for a padded lookup query
    token = ok(ask(core, b"pm_get", {b"target": target}))[b"token"]
    _, r, full = pm_get_from(core, SRC, {b"target": target, b"token": token})
    assert len(full[b"recs"]) >= 3 and r <= krpc.SAFE_PAYLOAD
    # the victim's token does not verify another address
    _, _, other = pm_get_from(core, ("10.66.0.2", 53), {b"target": target, b"token": padded[b"token"]})
    assert other[b"recs"] == []


def test_records_expire_after_ttl(core: DHTCore) -> None:
    ok(pm_put(core, record(ALICE).to_bytes()))
    data = krpc.encode_query(b"tx", b"pm_get", {b"id": ME, b"target": model_target("m@1")})
    inc = core.receive(data, SRC, NOW + 61)
    assert inc.reply is not None
    assert ok(krpc.decode_message_untrusted(inc.reply))[b"recs"] == []  # type: ignore[arg-type]


QUERIES = [
    krpc.encode_query(b"q1", b"ping", {b"id": ME}),
    krpc.encode_query(b"q2", b"get_peers", {b"id": ME, b"info_hash": b"\x22" * 20}),
    krpc.encode_query(b"q3", b"announce_peer", {b"id": ME, b"info_hash": b"\x22" * 20, b"port": 1, b"token": b"t"}),
    krpc.encode_query(b"q4", b"put", {b"id": ME, b"v": b"x", b"k": b"k" * 32, b"sig": b"s" * 64, b"seq": 1,
                                      b"token": b"t"}),
    krpc.encode_query(b"q5", b"pm_get", {b"id": ME, b"target": b"\x01" * 20, b"b": 2, b"after": b"a"}),
    krpc.encode_query(b"q6", b"pm_put", {b"id": ME, b"target": b"\x01" * 20, b"rec": b"d1:ai1ee", b"token": b"t"}),
]


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(QUERIES), st.integers(0, 300), st.integers(0, 255), st.binary(max_size=100))
def test_core_never_raises_on_hostile_datagrams(q: bytes, pos: int, byte: int, junk: bytes) -> None:
    core = DHTCore(b"\x55" * 20, now=NOW, rng=random.Random(2))
    mutated = bytearray(q)
    mutated[pos % len(mutated)] = byte
    for data in (bytes(mutated), junk, q[: pos % len(q)], q + junk):
        inc = core.receive(data, SRC, NOW)
        if inc.reply is not None:
            krpc.decode_message_untrusted(inc.reply)  # whatever we send back is valid KRPC
