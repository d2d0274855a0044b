"""The swarm's session protocol (``pm.*``): one frozen dataclass per message, shared by
worker and client. This module is the schema; worker/service.py and client/ only build and
read these objects.

Metadata arrives as bencoded dictionaries from peers (keys are str, strings come back as
bytes), so every ``from_meta_untrusted`` checks types and ranges and raises only
:class:`BadRequest`; nothing is evaluated. Tensors travel beside the metadata in the same
frame; :meth:`check_tensor_count` and :func:`check_hidden_shape` check them.

``next`` names the peer that must serve the following span and the span itself
(:class:`NextHop`); an address travels at most as a hint. A worker dials what that peer's
own signed DHT record says, never an address only the request named.

Sessions are bound to their client and route (issue 11): the peer that opens a session is its
client, and only it may change, close, flush, replay or read the session's counters. ``prev``
(on :class:`Open` and :class:`SetNext`) names the peer that will push this hop its steps: the
previous worker of the route, or ``None`` when the client pushes them itself (first hop). A
worker accepts ``pm.step`` for the session only from that peer (or from the client when
``prev`` is ``None``); anyone else gets ``bad_request`` and nothing is computed. ``SetNext``
rebinds both ends: its ``prev`` replaces the bound one (``None``: the client pushes from now on).

Link failures: when a worker cannot deliver a step to its next hop (no connection, the
connection closed, a timeout), it pushes the client an :class:`Err` with code
``next_unreachable``, ``blame`` = the next peer and ``link=True``: the link between the two
hops failed, which does not prove the next peer misbehaved (it may have restarted). A
``RemoteError`` ``next_unreachable`` answering ``pm.open``/``pm.set_next`` is the same kind of
link failure. :class:`CheckLink` (``pm.link``, only the session's client may call it) asks a
hop whether its connection to the session's next hop is alive right now (a short ``pm.info``
over it): ``CheckLinkReply(ok, detail)``; the last hop answers ``ok`` (its next is the client).

``pymesh.proto.session_table.MESSAGES`` lists every message (wire name, direction, fields,
tensors); docs/INTERFACES.md renders it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, TypeVar

from pymesh.errors import DecodeError, IdentityError
from pymesh.proto.identity import PeerID
from pymesh.proto.receipts import MAX_RECEIPT_BYTES
from pymesh.proto.session_stats import (MAX_COUNTER, MAX_SID_BYTES, SESSION_COUNTERS, STATS, WORKER_COUNTERS,
                                        SessionCounters, Stats, StatsReply)
from pymesh.proto.session_fields import (MAX_BLOCK, MAX_HIDDEN_DIMS, MAX_HOST, MAX_STEP, MAX_STEPS_LISTED, AddrHint,
                                         BadRequest, ErrorCode, Meta, NextHop, as_mapping, check_hidden_shape,
                                         check_tensor_count, get_bytes, get_dict, get_int, get_opt_int,
                                         get_opt_peer, get_peer, get_span, get_steps, get_str)
from pymesh.proto.vocab import WorkerState

# --------------------------------------------------------------------------- names and caps

INFO, OPEN, SET_NEXT, CLOSE, FORWARD, FLUSH, LINK = (
    "pm.info", "pm.open", "pm.set_next", "pm.close", "pm.forward", "pm.flush", "pm.link")
STEP, OUT, ERR = "pm.step", "pm.out", "pm.err"

MAX_SESSION_TOKENS = 1 << 20      # positions one session may reserve
MAX_BATCH = 1024
MAX_COPY_EVERY = 64               # recovery copies batched per pm.out at most
MAX_MODEL_ID = 200
MAX_MESSAGE = 600                 # characters of an error message (senders cut at 500)
MAX_DETAIL = 300                  # characters of a link check's detail


# --------------------------------------------------------------------------- field readers

def _sid(meta: Meta) -> bytes:
    return get_bytes(meta, "sid", MAX_SID_BYTES)


def _span(meta: Meta, what: str) -> tuple[int, int]:
    return get_span(meta, what)


def _put_next(out: dict[str, object], hop: NextHop | None) -> dict[str, object]:
    if hop is not None:
        out["next"] = hop.to_meta()
    return out


def _put_prev(out: dict[str, object], prev: PeerID | None) -> dict[str, object]:
    if prev is not None:
        out["prev"] = prev.key
    return out


def _get_next(meta: Meta) -> NextHop | None:
    raw = meta.get("next")
    return None if raw is None else NextHop.from_meta_untrusted(raw)


# --------------------------------------------------------------------------- messages

@dataclass(frozen=True)
class Info:
    """Call: who are you, what do you serve, how full are you (also a liveness probe)."""

    METHOD: ClassVar[str] = INFO

    def to_meta(self) -> dict[str, object]:
        return {}

    @classmethod
    def from_meta_untrusted(cls, meta: object) -> "Info":
        as_mapping(meta)
        return cls()


@dataclass(frozen=True)
class InfoReply:
    METHOD: ClassVar[str] = INFO

    peer: PeerID
    model: str
    start: int
    stop: int
    version: int
    state: WorkerState
    free: int
    total: int
    sessions: int

    def to_meta(self) -> dict[str, object]:
        return {"peer": self.peer.to_text(), "model": self.model, "start": self.start, "stop": self.stop,
                "version": self.version, "state": self.state.value, "free": self.free, "total": self.total,
                "sessions": self.sessions}

    @classmethod
    def from_meta_untrusted(cls, meta: object) -> "InfoReply":
        m = as_mapping(meta)
        try:
            peer = PeerID.from_text(get_str(m, "peer", 64))
            state = WorkerState.parse_untrusted(get_str(m, "state", 16))
        except (IdentityError, DecodeError) as exc:
            raise BadRequest(str(exc)) from None
        start, stop = _span(m, "info")
        return cls(peer, get_str(m, "model", MAX_MODEL_ID), start, stop, get_int(m, "version", 0, 1 << 20),
                   state, get_int(m, "free", 0, MAX_COUNTER), get_int(m, "total", 0, MAX_COUNTER),
                   get_int(m, "sessions", 0, MAX_COUNTER))


@dataclass(frozen=True)
class Open:
    """Call: reserve a session's cache; ``model``/``start``/``stop`` absent = whatever is served."""

    METHOD: ClassVar[str] = OPEN

    sid: bytes
    max_tokens: int
    batch: int = 1
    model: str | None = None
    start: int | None = None
    stop: int | None = None
    reset: bool = False           # drop an existing session of this id first (same client only)
    copies: int = 1               # push recovery copies every this many steps
    next_hop: NextHop | None = None
    prev: PeerID | None = None    # who pushes this hop its steps; None: the client itself
    receipts: bool = False        # sign a receipt per step (pymesh.proto.receipts): on pushes and pm.out

    def to_meta(self) -> dict[str, object]:
        out: dict[str, object] = {"sid": self.sid, "max_tokens": self.max_tokens, "batch": self.batch,
                                  "reset": int(self.reset), "copies": self.copies}
        if self.receipts:
            out["rcpt"] = 1
        for key, value in (("model", self.model), ("start", self.start), ("stop", self.stop)):
            if value is not None:
                out[key] = value
        return _put_prev(_put_next(out, self.next_hop), self.prev)

    @classmethod
    def from_meta_untrusted(cls, meta: object) -> "Open":
        m = as_mapping(meta)
        model = None if m.get("model") is None else get_str(m, "model", MAX_MODEL_ID)
        return cls(_sid(m), get_int(m, "max_tokens", 1, MAX_SESSION_TOKENS),
                   get_int(m, "batch", 1, MAX_BATCH, default=1), model, get_opt_int(m, "start", 0, MAX_BLOCK),
                   get_opt_int(m, "stop", 1, MAX_BLOCK), bool(get_int(m, "reset", 0, 1, default=0)),
                   get_int(m, "copies", 1, MAX_COPY_EVERY, default=1), _get_next(m), get_opt_peer(m, "prev"),
                   bool(get_int(m, "rcpt", 0, 1, default=0)))


