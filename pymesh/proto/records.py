"""pymesh worker records: who serves which blocks of which model, signed by the worker.

A record is a bencoded dictionary with short keys, signed with the worker's Ed25519
identity key over ``b"pymesh-record\\0" + bencode(fields without "sig")``. The signer's
public key is in the record, so anyone can verify it without asking the network, and a
record can only ever replace a record of the same key (records are stored keyed by
signer, newest timestamp wins).

Floats are carried as integers (microseconds, milli-tokens, milliseconds) so encoding
is exact; :meth:`WorkerRecord.signed` rounds them first, which makes a signed record
equal to its decoded copy.

Records live at two DHT targets: :func:`model_target` (per model) and
:data:`ALL_TARGET` (every record, for ``list_models`` and the monitor).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace

from pymesh import PROTOCOL_VERSION
from pymesh.errors import DecodeError, VersionMismatch
from pymesh.proto.bencode import BencodeError, decode_untrusted, encode
from pymesh.proto.identity import Identity, PeerID, verify_signature
from pymesh.proto.vocab import WorkerState

MAX_RECORD_BYTES = 700
MAX_MODEL_ID = 160
MAX_HOST = 253
STATES = tuple(s.value for s in WorkerState)   # ("joining", "online", "offline")
SIGN_DOMAIN = b"pymesh-record\0"
ALL_TARGET = hashlib.sha1(b"pymesh:all-records").digest()
_NO_PEER = PeerID(bytes(32))


def model_target(model_id: str) -> bytes:
    """DHT target under which the records of ``model_id`` are stored."""
    return hashlib.sha1(b"pymesh:model:" + model_id.encode("utf-8")).digest()


class RecordError(DecodeError):
    """Record bytes are malformed, too large, or do not carry a valid signature."""


class RecordVersionMismatch(RecordError, VersionMismatch):
    """A record was written by a peer speaking another protocol version."""

    def __init__(self, ours: int, theirs: object) -> None:
        VersionMismatch.__init__(self, ours, theirs)


@dataclass(frozen=True)
class WorkerRecord:
    version: int = PROTOCOL_VERSION
    peer_id: PeerID = _NO_PEER
    model_id: str = ""
    start: int = 0
    stop: int = 0
    host: str = ""
    port: int = 0
    transports: tuple[str, ...] = ("quic", "tcp")
    state: WorkerState = WorkerState.ONLINE
    block_ms: float = 0.0
    tokens_per_s: float = 0.0
    cache_tokens_free: int = 0
    cache_tokens_total: int = 0
    sessions: int = 0
    timestamp: float = 0.0
    signature: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        # A plain string naming a state becomes the member; anything else stays, for
        # _check_local to refuse (a record is only checked when signed).
        if not isinstance(self.state, WorkerState) and self.state in STATES:
            object.__setattr__(self, "state", WorkerState(self.state))

    # -- helpers ---------------------------------------------------------------------------
    def covers(self, block: int) -> bool:
        return self.start <= block < self.stop

    @property
    def live(self) -> bool:
        return self.state != WorkerState.OFFLINE

    def _fields(self) -> dict[bytes, object]:
        return {
            b"v": self.version,
            b"k": self.peer_id.key,
            b"m": self.model_id,
            b"s": self.start,
            b"e": self.stop,
            b"h": self.host,
            b"p": self.port,
            b"t": list(self.transports),
            b"st": str(self.state),
            b"bm": round(self.block_ms * 1000),
            b"tp": round(self.tokens_per_s * 1000),
            b"cf": self.cache_tokens_free,
            b"ct": self.cache_tokens_total,
            b"n": self.sessions,
            b"ts": round(self.timestamp * 1000),
        }

    def _check_local(self) -> None:
        if not 0 <= self.start < self.stop:
            raise ValueError(f"record span [{self.start}, {self.stop}) is empty or negative")
        if self.state not in STATES:
            raise ValueError(f"record state {self.state!r} is not one of {STATES}")
        if len(self.model_id.encode()) > MAX_MODEL_ID or not self.model_id:
            raise ValueError(f"model id must be 1..{MAX_MODEL_ID} bytes")

    def signed(self, identity: Identity, *, timestamp: float | None = None) -> "WorkerRecord":
        """A copy with peer_id, timestamp and signature set by ``identity``."""
        ts = time.time() if timestamp is None else timestamp
        rec = replace(
            self, peer_id=identity.peer_id, timestamp=round(ts * 1000) / 1000,
            block_ms=round(self.block_ms * 1000) / 1000,
            tokens_per_s=round(self.tokens_per_s * 1000) / 1000, signature=b"",
        )
        rec._check_local()
        body = encode(rec._fields())
        out = replace(rec, signature=identity.sign(SIGN_DOMAIN + body))
        if len(out.to_bytes()) > MAX_RECORD_BYTES:
            raise ValueError(f"record exceeds {MAX_RECORD_BYTES} bytes; shorten model id or host")
        return out

    def verify(self) -> bool:
        return verify_signature(self.peer_id.key, self.signature, SIGN_DOMAIN + encode(self._fields()))

    def to_bytes(self) -> bytes:
        d = self._fields()
        d[b"sig"] = self.signature
        return encode(d)

    @classmethod
    def from_bytes_untrusted(cls, data: bytes, *, expected_version: int = PROTOCOL_VERSION,
                             require_signature: bool = True) -> "WorkerRecord":
        """Parse and verify a record. Raises RecordError (RecordVersionMismatch for another
        protocol version)."""
        if len(data) > MAX_RECORD_BYTES:
            raise RecordError(f"record of {len(data)} bytes exceeds {MAX_RECORD_BYTES}")
        try:
            d = decode_untrusted(data, max_size=MAX_RECORD_BYTES, max_depth=3)
        except BencodeError as exc:
            raise RecordError(f"record is not valid bencode: {exc}") from None
        if not isinstance(d, dict):
            raise RecordError("record must be a dictionary")
        version = d.get(b"v")
        if version != expected_version:
            raise RecordVersionMismatch(expected_version, version)

        def num(key: bytes, lo: int = 0, hi: int = 2**53) -> int:
            v = d.get(key)
            if not isinstance(v, int) or not lo <= v <= hi:
                raise RecordError(f"record field {key.decode()!r} must be an integer in {lo}..{hi}")
            return v

        def text(key: bytes, cap: int) -> str:
            v = d.get(key)
            if not isinstance(v, bytes) or len(v) > cap:
                raise RecordError(f"record field {key.decode()!r} must be a string of <= {cap} bytes")
            try:
                return v.decode("utf-8")
            except UnicodeDecodeError:
                raise RecordError(f"record field {key.decode()!r} is not UTF-8") from None

        key = d.get(b"k")
        sig = d.get(b"sig")
        if not isinstance(key, bytes) or len(key) != 32:
            raise RecordError("record key 'k' must be 32 bytes")
        if not isinstance(sig, bytes) or len(sig) != 64:
            raise RecordError("record signature 'sig' must be 64 bytes")
        transports = d.get(b"t")
        if not isinstance(transports, list) or len(transports) > 4 or \
                not all(isinstance(t, bytes) and 0 < len(t) <= 16 for t in transports):
            raise RecordError("record field 't' must be a list of up to 4 short transport names")
        known = {b"v", b"k", b"m", b"s", b"e", b"h", b"p", b"t", b"st", b"bm", b"tp",
                 b"cf", b"ct", b"n", b"ts", b"sig"}
        if set(d) - known:
            raise RecordError(f"record has unknown fields {sorted(set(d) - known)!r}")
        rec = cls(
            version=version,
            peer_id=PeerID(key),
            model_id=text(b"m", MAX_MODEL_ID),
            start=num(b"s", 0, 1 << 20),
            stop=num(b"e", 1, 1 << 20),
            host=text(b"h", MAX_HOST),
            port=num(b"p", 0, 65535),
            transports=tuple(t.decode("ascii", "replace") for t in transports),  # type: ignore[union-attr]
            state=_state_untrusted(text(b"st", 16)),
            block_ms=num(b"bm") / 1000,
            tokens_per_s=num(b"tp") / 1000,
            cache_tokens_free=num(b"cf"),
            cache_tokens_total=num(b"ct"),
            sessions=num(b"n", 0, 1 << 30),
            timestamp=num(b"ts") / 1000,
            signature=sig,
        )
        if rec.start >= rec.stop:
            raise RecordError(f"record span [{rec.start}, {rec.stop}) is empty")
        if not rec.model_id:
            raise RecordError("record has an empty model id")
        if require_signature and not rec.verify():
            raise RecordError(f"record signature does not verify for key {rec.peer_id.short()}")
        return rec


def _state_untrusted(text: str) -> WorkerState:
    try:
        return WorkerState.parse_untrusted(text)
    except DecodeError as exc:
        raise RecordError(f"invalid record: {exc}") from None
