"""Inference-session bookkeeping on a worker: memory budget, step order, expiry. Pure.

A session reserves ``max_tokens * batch`` cache tokens out of the worker's budget
(``--cache-tokens``) for its whole life; a session that does not fit is refused so
the client can go elsewhere. Admission is fair (:mod:`pymesh.worker.admission`): a
reservation that receives no step lapses after ``lapse`` seconds (re-opening does not
extend it), and when the cache is full a peer (or address) holding more than its share
loses its idle sessions to a newcomer within its share. Steps carry (step index, start
position); a worker accepts the next step, or the previous one again (a retry after a
fault downstream: the forward pass overwrites the same cache positions) at most
``MAX_RETRIES`` times, and rejects anything older.
Time is an argument (``now``), so expiry is tested without sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pymesh.errors import PymeshError
from pymesh.proto.frames import TensorBlob
from pymesh.proto.identity import PeerID
from pymesh.proto.session_wire import ErrorCode, NextHop
from pymesh.worker.admission import Admission, lapsed, make_room

#: times one step may be retried (the same step pushed again) before it is refused
MAX_RETRIES = 3

if TYPE_CHECKING:
    from pymesh.model.kv_cache import KVCache
    from pymesh.net.rpc import Connection
    from pymesh.worker.directory import NextAddr


class SessionError(PymeshError):
    """A session request cannot be served; ``code`` is the RemoteError code to answer with."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Session:
    sid: bytes
    client: PeerID
    max_tokens: int
    batch: int
    next_hop: NextHop | None       # what the client asked for (peer + span)
    opened: float
    last_used: float
    next_addr: "NextAddr | None" = None   # where that peer's verified record says it listens
    cache: "KVCache | None" = None   # the runtime's KV cache (none in echo mode)
    client_conn: "Connection | None" = None   # the connection the client opened the session on
    next_step: int = 0             # index of the step expected next
    length: int = 0                # tokens written to the cache so far
    last_pos: int = 0              # start position of the last processed step
    last_seq: int = 0
    busy: bool = False
    from_client: int = 0           # step inputs received straight from the client
    from_peer: int = 0             # step inputs pushed by the previous worker
    replayed: int = 0
    copy_every: int = 1            # push recovery copies to the client every N steps
    pending: dict[int, TensorBlob] = field(default_factory=dict)   # step -> output not yet copied to the client
    prev: PeerID | None = None     # who pushes this hop its steps (None: the client)
    host: str | None = None        # the client's address, when the transport knows it
    stepped: bool = False          # received a step (a reservation that never does lapses)
    retries: int = 0               # retries of the last step so far
    waiting: set[int] = field(default_factory=set)   # future steps waiting for their predecessor
    receipts: bool = False         # opened with receipts: verify pushed ones, sign one per step

    @property
    def sender(self) -> PeerID:
        """The one peer allowed to push this session's steps."""
        return self.prev if self.prev is not None else self.client

    @property
    def reserved(self) -> int:
        return self.max_tokens * self.batch