@dataclass(frozen=True)
class OpenReply:
    METHOD: ClassVar[str] = OPEN

    start: int
    stop: int
    free: int

    def to_meta(self) -> dict[str, object]:
        return {"start": self.start, "stop": self.stop, "free": self.free}

    @classmethod
    def from_meta_untrusted(cls, meta: object) -> "OpenReply":
        m = as_mapping(meta)
        start, stop = _span(m, "open reply")
        return cls(start, stop, get_int(m, "free", 0, MAX_COUNTER))


@dataclass(frozen=True)
class SetNext:
    """Call: point an open session at another next hop (``None``: this hop is now the last) and
    another previous hop (``None``: the client pushes the steps itself)."""

    METHOD: ClassVar[str] = SET_NEXT

    sid: bytes
    next_hop: NextHop | None = None
    prev: PeerID | None = None

    def to_meta(self) -> dict[str, object]:
        return _put_prev(_put_next({"sid": self.sid}, self.next_hop), self.prev)

    @classmethod
    def from_meta_untrusted(cls, meta: object) -> "SetNext":
        m = as_mapping(meta)
        return cls(_sid(m), _get_next(m), get_opt_peer(m, "prev"))


@dataclass(frozen=True)
class SessionRef:
    """Call body that names a session only (``pm.close``, ``pm.flush``)."""

    sid: bytes

    def to_meta(self) -> dict[str, object]:
        return {"sid": self.sid}

    @classmethod
    def from_meta_untrusted(cls: type[_R], meta: object) -> _R:
        return cls(_sid(as_mapping(meta)))


