"""Signed step receipts: round trip, signature binding, canonical form, capped fuzzed parser."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymesh.proto.frames import TensorBlob
from pymesh.proto.identity import Identity
from pymesh.proto.receipts import (MAX_RECEIPT_BYTES, Receipt, ReceiptError, SignedReceipt, conflicting,
                                   sign_receipt, tensor_digest)

ME = Identity.from_seed(b"\x05" * 32)
OTHER = Identity.from_seed(b"\x06" * 32)


def receipt(**kw: object) -> Receipt:
    base: dict[str, object] = dict(peer=ME.peer_id, model="m@abc", sid=b"s" * 16, step=3, pos=9, seq=1, start=0,
                                   stop=4, dtype="float32", device="cpu", inp=b"i" * 32, out=b"o" * 32, prev=b"")
    base.update(kw)
    return Receipt(**base)  # type: ignore[arg-type]


def test_round_trip_and_binding_to_the_signer() -> None:
    s = sign_receipt(ME, receipt())
    back = SignedReceipt.from_wire_untrusted(s.wire)
    assert back.receipt == s.receipt and back.digest == s.digest
    with pytest.raises(ValueError):
        sign_receipt(OTHER, receipt())           # a receipt names its signer
    forged = SignedReceipt(receipt(), receipt().encode(), OTHER.sign(b"pymesh-receipt-v1\0" + receipt().encode()))
    with pytest.raises(ReceiptError, match="does not verify"):
        SignedReceipt.from_wire_untrusted(forged.wire)


@settings(max_examples=200)
@given(model=st.text(min_size=1, max_size=200), sid=st.binary(min_size=1, max_size=64),
       ints=st.tuples(*[st.integers(0, 1 << 40)] * 5), seq=st.integers(1, 1 << 40),
       prev=st.sampled_from([b"", b"p" * 32]), dtype=st.sampled_from(["float32", "bfloat16"]))
def test_the_written_out_body_is_the_generic_canonical_encoding(model: str, sid: bytes,
                                                               ints: tuple[int, int, int, int, int], seq: int,
                                                               prev: bytes, dtype: str) -> None:
    from pymesh.proto.bencode import encode

    step, pos, start, stop, _ = ints
    r = receipt(model=model, sid=sid, step=step, pos=pos, seq=seq, start=start, stop=stop, prev=prev, dtype=dtype)
    assert r.encode() == encode({"v": 1, "peer": r.peer.key, "model": r.model.encode(), "sid": r.sid,
                                 "step": r.step, "pos": r.pos, "seq": r.seq, "start": r.start, "stop": r.stop,
                                 "dt": r.dtype.encode(), "dev": r.device.encode(), "in": r.inp, "out": r.out,
                                 "prev": r.prev})


def test_every_field_is_signed() -> None:
    s = sign_receipt(ME, receipt())
    for field, value in (("out", b"x" * 32), ("step", 4), ("dtype", "bfloat16"), ("stop", 5)):
        other = receipt(**{field: value}).encode()
        with pytest.raises(ReceiptError):
            SignedReceipt.from_wire_untrusted(SignedReceipt(s.receipt, other, s.sig).wire)


def test_conflicting_receipts_for_one_step() -> None:
    assert conflicting(receipt(), receipt(out=b"x" * 32))
    assert not conflicting(receipt(), receipt(step=4, out=b"x" * 32))   # another step: no conflict
    assert not conflicting(receipt(), receipt())


def test_tensor_digest_covers_dtype_shape_and_bytes() -> None:
    data = bytes(range(16))
    a = tensor_digest(TensorBlob("float32", (1, 4), memoryview(data)))
    assert a != tensor_digest(TensorBlob("int32", (1, 4), memoryview(data)))
    assert a != tensor_digest(TensorBlob("float32", (4, 1), memoryview(data)))
    assert a != tensor_digest(TensorBlob("float32", (1, 4), memoryview(bytes(range(1, 17)))))


def test_oversized_and_non_canonical_input_is_refused() -> None:
    with pytest.raises(ReceiptError, match="cap"):
        SignedReceipt.from_wire_untrusted(b"d" + b"0" * MAX_RECEIPT_BYTES + b"e")
    with pytest.raises(ReceiptError):
        SignedReceipt.from_wire_untrusted(sign_receipt(ME, receipt()).wire + b"x")


@settings(max_examples=400)
@given(st.binary(max_size=1500))
def test_random_bytes_raise_only_receipt_error(raw: bytes) -> None:
    try:
        SignedReceipt.from_wire_untrusted(raw)
    except ReceiptError:
        pass


@settings(max_examples=200)
@given(st.data())
def test_mutated_receipts_raise_only_receipt_error(data: st.DataObject) -> None:
    wire = bytearray(sign_receipt(ME, receipt()).wire)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(wire) - 1))
        wire[i] = data.draw(st.integers(0, 255))
    try:
        SignedReceipt.from_wire_untrusted(bytes(wire))
    except ReceiptError:
        pass