@dataclass
class SessionTable:
    budget_tokens: int
    idle_timeout: float
    lapse: float = 30.0            # seconds a reservation may wait for its first step
    share: float = 0.5             # of the budget, beyond which a peer's idle sessions can be evicted
    sessions: dict[bytes, Session] = field(default_factory=dict)
    expired: int = 0
    refused: int = 0
    evicted: int = 0

    @property
    def used_tokens(self) -> int:
        return sum(s.reserved for s in self.sessions.values())

    @property
    def free_tokens(self) -> int:
        return max(self.budget_tokens - self.used_tokens, 0)

    def open(
        self,
        sid: bytes,
        client: PeerID,
        max_tokens: int,
        batch: int,
        next_hop: NextHop | None,
        now: float,
        *,
        host: str | None = None,
    ) -> Session:
        if not 1 <= len(sid) <= 64:
            raise SessionError(ErrorCode.BAD_REQUEST, "session id must be 1..64 bytes")
        if max_tokens <= 0 or batch <= 0:
            raise SessionError(ErrorCode.BAD_REQUEST, f"max_tokens ({max_tokens}) and batch ({batch}) must be positive")
        existing = self.sessions.get(sid)
        if existing is not None:
            if existing.client != client:
                raise SessionError(ErrorCode.BAD_REQUEST, "session id already in use by another client")
            # Re-opening (e.g. after a client-side retry): keep the cache, update the route.
            # It does not count as use: a reservation that never got a step still lapses.
            existing.next_hop = next_hop
            return existing
        need = max_tokens * batch
        if need > self.free_tokens:
            self._drop(lapsed(self.sessions.values(), now, self.lapse))
        if need > self.free_tokens:
            ask = Admission(client, host, need)
            self._drop(make_room(self.sessions.values(), ask, self.budget_tokens, self.share, now))
        if need > self.free_tokens:
            self.refused += 1
            raise SessionError(
                ErrorCode.REFUSED,
                f"session needs {need} cache tokens but only {self.free_tokens} of {self.budget_tokens} "
                "are free on this worker; use another worker or a shorter max_tokens",
            )
        s = Session(sid, client, max_tokens, batch, next_hop, opened=now, last_used=now, host=host)
        self.sessions[sid] = s
        return s

    def _drop(self, victims: list[Session]) -> None:
        for v in victims:
            del self.sessions[v.sid]
        self.evicted += len(victims)

    def get(self, sid: bytes, now: float | None = None) -> Session:
        s = self.sessions.get(sid)
        if s is None:
            raise SessionError(
                ErrorCode.NOT_FOUND,
                "no such session on this worker (expired, closed or never opened); reopen it and replay",
            )
        if now is not None:
            s.last_used = now
        return s

    def close(self, sid: bytes) -> bool:
        return self.sessions.pop(sid, None) is not None

    def expire(self, now: float) -> list[bytes]:
        """Drop sessions idle for longer than ``idle_timeout`` and reservations that got no step
        within ``lapse``; returns their ids."""
        unused = {s.sid for s in lapsed(self.sessions.values(), now, self.lapse)}
        gone = [
            sid
            for sid, s in self.sessions.items()
            if not s.busy and (now - s.last_used > self.idle_timeout or sid in unused)
        ]
        for sid in gone:
            del self.sessions[sid]
        self.expired += len(gone)
        return gone

    def clear(self) -> int:
        n = len(self.sessions)
        self.sessions.clear()
        return n


def check_step(s: Session, step: int, start_pos: int, seq: int) -> str:
    """Classify an incoming step: "next", "retry" or "future"; raise on a stale or bad one.

    "future" means an earlier step has not been processed yet: the caller waits briefly
    for it and checks again.
    """
    if seq <= 0:
        raise SessionError(ErrorCode.BAD_REQUEST, f"step {step} carries no tokens")
    if step == s.next_step:
        if start_pos != s.length:
            raise SessionError(
                ErrorCode.BAD_REQUEST,
                f"step {step} starts at position {start_pos} but the session holds {s.length} tokens",
            )
        kind = "next"
    elif step == s.next_step - 1 and step >= 0:
        if start_pos != s.last_pos or seq != s.last_seq:
            raise SessionError(
                ErrorCode.BAD_REQUEST,
                f"retry of step {step} at position {start_pos} (x{seq}) does not match the original "
                f"(position {s.last_pos}, x{s.last_seq})",
            )
        if s.retries >= MAX_RETRIES:
            raise SessionError(
                ErrorCode.BAD_REQUEST,
                f"step {step} was already retried {s.retries} times; reopen the session and replay it",
            )
        kind = "retry"
    elif step > s.next_step:
        return "future"
    else:
        raise SessionError(
            ErrorCode.BAD_REQUEST, f"stale step {step}: the session is at step {s.next_step}"
        )
    if start_pos + seq > s.max_tokens:
        raise SessionError(
            ErrorCode.REFUSED,
            f"step {step} would write positions up to {start_pos + seq} but the session reserved "
            f"{s.max_tokens} tokens",
        )
    return kind


def advance(s: Session, step: int, start_pos: int, seq: int) -> None:
    """Record that ``step`` was computed (after :func:`check_step` said next or retry)."""
    s.stepped = True
    if step == s.next_step:
        s.retries = 0
        s.next_step += 1
        s.length = start_pos + seq
        s.last_pos = start_pos
        s.last_seq = seq
    else:
        s.retries += 1
