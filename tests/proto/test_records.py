"""Signed worker records: round trip, forgery, another key, version mismatch, fuzzing."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymesh import PROTOCOL_VERSION
from pymesh.errors import VersionMismatch
from pymesh.proto.bencode import decode_untrusted, encode
from pymesh.proto.identity import Identity
from pymesh.proto.records import (MAX_BLOCK_MS, MAX_BLOCKS, MAX_CACHE_TOKENS, MAX_MODEL_NAME, MAX_RECORD_BYTES,
                                  MAX_SESSIONS, MAX_TOKENS_PER_S, SIGN_DOMAIN, RecordError, RecordVersionMismatch,
                                  WorkerRecord, is_valid_host, is_valid_model_id, sanitize_model_name)

ALICE = Identity.from_seed(b"a" * 32)
MALLORY = Identity.from_seed(b"m" * 32)


def sample(**kw: object) -> WorkerRecord:
    base = WorkerRecord(model_id="smollm2-135m@0123456789ab", start=0, stop=10, host="192.168.1.10",
                        port=9100, block_ms=1.2345, tokens_per_s=41.5, cache_tokens_free=8000,
                        cache_tokens_total=8192, sessions=2)
    return replace(base, **kw).signed(ALICE, timestamp=1_700_000_000.123)  # type: ignore[arg-type]


def test_round_trip_and_size() -> None:
    r = sample()
    raw = r.to_bytes()
    assert len(raw) < 400
    back = WorkerRecord.from_bytes_untrusted(raw)
    assert back == r and back.verify() and back.covers(9) and not back.covers(10)
    assert back.peer_id == ALICE.peer_id and back.version == PROTOCOL_VERSION


def test_tampered_field_fails_signature() -> None:
    d = decode_untrusted(sample().to_bytes())
    assert isinstance(d, dict)
    d[b"e"] = 30  # claim more blocks
    with pytest.raises(RecordError, match="signature"):
        WorkerRecord.from_bytes_untrusted(encode(d))


def test_record_signed_by_another_key_rejected() -> None:
    # Mallory copies Alice's record, keeps Alice's key in it but signs with her own key.
    forged = replace(sample(), signature=MALLORY.sign(b"pymesh-record\0" + b"anything"))
    with pytest.raises(RecordError, match="signature"):
        WorkerRecord.from_bytes_untrusted(forged.to_bytes())
    # Signing properly with her own key makes it *her* record, not Alice's.
    mine = sample().signed(MALLORY)
    assert WorkerRecord.from_bytes_untrusted(mine.to_bytes()).peer_id == MALLORY.peer_id


def test_version_mismatch_names_both_versions() -> None:
    r = sample(version=PROTOCOL_VERSION + 1)
    with pytest.raises(RecordVersionMismatch) as exc:
        WorkerRecord.from_bytes_untrusted(r.to_bytes())
    assert isinstance(exc.value, VersionMismatch) and isinstance(exc.value, RecordError)
    assert str(PROTOCOL_VERSION) in str(exc.value) and str(PROTOCOL_VERSION + 1) in str(exc.value)


def test_invalid_local_records_refused() -> None:
    with pytest.raises(ValueError):
        sample(start=5, stop=5)
    with pytest.raises(ValueError):
        sample(state="dancing")
    with pytest.raises(ValueError):
        sample(model_id="x" * 400)


def test_oversized_bytes_rejected_before_parsing() -> None:
    with pytest.raises(RecordError, match="exceeds"):
        WorkerRecord.from_bytes_untrusted(b"d" + b"0:" * MAX_RECORD_BYTES + b"e")


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 400), st.integers(0, 255))
def test_mutated_records_raise_only_record_error(pos: int, byte: int) -> None:
    raw = bytearray(sample().to_bytes())
    raw[pos % len(raw)] = byte
    try:
        r = WorkerRecord.from_bytes_untrusted(bytes(raw))
    except RecordError:
        return
    assert r.verify()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzzed_bytes_raise_only_record_error(data: bytes) -> None:
    try:
        WorkerRecord.from_bytes_untrusted(data)
    except RecordError:
        pass


# -- untrusted text and numbers (issue 11, item 8) -------------------------------------------

def forged(**fields: object) -> bytes:
    """A record validly signed by ALICE whose fields bypass ``signed()``'s local checks, as a
    hostile worker's own code would produce."""
    d: dict[bytes, object] = decode_untrusted(sample().to_bytes())  # type: ignore[assignment]
    del d[b"sig"]
    for k, v in fields.items():
        d[k.encode()] = v
    d[b"sig"] = ALICE.sign(SIGN_DOMAIN + encode(d))
    return encode(d)


def test_forged_helper_makes_a_valid_record() -> None:
    assert WorkerRecord.from_bytes_untrusted(forged()) == sample()


