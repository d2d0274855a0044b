"""Quantization in model ids and records (issue 15): the ``:q4_1`` suffix, lookups under the
base id, and the bounded ``wt`` field of mixed files, including hostile bytes in it."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymesh.proto.bencode import decode_untrusted, encode
from pymesh.proto.identity import Identity
from pymesh.proto.records import (MAX_RECORD_BYTES, MAX_TENSORS, MAX_WEIGHT_TYPES, QUANT_LABELS, SIGN_DOMAIN,
                                  WEIGHT_TYPES, RecordError, WorkerRecord, base_model_id, is_valid_model_id,
                                  model_target, split_model_id)

ALICE = Identity.from_seed(b"a" * 32)
BASE = "smollm2-135m@0123456789ab"


def sample(**kw: object) -> WorkerRecord:
    rec = WorkerRecord(model_id=f"{BASE}:q8_0", start=0, stop=10, host="10.0.0.1", port=9100,
                       weight_types=(("f32", 61), ("q8_0", 150)))
    return replace(rec, **kw).signed(ALICE, timestamp=1_700_000_000.0)  # type: ignore[arg-type]


def forged(**fields: object) -> bytes:
    d: dict[bytes, object] = decode_untrusted(sample().to_bytes())  # type: ignore[assignment]
    del d[b"sig"]
    for k, v in fields.items():
        if v is None:
            d.pop(k.encode(), None)
        else:
            d[k.encode()] = v
    d[b"sig"] = ALICE.sign(SIGN_DOMAIN + encode(d))
    return encode(d)


@pytest.mark.parametrize(("mid", "base", "quant"), [
    (f"{BASE}:q4_1", BASE, "q4_1"), (BASE, BASE, None), ("echo", "echo", None),
    ("HF.SmolLM2:v1@0123456789ab:q8_0", "HF.SmolLM2:v1@0123456789ab", "q8_0"),
    ("HF.SmolLM2:v1@0123456789ab", "HF.SmolLM2:v1@0123456789ab", None),
])
def test_split_model_id(mid: str, base: str, quant: str | None) -> None:
    assert split_model_id(mid) == (base, quant)
    assert base_model_id(mid) == base
    assert is_valid_model_id(mid)


@pytest.mark.parametrize("mid", [f"{BASE}:q9_9", f"{BASE}:", f"{BASE}:Q8_0", f"{BASE}:q8_0:q4_0", "a@b@c",
                                 f"{BASE}:f32"])
def test_unknown_suffixes_are_invalid(mid: str) -> None:
    assert not is_valid_model_id(mid)
    with pytest.raises(RecordError):
        WorkerRecord.from_bytes_untrusted(forged(m=mid.encode()))
    with pytest.raises(ValueError):
        sample(model_id=mid)


def test_every_quantization_shares_the_base_target() -> None:
    assert {model_target(f"{BASE}:{q}") for q in QUANT_LABELS} == {model_target(BASE)}
    assert model_target("other@0123456789ab") != model_target(BASE)


def test_round_trip_with_suffix_and_weight_types() -> None:
    rec = sample()
    back = WorkerRecord.from_bytes_untrusted(rec.to_bytes())
    assert back == rec and back.quant == "q8_0" and back.base_id == BASE
    assert back.weight_types == (("f32", 61), ("q8_0", 150))


def test_float_record_has_no_wt_field() -> None:
    rec = sample(model_id=BASE, weight_types=())
    assert b"wt" not in decode_untrusted(rec.to_bytes())  # type: ignore[operator]
    assert WorkerRecord.from_bytes_untrusted(rec.to_bytes()).quant is None


def test_largest_weight_types_field_fits_a_record() -> None:
    long_types = tuple((t, MAX_TENSORS) for t in sorted(WEIGHT_TYPES, key=len)[-MAX_WEIGHT_TYPES:])
    rec = sample(model_id="m" * 96 + "@0123456789ab:q4_1", weight_types=long_types,
                 host="a" * 63 + ".example.org")
    assert len(rec.to_bytes()) <= MAX_RECORD_BYTES
    assert WorkerRecord.from_bytes_untrusted(rec.to_bytes()) == rec


@pytest.mark.parametrize("wt", [
    {}, [], b"q8_0", 5, {b"q9_0": 1}, {b"[/]": 1}, {b"q8_0\x1b": 1}, {b"q8_0": 0}, {b"q8_0": -1},
    {b"q8_0": MAX_TENSORS + 1}, {b"q8_0": b"1"}, {b"q8_0": [1]}, {b"q8_0": {b"x": 1}},
    {t.encode(): 1 for t in WEIGHT_TYPES[:MAX_WEIGHT_TYPES + 1]},
])
def test_junk_weight_types_are_refused(wt: object) -> None:
    with pytest.raises(RecordError):
        WorkerRecord.from_bytes_untrusted(forged(wt=wt))


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.dictionaries(st.one_of(st.sampled_from([t.encode() for t in WEIGHT_TYPES]), st.binary(max_size=8)),
                    st.one_of(st.integers(-(2**40), 2**40), st.binary(max_size=4)), max_size=12),
    st.lists(st.binary(max_size=4), max_size=3), st.integers(), st.binary(max_size=8)))
def test_fuzzed_weight_types_raise_only_record_error(wt: object) -> None:
    try:
        r = WorkerRecord.from_bytes_untrusted(forged(wt=wt))
    except RecordError:
        return
    assert 0 < len(r.weight_types) <= MAX_WEIGHT_TYPES
    assert all(n in WEIGHT_TYPES and 0 < c <= MAX_TENSORS for n, c in r.weight_types)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=60))
def test_fuzzed_model_ids_parse_only_to_known_suffixes(model: bytes) -> None:
    try:
        r = WorkerRecord.from_bytes_untrusted(forged(m=model))
    except RecordError:
        return
    assert r.quant is None or r.quant in QUANT_LABELS
    assert r.model_id.count("@") <= 1
