"""The swarm's RPC vocabulary (method names, metadata fields), shared by worker and client.

Metadata arrives as bencoded dictionaries from peers, so every reader here checks
types and ranges and raises :class:`BadRequest` (answered as ``bad_request``);
strings come back as bytes and are decoded here, never evaluated.

Methods (call -> reply):
  ``pm.info``     {} -> {peer, model, start, stop, version, state, free, total, sessions}
  ``pm.open``     {sid, max_tokens, batch, copies?, next?} -> {start, stop, free}
  ``pm.flush``    {sid} -> {steps} + [outputs not yet copied to the client]
  ``pm.set_next`` {sid, next?} -> {}
  ``pm.close``    {sid} -> {closed}
  ``pm.forward``  {sid, step, pos} + [hidden] -> {} + [hidden]   (replay; nothing is pushed on)
  ``pm.stats``    {sid?} -> counters
Pushes:
  ``pm.step`` client or previous worker -> worker: {sid, step, pos} + [hidden]
  ``pm.out``  worker -> client: {sid, step, start, stop, final, steps} + [outputs]: the last
              hop's result at once (final=1); other hops' recovery copies every ``copies`` steps
  ``pm.err``  worker -> client (or previous worker, who relays): {sid, step, code, msg, blame, start, stop}
"""

from __future__ import annotations

from typing import Mapping

from pymesh.errors import PymeshError
from pymesh.proto.identity import PeerID
from pymesh.worker.sessions import NextHop

INFO, OPEN, SET_NEXT, CLOSE, FORWARD, STATS = "pm.info", "pm.open", "pm.set_next", "pm.close", "pm.forward", "pm.stats"
FLUSH = "pm.flush"
MAX_COPY_EVERY = 64
STEP, OUT, ERR = "pm.step", "pm.out", "pm.err"

MAX_SESSION_TOKENS = 1 << 20
MAX_BATCH = 1024
MAX_HIDDEN_DIMS = 3


class BadRequest(PymeshError):
    """Metadata from a peer is missing a field or has the wrong type."""


def get_int(meta: Mapping[str, object], key: str, lo: int = 0, hi: int = 1 << 40, default: int | None = None) -> int:
    v = meta.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise BadRequest(f"field {key!r} must be an integer in {lo}..{hi}, got {v!r}"[:200])
    return v


def get_bytes(meta: Mapping[str, object], key: str, max_len: int = 64) -> bytes:
    v = meta.get(key)
    if isinstance(v, str):
        v = v.encode()
    if not isinstance(v, bytes) or not 0 < len(v) <= max_len:
        raise BadRequest(f"field {key!r} must be 1..{max_len} bytes")
    return v


def get_str(meta: Mapping[str, object], key: str, max_len: int = 256, default: str | None = None) -> str:
    v = meta.get(key, default)
    if isinstance(v, bytes):
        try:
            v = v.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"field {key!r} is not UTF-8") from None
    if not isinstance(v, str) or len(v) > max_len:
        raise BadRequest(f"field {key!r} must be a string of at most {max_len} characters")
    return v


def encode_next(hop: NextHop | None) -> dict[str, object]:
    if hop is None:
        return {}
    return {"next": {"peer": hop.peer.key, "host": hop.host, "port": hop.port, "transport": hop.transport}}


def decode_next(meta: Mapping[str, object]) -> NextHop | None:
    raw = meta.get("next")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise BadRequest("field 'next' must be a dictionary {peer, host, port, transport}")
    key = get_bytes(raw, "peer", 32)
    if len(key) != 32:
        raise BadRequest("next.peer must be a 32-byte peer ID")
    transport = get_str(raw, "transport", 8)
    if transport not in ("quic", "tcp"):
        raise BadRequest(f"next.transport {transport!r} must be quic or tcp")
    return NextHop(PeerID(key), get_str(raw, "host", 253), get_int(raw, "port", 1, 65535), transport)


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
