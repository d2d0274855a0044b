"""Signed step receipts: what a worker claims it received and sent for one step of a session.

With each step's output a worker that was asked for receipts (``pm.open`` with ``rcpt``)
signs a :class:`Receipt`: the session, step, positions and span, the dtype and device it
computed in, and digests of the input it received and of the output it sent on. The same
signed receipt rides with the output pushed to the next hop (``pm.step`` field ``rc``) and
goes to the client in that step's ``pm.out`` (field ``rc``, beside ``prc``: the receipt the
hop received with its input). So a worker that sends the client one output and the next
hop another must sign two receipts for one step, and the pair convicts it.

A receipt proves what a worker *claimed*, not that the numbers are right: honest outputs
differ bit for bit between dtypes, instruction paths and thread counts. Evidence is a
receipt plus the tensors it names, which anyone can re-run (``pymesh.client.checks``).

Wire form: ``bencode({"b": body, "s": signature})`` where ``body`` is the bencoded receipt
and the signature is Ed25519 by ``peer`` over ``DOMAIN + body``. Parsing is capped
(``MAX_RECEIPT_BYTES``) and raises only :class:`ReceiptError`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import Mapping, Protocol

from pymesh.errors import RemoteProtocolError
from pymesh.proto.bencode import BencodeError, decode_untrusted, encode
from pymesh.proto.frames import DTYPE_SIZES, TensorBlob
from pymesh.proto.identity import PeerID, verify_signature

#: domain separation: a receipt signature can never be mistaken for a record or handshake one
DOMAIN = b"pymesh-receipt-v1\0"
#: digests are BLAKE2b-256
DIGEST_BYTES = 32
#: a signed receipt on the wire, at most (a body is ~330 bytes with a 200-byte model id)
MAX_RECEIPT_BYTES = 1024
MAX_MODEL_ID = 200
MAX_SID = 64
MAX_INT = 1 << 40
#: compute dtypes and devices a receipt may name
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda", "mps")


class ReceiptError(RemoteProtocolError):
    """A receipt is malformed, too big, or not signed by the peer it names."""


class Signer(Protocol):
    """What signs receipts: an :class:`pymesh.proto.identity.Identity`."""

    peer_id: PeerID

    def sign(self, message: bytes) -> bytes: ...


def tensor_digest(blob: TensorBlob) -> bytes:
    """BLAKE2b-256 over a tensor blob's dtype, shape and bytes (what a receipt names)."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"pymesh-tensor")
    h.update(blob.dtype.encode("ascii"))
    h.update(b"[" + ",".join(str(int(d)) for d in blob.shape).encode("ascii") + b"]")
    h.update(blob.data)
    return h.digest()


