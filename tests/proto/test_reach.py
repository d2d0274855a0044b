"""The reach field of records and the relay's circuit header: strict, bounded, fuzzed."""

from __future__ import annotations

import random

import pytest

from pymesh.proto import reach as rp
from pymesh.proto.bencode import encode
from pymesh.proto.identity import Identity
from pymesh.proto.reach import Reach, ReachError, RelayAddr
from pymesh.proto.records import RecordError, WorkerRecord

KEY = bytes(range(32))


def _reach() -> Reach:
    return Reach("punch", (RelayAddr(KEY, "10.77.0.11", 9100), RelayAddr(KEY[::-1], "10.77.0.12", 9100)),
                 ("10.77.0.100", 9200))


def test_round_trip_and_record_carries_it_only_when_present() -> None:
    r = _reach()
    assert Reach.from_wire_untrusted(_decoded(r.to_wire())) == r
    ident = Identity.generate()
    base = WorkerRecord(model_id="m@0123456789ab", start=0, stop=2, host="127.0.0.1", port=1)
    plain = base.signed(ident, timestamp=1.0)
    assert b"2:rc" not in plain.to_bytes()       # a direct worker's record is what it always was
    rec = WorkerRecord.from_bytes_untrusted(
        WorkerRecord(model_id="m@0123456789ab", start=0, stop=2, host="127.0.0.1", port=1, reach=r)
        .signed(ident).to_bytes())
    assert rec.reach == r and rec.verify()


def _decoded(wire: dict[bytes, object]) -> object:
    from pymesh.proto.bencode import decode_untrusted

    return decode_untrusted(encode(wire), max_size=1000, max_depth=4)


@pytest.mark.parametrize("bad", [
    {b"m": b"direct", b"r": [[KEY, b"1.2.3.4", 1]]},
    {b"m": b"relay", b"r": []},
    {b"m": b"relay", b"r": [[KEY, b"1.2.3.4", 1]] * 3},
    {b"m": b"relay", b"r": [[KEY[:31], b"1.2.3.4", 1]]},
    {b"m": b"relay", b"r": [[KEY, b"example.com", 1]]},
    {b"m": b"relay", b"r": [[KEY, b"1.2.3.4", 0]]},
    {b"m": b"relay", b"r": [[KEY, b"1.2.3.4", 70000]]},
    {b"m": b"punch", b"r": [[KEY, b"1.2.3.4", 1]]},                    # punch without its address
    {b"m": b"relay", b"r": [[KEY, b"1.2.3.4", 1]], b"x": 1},
    {b"m": b"punch", b"r": [[KEY, b"1.2.3.4", 1]], b"a": [b"1.2.3.4"]},
    [b"m"],
])
def test_malformed_reach_is_refused(bad: object) -> None:
    with pytest.raises(ReachError):
        Reach.from_wire_untrusted(bad)


def test_circuit_headers_round_trip_and_refuse_garbage() -> None:
    for req in (rp.CircuitRequest(rp.OP_CONNECT, target=KEY), rp.CircuitRequest(rp.OP_ACCEPT, circuit=b"c" * 16)):
        wire = rp.encode_request(req)
        n = rp.parse_request_length_untrusted(wire[:6])
        assert rp.parse_request_untrusted(wire[6:6 + n]) == req
    for head in (b"PMR2\x00\x01", b"PMR1\x00\x00", b"PMR1\xff\xff", b"PMR1\x00"):
        with pytest.raises(ReachError):
            rp.parse_request_length_untrusted(head)
    for body in (b"", b"d2:op1:xe", b"d2:op1:c1:t3:abce", b"d2:op1:a1:c1:xe", b"le", b"d2:op1:c" + b"x" * 200):
        with pytest.raises(ReachError):
            rp.parse_request_untrusted(body)
    assert rp.parse_status_head_untrusted(rp.encode_status(2, "no")[:3]) == (2, 2)
    with pytest.raises(ReachError):
        rp.parse_status_head_untrusted(b"\x00\xff\xff")


def test_fuzzed_reach_header_status_and_records_raise_only_their_error() -> None:
    rng = random.Random(16)
    ident = Identity.generate()
    seeds = [encode(_reach().to_wire()), rp.encode_request(rp.CircuitRequest(rp.OP_CONNECT, target=KEY)),
             rp.encode_status(0, "ok"),
             WorkerRecord(model_id="m@0123456789ab", start=0, stop=2, host="127.0.0.1", port=1, reach=_reach())
             .signed(ident).to_bytes()]
    for i in range(1500):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 6)):
            op = rng.random()
            pos = rng.randrange(len(data) + 1)
            if op < 0.4 and data:
                data[min(pos, len(data) - 1)] = rng.randrange(256)
            elif op < 0.7:
                data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            else:
                del data[pos:pos + rng.randint(1, 8)]
        raw = bytes(data)
        try:
            Reach.from_wire_untrusted(_decoded_or_none(raw))
        except ReachError:
            pass
        for fn in (rp.parse_request_untrusted, lambda b: rp.parse_request_length_untrusted(b[:6]),
                   lambda b: rp.parse_status_head_untrusted(b[:3])):
            try:
                fn(raw)
            except ReachError:
                pass
        try:
            WorkerRecord.from_bytes_untrusted(raw)
        except RecordError:
            pass


def _decoded_or_none(raw: bytes) -> object:
    from pymesh.proto.bencode import BencodeError, decode_untrusted

    try:
        return decode_untrusted(raw, max_size=1000, max_depth=4)
    except BencodeError:
        return None
