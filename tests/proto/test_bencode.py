"""Strict canonical bencode: round trips, canonical-form rejection, caps, fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymesh.proto.bencode import BencodeError, decode_untrusted, encode

values = st.recursive(
    st.integers(min_value=-(2**62), max_value=2**62) | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.binary(max_size=8), children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(values)
def test_round_trip(value: object) -> None:
    data = encode(value)
    assert decode_untrusted(data) == value
    assert encode(decode_untrusted(data)) == data  # canonical: re-encoding is byte-identical


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=200))
def test_fuzzed_decode_raises_only_bencode_error(data: bytes) -> None:
    try:
        decode_untrusted(data)
    except BencodeError:
        pass


@settings(max_examples=500, deadline=None)
@given(values, st.integers(min_value=0, max_value=400), st.integers(min_value=0, max_value=255))
def test_mutated_encodings_raise_only_bencode_error(value: object, pos: int, byte: int) -> None:
    data = bytearray(encode(value))
    if data:
        data[pos % len(data)] = byte
    try:
        out = decode_untrusted(bytes(data))
    except BencodeError:
        return
    assert encode(out) == bytes(data)  # whatever decodes is canonical


@pytest.mark.parametrize("data", [
    b"i01e", b"i-0e", b"ie", b"i-e", b"i1", b"03:abc", b"3:ab", b"d1:b0:1:a0:e", b"d1:a0:1:a0:e",
    b"di1e0:e", b"l", b"d", b"x", b"", b"i1ei2e", b"1:a1:b", b"-1:a",
])
def test_non_canonical_or_malformed_rejected(data: bytes) -> None:
    with pytest.raises(BencodeError):
        decode_untrusted(data)


def test_depth_cap() -> None:
    deep = b"l" * 40 + b"e" * 40
    with pytest.raises(BencodeError, match="nesting"):
        decode_untrusted(deep)
    assert decode_untrusted(b"l" * 10 + b"e" * 10, max_depth=10) is not None


def test_size_cap_checked_before_work() -> None:
    with pytest.raises(BencodeError, match="exceeds the cap"):
        decode_untrusted(b"0:" * 10, max_size=8)
    with pytest.raises(BencodeError):
        decode_untrusted(b"999999999:x")  # declared length runs past the end


def test_encode_sorts_keys_and_accepts_str() -> None:
    assert encode({"b": 1, b"a": "x"}) == b"d1:a1:x1:bi1ee"
    with pytest.raises(ValueError):
        encode({"a": 1, b"a": 2})
