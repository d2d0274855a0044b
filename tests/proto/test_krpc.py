"""KRPC message codec (BEP 5 envelope, BEP 44 signing input)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymesh.proto import krpc
from pymesh.proto.bencode import encode
from pymesh.proto.krpc import Contact, ErrorReply, KRPCError, Query, Response

NID = bytes(range(20))


def test_query_response_error_round_trip() -> None:
    q = krpc.decode_message_untrusted(krpc.encode_query(b"aa", b"find_node", {b"id": NID, b"target": NID[::-1]}))
    assert isinstance(q, Query) and q.method == b"find_node" and q.sender_id == NID and q.tid == b"aa"
    r = krpc.decode_message_untrusted(krpc.encode_response(b"aa", {b"id": NID}, seen=("1.2.3.4", 5)))
    assert isinstance(r, Response) and r.sender_id == NID and r.seen_ip == ("1.2.3.4", 5)
    e = krpc.decode_message_untrusted(krpc.encode_error(b"aa", 203, "bad"))
    assert isinstance(e, ErrorReply) and (e.code, e.message) == (203, "bad")


def test_bep5_example_ping() -> None:
    # The ping query of BEP 5, byte for byte.
    raw = b"d1:ad2:id20:abcdefghij0123456789e1:q4:ping1:t2:aa1:y1:qe"
    q = krpc.decode_message_untrusted(raw)
    assert isinstance(q, Query) and q.method == b"ping" and q.sender_id == b"abcdefghij0123456789"
    assert krpc.encode_query(b"aa", b"ping", {b"id": b"abcdefghij0123456789"}) == raw


def test_compact_nodes_round_trip() -> None:
    contacts = [Contact(bytes([i]) * 20, (f"10.0.0.{i}", 6881 + i)) for i in range(1, 9)]
    packed = krpc.pack_nodes(contacts)
    assert len(packed) == 8 * 26
    assert krpc.unpack_nodes_untrusted(packed) == contacts
    with pytest.raises(KRPCError):
        krpc.unpack_nodes_untrusted(packed[:-1])


@pytest.mark.parametrize("raw", [
    b"le", b"de", b"d1:t2:aa1:y1:xe", b"d1:t2:aa1:y1:qe", b"d1:ad2:id3:abce1:q4:ping1:t2:aa1:y1:qe",
    b"d1:t2:aa1:y1:re", b"d1:e1:x1:t2:aa1:y1:ee", b"x" * 2000,
])
def test_malformed_messages_rejected(raw: bytes) -> None:
    with pytest.raises(KRPCError):
        krpc.decode_message_untrusted(raw)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=300))
def test_fuzzed_datagrams_raise_only_krpc_error(data: bytes) -> None:
    try:
        krpc.decode_message_untrusted(data)
    except KRPCError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([b"id", b"target", b"info_hash", b"port", b"token", b"v", b"k",
                                        b"sig", b"seq", b"salt", b"cas"]),
                       st.binary(max_size=70) | st.integers(-5, 2**64) | st.lists(st.integers(), max_size=3)))
def test_fuzzed_put_arguments_raise_only_krpc_error(args: dict) -> None:  # type: ignore[type-arg]
    try:
        krpc.parse_put_untrusted(args)
    except KRPCError:
        pass


def test_bep44_signature_input() -> None:
    v_raw = encode(b"Hello World!")
    assert krpc.mutable_sign_input(v_raw, 1, b"foobar") == b"4:salt6:foobar3:seqi1e1:v12:Hello World!"
    assert krpc.mutable_sign_input(v_raw, 1) == b"3:seqi1e1:v12:Hello World!"


def test_put_limits() -> None:
    base = {b"token": b"t", b"k": b"k" * 32, b"sig": b"s" * 64, b"seq": 1}
    with pytest.raises(KRPCError) as big:
        krpc.parse_put_untrusted({**base, b"v": b"x" * 1000})
    assert big.value.code == krpc.MESSAGE_TOO_BIG
    with pytest.raises(KRPCError) as salt:
        krpc.parse_put_untrusted({**base, b"v": b"x", b"salt": b"s" * 65})
    assert salt.value.code == krpc.SALT_TOO_BIG
    p = krpc.parse_put_untrusted({**base, b"v": b"x" * 990})
    assert p.seq == 1 and len(p.v_raw) == 994