_R = TypeVar("_R", bound=SessionRef)


@dataclass(frozen=True)
class Close(SessionRef):
    METHOD: ClassVar[str] = CLOSE


@dataclass(frozen=True)
class CloseReply:
    METHOD: ClassVar[str] = CLOSE

    closed: bool
    free: int

    def to_meta(self) -> dict[str, object]:
        return {"closed": int(self.closed), "free": self.free}

    @classmethod
    def from_meta_untrusted(cls, meta: object) -> "CloseReply":
        m = as_mapping(meta)
        return cls(bool(get_int(m, "closed", 0, 1)), get_int(m, "free", 0, MAX_COUNTER))


@dataclass(frozen=True)
class Flush(SessionRef):
    """Call: hand over the recovery copies not yet pushed (the client is recovering)."""

    METHOD: ClassVar[str] = FLUSH


@dataclass(frozen=True)
class FlushReply:
    """Reply to ``pm.flush``; one output tensor per entry of ``steps``."""

    METHOD: ClassVar[str] = FLUSH

    steps: tuple[int, ...]
    start: int
    stop: int

    def to_meta(self) -> dict[str, object]:
        return {"steps": list(self.steps), "start": self.start, "stop": self.stop}

    @classmethod
    def from_meta_untrusted(cls, meta: object) -> "FlushReply":
        m = as_mapping(meta)
        start, stop = _span(m, "flush reply")
        return cls(get_steps(m, "steps"), start, stop)


@dataclass(frozen=True)
class StepRef:
    """One step of a session: index and first position; carries one hidden-state tensor."""

    sid: bytes
    step: int
    pos: int

    def to_meta(self) -> dict[str, object]:
        return {"sid": self.sid, "step": self.step, "pos": self.pos}

    @classmethod
    def from_meta_untrusted(cls: type[_S], meta: object) -> _S:
        m = as_mapping(meta)
        return cls(_sid(m), get_int(m, "step", 0, MAX_STEP), get_int(m, "pos", 0, MAX_SESSION_TOKENS))


_S = TypeVar("_S", bound=StepRef)


@dataclass(frozen=True)
class Step(StepRef):
    """Push (client -> first worker, worker -> next worker) + [hidden]; ``rc``: the pushing
    worker's signed receipt for this output (sessions opened with receipts; unverified here)."""

    TOPIC: ClassVar[str] = STEP

    rc: bytes | None = None

    def to_meta(self) -> dict[str, object]:
        out = super().to_meta()
        if self.rc is not None:
            out["rc"] = self.rc
        return out

    @classmethod
    def from_meta_untrusted(cls, meta: object) -> "Step":
        base = StepRef.from_meta_untrusted(meta)
        return cls(base.sid, base.step, base.pos, _get_receipt(as_mapping(meta), "rc"))


@dataclass(frozen=True)
class Forward(StepRef):
    """Call: replay one step (rebuilds the cache) + [hidden]; the output comes back, not on."""

    METHOD: ClassVar[str] = FORWARD


@dataclass(frozen=True)
class Empty:
    """A reply with no fields (``pm.set_next``; ``pm.forward``, whose output is its tensor)."""

    def to_meta(self) -> dict[str, object]:
        return {}

    @classmethod
    def from_meta_untrusted(cls, meta: object) -> "Empty":
        as_mapping(meta)
        return cls()


@dataclass(frozen=True)
class Out:
    """Push worker -> client + one output per entry of ``steps``: the last hop's result at
    once (``final``), other hops' recovery copies every ``copies`` steps."""

    TOPIC: ClassVar[str] = OUT

    sid: bytes
    step: int
    steps: tuple[int, ...]
    final: bool
    start: int
    stop: int
    #: sessions with receipts: this hop's signed receipt for ``step`` (a pm.out goes every
    #: step then, ``steps`` empty when no recovery copy is due) and the receipt its input
    #: came with from the previous worker (``prc``; absent at the first hop). Unverified here.
    rc: bytes | None = None
    prc: bytes | None = None

    def to_meta(self) -> dict[str, object]:
        out: dict[str, object] = {"sid": self.sid, "step": self.step, "steps": list(self.steps),
                                  "final": int(self.final), "start": self.start, "stop": self.stop}
        if self.rc is not None:
            out["rc"] = self.rc
        if self.prc is not None:
            out["prc"] = self.prc
        return out

    @classmethod
    def from_meta_untrusted(cls, meta: object) -> "Out":
        m = as_mapping(meta)
        start, stop = _span(m, "out")
        return cls(_sid(m), get_int(m, "step", 0, MAX_STEP), get_steps(m, "steps"),
                   bool(get_int(m, "final", 0, 1)), start, stop, _get_receipt(m, "rc"), _get_receipt(m, "prc"))


