"""Readers of untrusted message fields (type and range checks that raise only BadRequest),
error codes and the next-hop field.

:mod:`pymesh.proto.session_wire` builds its messages on these; they are split out only to
keep that module short (import them from there).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

from pymesh.errors import RemoteProtocolError
from pymesh.proto.identity import PeerID
from pymesh.proto.vocab import Transport

MAX_HIDDEN_DIMS = 3               # hidden states are [batch, seq, hidden]
MAX_STEP = 1 << 30
MAX_STEPS_LISTED = 4096           # step indices in one pm.out / pm.flush reply
MAX_BLOCK = 1 << 20               # block indices (span bounds)
MAX_HOST = 253


class BadRequest(RemoteProtocolError):
    """Metadata from a peer is missing a field or has the wrong type or range."""


Meta = Mapping[str, object]


def get_int(meta: Meta, key: str, lo: int = 0, hi: int = 1 << 40, default: int | None = None) -> int:
    v = meta.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise BadRequest(f"field {key!r} must be an integer in {lo}..{hi}, got {v!r}"[:200])
    return v


def get_opt_int(meta: Meta, key: str, lo: int = 0, hi: int = 1 << 40) -> int | None:
    return None if meta.get(key) is None else get_int(meta, key, lo, hi)


def get_bytes(meta: Meta, key: str, max_len: int = 64, *, min_len: int = 1) -> bytes:
    v = meta.get(key)
    if isinstance(v, str):
        v = v.encode()
    if not isinstance(v, bytes) or not min_len <= len(v) <= max_len:
        raise BadRequest(f"field {key!r} must be {min_len}..{max_len} bytes")
    return v


def get_str(meta: Meta, key: str, max_len: int = 256, default: str | None = None) -> str:
    v = meta.get(key, default)
    if isinstance(v, bytes):
        try:
            v = v.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"field {key!r} is not UTF-8") from None
    if not isinstance(v, str) or len(v) > max_len:
        raise BadRequest(f"field {key!r} must be a string of at most {max_len} characters")
    return v


def get_peer(meta: Meta, key: str) -> PeerID:
    raw = get_bytes(meta, key, 32)
    if len(raw) != 32:
        raise BadRequest(f"field {key!r} must be a 32-byte peer ID")
    return PeerID(raw)


def get_steps(meta: Meta, key: str) -> tuple[int, ...]:
    v = meta.get(key)
    if not isinstance(v, list) or len(v) > MAX_STEPS_LISTED:
        raise BadRequest(f"field {key!r} must be a list of at most {MAX_STEPS_LISTED} step indices")
    return tuple(get_int({key: k}, key, 0, MAX_STEP) for k in v)


def get_dict(meta: Meta, key: str) -> Meta | None:
    v = meta.get(key)
    if v is None:
        return None
    if not isinstance(v, dict):
        raise BadRequest(f"field {key!r} must be a dictionary")
    return v


def as_mapping(meta: object) -> Meta:
    if not isinstance(meta, Mapping):
        raise BadRequest("message metadata must be a dictionary")
    return meta


def check_tensor_count(tensors: Sequence[object], n: int, what: str) -> None:
    if len(tensors) != n:
        raise BadRequest(f"{what} carries exactly {n} tensor(s), got {len(tensors)}")


def check_hidden_shape(shape: tuple[int, ...], hidden_size: int | None, max_tokens: int,
                       batch_size: int | None = None) -> int:
    """Validate a hidden-state tensor ``[batch, seq, hidden]``; returns ``seq``."""
    if len(shape) != MAX_HIDDEN_DIMS:
        raise BadRequest(f"hidden states must be [batch, seq, hidden], got shape {list(shape)}")
    batch, seq, hidden = shape
    if batch_size is not None and batch != batch_size:
        raise BadRequest(f"hidden states have batch {batch} but the session was opened with batch {batch_size}")
    if hidden_size is not None and hidden != hidden_size:
        raise BadRequest(f"hidden size {hidden} does not match this model's {hidden_size}")
    if not 0 < seq <= max_tokens or batch <= 0:
        raise BadRequest(f"hidden states of shape {list(shape)} do not fit a session of {max_tokens} tokens")
    return seq


class ErrorCode(str, enum.Enum):
    """``RemoteError`` / ``pm.err`` codes of the session protocol (equal to their wire strings)."""

    BAD_REQUEST = "bad_request"            # the request broke the protocol (or the session's order)
    NOT_FOUND = "not_found"                # no such session here (expired, closed, never opened)
    REFUSED = "refused"                    # valid, but this worker will not serve it: go elsewhere
    NOT_LISTED = "not_listed"              # the caller is not on this worker's allowlist: final
    BUSY = "busy"
    NEXT_UNREACHABLE = "next_unreachable"  # the next hop's recorded address did not answer
    NEXT_UNKNOWN = "next_unknown"          # no verified record of the next peer serves that span
    BAD_RECEIPT = "bad_receipt"            # a pushed step's receipt was missing, forged or not its tensor's
    INTERNAL = "internal"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse_untrusted(cls, text: str) -> "ErrorCode":
        try:
            return cls(text)
        except ValueError:
            raise BadRequest(f"unknown error code {text[:32]!r}") from None


def get_span(meta: Meta, what: str) -> tuple[int, int]:
    start, stop = get_int(meta, "start", 0, MAX_BLOCK), get_int(meta, "stop", 1, MAX_BLOCK)
    if start >= stop:
        raise BadRequest(f"{what} span {start}..{stop} is empty")
    return start, stop


def get_opt_peer(meta: Meta, key: str) -> PeerID | None:
    """An optional peer id: absent or empty means ``None``."""
    return None if meta.get(key) in (None, b"", "") else get_peer(meta, key)


# --------------------------------------------------------------------------- next hop


class AddrHint(NamedTuple):
    """Where the sender believes a peer listens; only ever compared with the peer's record."""

    host: str
    port: int
    transport: Transport


@dataclass(frozen=True)
class NextHop:
    """The peer that serves blocks ``[start, stop)`` after this worker; ``None`` = last hop."""

    peer: PeerID
    start: int
    stop: int
    addr_hint: AddrHint | None = None

    def to_meta(self) -> dict[str, object]:
        out: dict[str, object] = {"peer": self.peer.key, "start": self.start, "stop": self.stop}
        if self.addr_hint is not None:
            h = self.addr_hint
            out["hint"] = {"host": h.host, "port": h.port, "transport": h.transport.value}
        return out

    @classmethod
    def from_meta_untrusted(cls, meta: object) -> "NextHop":
        m = as_mapping(meta)
        start, stop = get_span(m, "next")
        raw = get_dict(m, "hint")
        hint = None
        if raw is not None:
            text = get_str(raw, "transport", 8)
            try:
                transport = Transport(text)
            except ValueError:
                raise BadRequest(f"next.hint.transport {text!r} must be quic or tcp") from None
            hint = AddrHint(get_str(raw, "host", MAX_HOST), get_int(raw, "port", 1, 65535), transport)
        return cls(get_peer(m, "peer"), start, stop, hint)

    def describe(self) -> str:
        return f"{self.peer.short()} (blocks {self.start}-{self.stop - 1})"
