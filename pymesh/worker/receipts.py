"""The worker's side of step receipts (sessions opened with ``rcpt``): check the receipt a
pushed step came with, sign this hop's own.

A step pushed by the previous worker of such a session must carry that worker's signed
receipt (``pm.step`` field ``rc``) naming this step, a span that ends where ours starts,
our model, and the digest of exactly the tensor that arrived. Anything else is refused
before computing (:class:`BadReceipt`; the caller reports ``bad_receipt`` blaming the
pusher). A step from the client (the first hop) carries none; its ``prev`` digest is b"".
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from pymesh.errors import PymeshError
from pymesh.proto.frames import TensorBlob
from pymesh.proto.identity import PeerID
from pymesh.proto.receipts import Receipt, ReceiptError, SignedReceipt, Signer, sign_receipt, tensor_digest
from pymesh.proto.records import base_model_id

#: tensors at least this big are hashed in a worker thread (hashlib releases the GIL)
THREAD_DIGEST_BYTES = 1 << 20
#: spellings of the compute dtype a runtime may carry -> the name a receipt uses
_DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
                "fp16": "float16", "float16": "float16"}


class BadReceipt(PymeshError):
    """A pushed step's receipt is missing, malformed, forged or does not match the step."""


def compute_dtype(name: str) -> str:
    """The receipt name of a runtime's ``dtype_name`` ("bf16" -> "bfloat16")."""
    try:
        return _DTYPE_NAMES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} cannot be named in a receipt; use float32, bfloat16 or float16") from None


def device_kind(device: str) -> str:
    """"cuda:1" -> "cuda" (what a receipt names)."""
    return device.split(":", 1)[0].lower()


@dataclass(frozen=True)
class StepClaim:
    """What this worker is about to sign for one step (all but the digests)."""

    model: str
    sid: bytes
    step: int
    pos: int
    seq: int
    start: int
    stop: int
    dtype: str
    device: str


async def digest_of(blob: TensorBlob) -> bytes:
    """:func:`tensor_digest` of ``blob``; in a worker thread when the blob is big (a prefill's
    hidden states: ~18 ms for 8 MiB here), inline for a decode step's (~10-50 us)."""
    if len(blob.data) < THREAD_DIGEST_BYTES:
        return tensor_digest(blob)
    return await trio.to_thread.run_sync(tensor_digest, blob)


def check_received(raw: bytes | None, *, pusher: PeerID, claim: StepClaim, digest: bytes) -> SignedReceipt:
    """The previous worker's receipt for the step that arrived (``digest``: its tensor's
    :func:`tensor_digest`), verified; raises :class:`BadReceipt` saying what is wrong.
    ``claim`` is this hop's view of the step."""
    if raw is None:
        raise BadReceipt(f"step {claim.step} came without the previous worker's receipt, but the session "
                         "was opened with receipts")
    try:
        signed = SignedReceipt.from_wire_untrusted(raw)
    except ReceiptError as exc:
        raise BadReceipt(f"the receipt pushed with step {claim.step} is invalid: {exc}") from None
    r = signed.receipt
    if r.peer != pusher:
        raise BadReceipt(f"the receipt pushed with step {claim.step} is signed by {r.peer.short()}, "
                         f"not by the pusher {pusher.short()}")
    if (r.sid, r.step, r.pos, r.seq) != (claim.sid, claim.step, claim.pos, claim.seq):
        raise BadReceipt(f"the receipt names step {r.step} at position {r.pos} (x{r.seq}) of session "
                         f"{r.sid.hex()[:8]}, but step {claim.step} at position {claim.pos} (x{claim.seq}) "
                         f"of session {claim.sid.hex()[:8]} arrived")
    if r.stop != claim.start:
        raise BadReceipt(f"the receipt's span {r.start}-{r.stop - 1} does not end where this worker's "
                         f"starts (block {claim.start})")
    # the predecessor may compute in another quantization of the model (a client routing with
    # --allow-mixed chains them; it checks each hop's receipt against that hop's own id)
    if base_model_id(r.model) != base_model_id(claim.model):
        raise BadReceipt(f"the receipt names model {r.model[:80]!r}, not {claim.model[:80]!r} (in any "
                         "quantization)")
    if r.out != digest:
        raise BadReceipt(f"the receipt's output digest does not match the tensor pushed with step {claim.step}")
    return signed


def sign_step(signer: Signer, claim: StepClaim, *, inp: bytes, out: bytes, prev: bytes) -> SignedReceipt:
    """Sign this hop's receipt for one step (``inp``/``out``: tensor digests; ``prev``: the
    received receipt's digest, b"" at the first hop or for a replayed step)."""
    c = claim
    return sign_receipt(signer, Receipt(signer.peer_id, c.model, c.sid, c.step, c.pos, c.seq, c.start, c.stop,
                                        c.dtype, c.device, inp, out, prev))


__all__ = ["BadReceipt", "StepClaim", "check_received", "compute_dtype", "device_kind", "digest_of", "sign_step",
           "tensor_digest"]