@dataclass(frozen=True)
class ForwardReply:
    """Reply to ``pm.forward`` + [output]; ``rc``: the worker's signed receipt for it
    (sessions opened with receipts)."""

    METHOD: ClassVar[str] = FORWARD

    rc: bytes | None = None

    def to_meta(self) -> dict[str, object]:
        return {} if self.rc is None else {"rc": self.rc}

    @classmethod
    def from_meta_untrusted(cls, meta: object) -> "ForwardReply":
        return cls(_get_receipt(as_mapping(meta), "rc"))


def _get_receipt(m: Meta, key: str) -> bytes | None:
    """A signed receipt's wire bytes (capped; checked by pymesh.proto.receipts where used)."""
    if m.get(key) is None:
        return None
    return get_bytes(m, key, MAX_RECEIPT_BYTES)


@dataclass(frozen=True)
class Err:
    """Push worker -> client (or to the previous worker, who relays it): a step failed.

    ``sid`` is empty and ``step`` -1 when the failing request was too malformed to name
    them; ``blame`` is the peer the sender holds responsible (``None``: the sender itself).
    ``link`` is true when the failure is the link to ``blame`` (the sender could not deliver
    the step to its next hop): the client re-checks or relinks rather than banning ``blame``.
    """

    TOPIC: ClassVar[str] = ERR

    sid: bytes
    step: int
    code: ErrorCode
    msg: str
    start: int
    stop: int
    blame: PeerID | None = None
    link: bool = False

    def to_meta(self) -> dict[str, object]:
        out: dict[str, object] = {"sid": self.sid, "step": self.step, "code": self.code.value, "msg": self.msg,
                                  "start": self.start, "stop": self.stop,
                                  "blame": self.blame.key if self.blame is not None else b""}
        if self.link:
            out["link"] = 1
        return out

    @classmethod
    def from_meta_untrusted(cls, meta: object) -> "Err":
        m = as_mapping(meta)
        start, stop = _span(m, "err")
        return cls(get_bytes(m, "sid", MAX_SID_BYTES, min_len=0), get_int(m, "step", -1, MAX_STEP),
                   ErrorCode.parse_untrusted(get_str(m, "code", 32, default="internal")),
                   get_str(m, "msg", MAX_MESSAGE, default=""), start, stop, get_opt_peer(m, "blame"),
                   bool(get_int(m, "link", 0, 1, default=0)))


@dataclass(frozen=True)
class CheckLink(SessionRef):
    """Call (client -> each hop): is this hop's connection to the session's next hop alive?"""

    METHOD: ClassVar[str] = LINK


@dataclass(frozen=True)
class CheckLinkReply:
    """``ok``: the next hop answered a short ``pm.info`` over the worker's connection (or this is
    the last hop); ``detail`` says what was checked or what failed, for logs."""

    METHOD: ClassVar[str] = LINK

    ok: bool
    detail: str = ""

    def to_meta(self) -> dict[str, object]:
        return {"ok": int(self.ok), "detail": self.detail[:MAX_DETAIL]}

    @classmethod
    def from_meta_untrusted(cls, meta: object) -> "CheckLinkReply":
        m = as_mapping(meta)
        return cls(bool(get_int(m, "ok", 0, 1)), get_str(m, "detail", MAX_DETAIL, default=""))


__all__ = [
    "CLOSE", "ERR", "FLUSH", "FORWARD", "INFO", "LINK", "OPEN", "OUT", "SET_NEXT", "STATS", "STEP",
    "MAX_BATCH", "MAX_BLOCK", "MAX_COPY_EVERY", "MAX_COUNTER", "MAX_HIDDEN_DIMS", "MAX_HOST", "MAX_MESSAGE",
    "MAX_DETAIL", "MAX_MODEL_ID", "MAX_RECEIPT_BYTES", "SESSION_COUNTERS", "WORKER_COUNTERS", "MAX_SESSION_TOKENS", "MAX_SID_BYTES", "MAX_STEP", "MAX_STEPS_LISTED",
    "BadRequest", "ErrorCode", "AddrHint", "NextHop", "Info", "InfoReply", "Open", "OpenReply", "SetNext",
    "SessionRef", "Close", "CloseReply", "Flush", "FlushReply", "StepRef", "Step", "Forward", "ForwardReply", "Empty", "Out",
    "Err", "CheckLink", "CheckLinkReply", "Stats", "SessionCounters", "StatsReply", "Meta",
    "as_mapping", "check_hidden_shape", "check_tensor_count", "get_bytes", "get_dict", "get_int",
    "get_opt_int", "get_opt_peer", "get_peer", "get_span", "get_steps", "get_str",
]
