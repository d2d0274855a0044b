"""Signed worker records: round trip, forgery, another key, version mismatch, fuzzing."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymesh import PROTOCOL_VERSION
from pymesh.errors import VersionMismatch
from pymesh.proto.bencode import decode_untrusted, encode
from pymesh.proto.identity import Identity
from pymesh.proto.records import MAX_RECORD_BYTES, RecordError, RecordVersionMismatch, WorkerRecord

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