@dataclass(frozen=True)
class Receipt:
    """One worker's claim about one step of one session."""

    peer: PeerID          # the signer
    model: str            # the model id it serves
    sid: bytes
    step: int
    pos: int              # first position of the step
    seq: int              # tokens in the step
    start: int            # the span [start, stop)
    stop: int
    dtype: str            # the dtype it computed in
    device: str           # cpu / cuda / mps
    inp: bytes            # tensor_digest of the input it received
    out: bytes            # tensor_digest of the output it sent on (and to the client)
    prev: bytes = b""     # SignedReceipt.digest of the receipt its input came with (b"": from the client)

    def encode(self) -> bytes:
        """The canonical bencoded body: ``bencode.encode`` of the fields as a dict, written out
        with its keys in their sorted order (a receipt is encoded for every signature and
        every check: the generic encoder took ~25 us of a worker's step)."""
        model, dt, dev = self.model.encode(), self.dtype.encode(), self.device.encode()
        return b"".join((
            b"d3:dev%d:%s2:dt%d:%s2:in%d:%s5:model%d:%s3:out%d:%s4:peer%d:%s3:posi%de4:prev%d:%s"
            % (len(dev), dev, len(dt), dt, len(self.inp), self.inp, len(model), model, len(self.out), self.out,
               len(self.peer.key), self.peer.key, self.pos, len(self.prev), self.prev),
            b"3:seqi%de3:sid%d:%s5:starti%de4:stepi%de4:stopi%de1:vi1ee"
            % (self.seq, len(self.sid), self.sid, self.start, self.step, self.stop)))

    @classmethod
    def decode_untrusted(cls, body: bytes) -> "Receipt":
        try:
            m = decode_untrusted(body, max_size=MAX_RECEIPT_BYTES)
        except BencodeError as exc:
            raise ReceiptError(f"receipt body is not valid bencode: {exc}") from None
        if not isinstance(m, dict) or m.get(b"v") != 1:
            raise ReceiptError("receipt body must be a dict with v=1")
        try:
            peer = PeerID(_bytes(m, b"peer", 32, 32))
        except ReceiptError:
            raise
        except Exception:
            raise ReceiptError("receipt field 'peer' is not a peer id") from None
        dtype = _text(m, b"dt", 16)
        device = _text(m, b"dev", 8)
        if dtype not in DTYPES:
            raise ReceiptError(f"receipt dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if device not in DEVICES:
            raise ReceiptError(f"receipt device {device!r} is not one of {', '.join(DEVICES)}")
        start, stop = _int(m, b"start"), _int(m, b"stop")
        if stop <= start:
            raise ReceiptError(f"receipt span {start}-{stop} is empty")
        r = cls(peer, _text(m, b"model", MAX_MODEL_ID), _bytes(m, b"sid", 1, MAX_SID), _int(m, b"step"),
                _int(m, b"pos"), _int(m, b"seq", 1), start, stop, dtype, device,
                _bytes(m, b"in", DIGEST_BYTES, DIGEST_BYTES), _bytes(m, b"out", DIGEST_BYTES, DIGEST_BYTES),
                _bytes(m, b"prev", 0, DIGEST_BYTES))
        if r.prev and len(r.prev) != DIGEST_BYTES:
            raise ReceiptError("receipt field 'prev' must be empty or a 32-byte digest")
        if r.encode() != bytes(body):
            raise ReceiptError("receipt body is not in canonical form (unknown or reordered fields)")
        return r


@dataclass(frozen=True)
class SignedReceipt:
    """A receipt with its signature; ``wire`` is what travels."""

    receipt: Receipt
    body: bytes
    sig: bytes

    @cached_property
    def wire(self) -> bytes:
        return encode({"b": self.body, "s": self.sig})

    @cached_property
    def digest(self) -> bytes:
        """What the next hop's receipt names as ``prev``."""
        return hashlib.blake2b(self.wire, digest_size=DIGEST_BYTES, person=b"pymesh-receipt").digest()

    def signature_ok(self) -> bool:
        """Whether the signature verifies under the peer the receipt names (checked once)."""
        ok = self.__dict__.get("_sig_ok")
        if ok is None:
            ok = verify_signature(self.receipt.peer.key, self.sig, DOMAIN + self.body)
            object.__setattr__(self, "_sig_ok", ok)
        return bool(ok)

    @classmethod
    def from_wire_untrusted(cls, raw: bytes | bytearray | memoryview) -> "SignedReceipt":
        """Parse and check the signature against the peer the receipt names."""
        signed = cls.from_wire_unverified(raw)
        if not signed.signature_ok():
            raise ReceiptError(f"receipt signature does not verify under peer {signed.receipt.peer.short()}")
        return signed

    @classmethod
    def from_wire_unverified(cls, raw: bytes | bytearray | memoryview) -> "SignedReceipt":
        """Parse (capped, canonical form checked) without checking the signature: for a
        receipt that arrived over its signer's own authenticated link, whose signature only
        matters once the receipt is shown to someone else (:meth:`signature_ok` then)."""
        if len(raw) > MAX_RECEIPT_BYTES:
            raise ReceiptError(f"receipt of {len(raw)} bytes exceeds the {MAX_RECEIPT_BYTES}-byte cap")
        try:
            m = decode_untrusted(bytes(raw), max_size=MAX_RECEIPT_BYTES)
        except BencodeError as exc:
            raise ReceiptError(f"receipt is not valid bencode: {exc}") from None
        if not isinstance(m, dict) or set(m) != {b"b", b"s"}:
            raise ReceiptError("a receipt is a dict of exactly 'b' (body) and 's' (signature)")
        body, sig = m[b"b"], m[b"s"]
        if not isinstance(body, bytes) or not isinstance(sig, bytes) or len(sig) != 64:
            raise ReceiptError("receipt 'b' must be bytes and 's' a 64-byte signature")
        receipt = Receipt.decode_untrusted(body)
        signed = cls(receipt, body, sig)
        if signed.wire != bytes(raw):
            raise ReceiptError("receipt is not in canonical form")
        return signed


def sign_receipt(signer: Signer, receipt: Receipt) -> SignedReceipt:
    """Sign ``receipt`` (its ``peer`` must be the signer's)."""
    if receipt.peer != signer.peer_id:
        raise ValueError("a receipt names its signer as peer")
    body = receipt.encode()
    return SignedReceipt(receipt, body, signer.sign(DOMAIN + body))


def conflicting(a: Receipt, b: Receipt) -> bool:
    """Two receipts of one signer for the same step of the same session and span that name
    different outputs (or inputs): the signer equivocated."""
    same_step = (a.peer, a.model, a.sid, a.step, a.start, a.stop) == (b.peer, b.model, b.sid, b.step, b.start, b.stop)
    return same_step and (a.out != b.out or a.inp != b.inp or a.pos != b.pos or a.seq != b.seq)


def _bytes(m: Mapping[bytes, object], key: bytes, lo: int, hi: int) -> bytes:
    v = m.get(key)
    if not isinstance(v, bytes) or not lo <= len(v) <= hi:
        raise ReceiptError(f"receipt field {key.decode()!r} must be {lo}..{hi} bytes")
    return v


def _text(m: Mapping[bytes, object], key: bytes, hi: int) -> str:
    raw = _bytes(m, key, 1, hi)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ReceiptError(f"receipt field {key.decode()!r} is not UTF-8") from None


def _int(m: Mapping[bytes, object], key: bytes, lo: int = 0) -> int:
    v = m.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= MAX_INT:
        raise ReceiptError(f"receipt field {key.decode()!r} must be an integer in {lo}..{MAX_INT}")
    return v


assert set(DTYPES) <= set(DTYPE_SIZES)
