"""The ``pm.stats`` messages: a worker's counters, and one session's for its client.

Part of the session protocol (:mod:`pymesh.proto.session_wire` re-exports them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pymesh.proto.session_fields import as_mapping, get_bytes, get_int, get_span

STATS = "pm.stats"
MAX_COUNTER = 1 << 62
MAX_SID_BYTES = 64


@dataclass(frozen=True)
class Stats:
    """Call: the worker's counters, and one session's when ``sid`` is given."""

    METHOD: ClassVar[str] = STATS

    sid: bytes | None = None

    def to_meta(self) -> dict[str, object]:
        return {} if self.sid is None else {"sid": self.sid}

    @classmethod
    def from_meta_untrusted(cls, meta: object) -> "Stats":
        m = as_mapping(meta)
        return cls(None if m.get("sid") is None else get_bytes(m, "sid", MAX_SID_BYTES))


@dataclass(frozen=True)
class SessionCounters:
    from_client: int       # step inputs received straight from the client
    from_peer: int         # step inputs pushed by the previous worker
    steps: int             # steps done (the index of the next one)
    replayed: int


WORKER_COUNTERS = ("from_client", "from_peer", "steps", "replayed", "errors", "compute_us", "sessions",
                    "free", "total", "expired", "refused", "forwards")
SESSION_COUNTERS = ("s_from_client", "s_from_peer", "s_steps", "s_replayed")


@dataclass(frozen=True)
class StatsReply:
    METHOD: ClassVar[str] = STATS

    from_client: int
    from_peer: int
    steps: int
    replayed: int
    errors: int
    compute_us: int
    sessions: int
    free: int
    total: int
    expired: int
    refused: int
    start: int
    stop: int
    session: SessionCounters | None = None
    #: forward passes run: fewer than ``steps`` when steps of different sessions were batched
    forwards: int = 0

    def to_meta(self) -> dict[str, object]:
        out: dict[str, object] = {k: getattr(self, k) for k in WORKER_COUNTERS}
        out.update(start=self.start, stop=self.stop)
        if self.session is not None:
            s = self.session
            out.update(s_from_client=s.from_client, s_from_peer=s.from_peer, s_steps=s.steps,
                       s_replayed=s.replayed)
        return out

    @classmethod
    def from_meta_untrusted(cls, meta: object) -> "StatsReply":
        m = as_mapping(meta)
        c = {k: get_int(m, k, 0, MAX_COUNTER) for k in (*WORKER_COUNTERS, *SESSION_COUNTERS)
             if k in WORKER_COUNTERS or m.get("s_steps") is not None}
        start, stop = get_span(m, "stats")
        session = None
        if "s_steps" in c:
            session = SessionCounters(c["s_from_client"], c["s_from_peer"], c["s_steps"], c["s_replayed"])
        return cls(c["from_client"], c["from_peer"], c["steps"], c["replayed"], c["errors"], c["compute_us"],
                   c["sessions"], c["free"], c["total"], c["expired"], c["refused"], start, stop, session,
                   c["forwards"])