@pytest.mark.parametrize("fields", [
    {"m": b"[/]"}, {"m": b"[bold red]x[/]@1"}, {"m": b"m\x1b]0;pwned\x07@1"}, {"m": b"m\x1b[2J@1"},
    {"m": b"caf\xc3\xa9@1"}, {"m": b"a b@1"}, {"m": b"a/b@1"}, {"m": b"\xe2\x80\xaeevil@1"}, {"m": b""},
    {"h": b"[/]"}, {"h": b"host\x1b[31m"}, {"h": b"10.0.0.1\n"}, {"h": b""}, {"h": b"-bad.example"},
    {"h": b"fe80::1%[/]"}, {"h": b"a..b"}, {"h": b"x" * 64 + b".com"},
    {"t": [b"udp"]}, {"t": [b"quic\x1b"]}, {"t": []}, {"t": [b"[/]"]},
    {"e": 1 << 20}, {"e": MAX_BLOCKS + 1}, {"s": MAX_BLOCKS, "e": MAX_BLOCKS + 1}, {"s": 5, "e": 5},
    {"bm": -1}, {"tp": 10**13}, {"bm": 10**10}, {"cf": -5}, {"ct": 1 << 41}, {"n": 1 << 21}, {"p": 70000},
])
def test_markup_escapes_and_absurd_numbers_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(RecordError):
        WorkerRecord.from_bytes_untrusted(forged(**fields))


@pytest.mark.parametrize("fields", [
    {"m": b"HuggingFaceTB.SmolLM2-135M_v1:q8@0123456789ab"}, {"h": b"::1"}, {"h": b"worker-3.example.org"},
    {"t": [b"tcp"]}, {"s": 0, "e": MAX_BLOCKS}, {"tp": 0, "bm": 0},
])
def test_plain_values_are_accepted(fields: dict[str, object]) -> None:
    WorkerRecord.from_bytes_untrusted(forged(**fields))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40), st.binary(max_size=40), st.lists(st.binary(max_size=6), max_size=5))
def test_fuzzed_text_fields_parse_only_to_safe_values(model: bytes, host: bytes, transports: list[bytes]) -> None:
    try:
        r = WorkerRecord.from_bytes_untrusted(forged(m=model, h=host, t=transports))
    except RecordError:
        return
    assert is_valid_model_id(r.model_id) and is_valid_host(r.host)
    assert all(c.isascii() and c.isprintable() and c not in "[]" for c in r.model_id + r.host)
    assert r.transports and set(r.transports) <= {"quic", "tcp"}


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["s", "e", "p", "bm", "tp", "cf", "ct", "n", "ts"]),
                       st.integers(-(2**64), 2**64), max_size=4))
def test_fuzzed_numbers_parse_only_to_bounded_values(nums: dict[str, int]) -> None:
    try:
        r = WorkerRecord.from_bytes_untrusted(forged(**nums))
    except RecordError:
        return
    assert 0 <= r.start < r.stop <= MAX_BLOCKS and 0 <= r.port <= 65535
    for v in (r.block_ms, r.tokens_per_s, r.timestamp):
        assert math.isfinite(v) and v >= 0
    assert r.block_ms <= MAX_BLOCK_MS and r.tokens_per_s <= MAX_TOKENS_PER_S
    assert 0 <= r.cache_tokens_free <= MAX_CACHE_TOKENS and 0 <= r.sessions <= MAX_SESSIONS


def test_signing_applies_the_parser_rules() -> None:
    for bad in ({"model_id": "a[/]b"}, {"host": "x\x1b]8;;"}, {"transports": ("udp",)}, {"stop": MAX_BLOCKS + 1},
                {"block_ms": float("nan")}, {"tokens_per_s": float("inf")}, {"sessions": -1}):
        with pytest.raises(ValueError):
            sample(**bad)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_sanitize_model_name_always_gives_a_valid_name(name: str) -> None:
    out = sanitize_model_name(name)
    assert is_valid_model_id(out) and "@" not in out and len(out) <= MAX_MODEL_NAME
    assert is_valid_model_id(f"{out}@0123456789ab")
    assert sanitize_model_name(out) == out  # already clean names are kept as they are


def test_sanitize_model_name_examples() -> None:
    assert sanitize_model_name("SmolLM2-135M") == "SmolLM2-135M"
    assert sanitize_model_name("My Model [/]\x1b]0;x\x07") == "My-Model-0-x"
    assert sanitize_model_name("a@b") == "a-b"
    assert sanitize_model_name("...") == "model"


def test_fits_checks_the_span_against_the_model() -> None:
    assert sample(start=0, stop=10).fits(10) and not sample(start=0, stop=11).fits(10)
