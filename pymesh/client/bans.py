"""What the client holds against workers: bans, soft penalties and failed probes. No I/O.

A **ban** keeps a worker out of every route for ``ban_seconds``. Its cause decides whether
a new incarnation of the worker lifts it early: a worker that timed out, was unreachable or
reported a failure may have been restarted (a crash plus a service manager restart keeps
its identity and port), so a record it signs later than the newest one the client knew
when it banned it lifts the ban. A wrong answer (an output of the wrong shape, dtype or
with non-finite values) is the worker's own doing and is never lifted early.

A **conviction** (``convict``) is a ban without an end: a verified-inference check proved
the worker wrong (equivocation, a receipt its own tensor contradicts, a spot check two other
providers decided against it). Only an explicit ``lift`` ends it, no other ban replaces it,
and waiting for bans to end never waits for it (:meth:`BanBook.earliest_end`). Convictions
that outlive the process live in the blocklist file (:mod:`pymesh.client.blocklist`).

A **penalty** (``deprioritise``) makes route choice avoid a worker while another one
serves the same blocks, without excluding it: a hop-to-hop link failure puts it on the
worker *behind* the link, which may be perfectly healthy.

A **pair penalty** (``avoid_pair``) makes route choice avoid one hop-to-successor link
(the hop has no record it trusts of that successor: allowlists that differ between
workers, or a record it has not seen yet) while another route exists, without holding
anything against either worker on other routes.

A **failed probe** (an RTT measurement that got no answer) is remembered for the record it
was made for, so every route search does not wait for the same dead address again; a
newer record (another address, or a restart) is probed afresh.
"""

from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable

from pymesh.proto.identity import PeerID
from pymesh.proto.records import WorkerRecord

log = logging.getLogger(__name__)

#: extra route cost (milliseconds) of a deprioritised worker: more than any real hop
PENALTY_MS = 60_000.0


class BanCause(enum.Enum):
    TIMEOUT = "timeout"            # silent, or no result in time
    UNREACHABLE = "unreachable"    # could not connect / open a session
    FAILED = "failed"              # reported an error on our session
    WRONG_ANSWER = "wrong answer"  # sent an output that cannot be right
    CONVICTED = "convicted"        # a verified-inference check proved it wrong: permanent

    @property
    def liftable(self) -> bool:
        """Whether a newer record of the worker (a new incarnation) lifts a ban of this cause."""
        return self not in (BanCause.WRONG_ANSWER, BanCause.CONVICTED)


@dataclass(frozen=True)
class Ban:
    until: float          # on the book's monotonic clock; math.inf: convicted, never ends
    cause: BanCause
    why: str
    record_ts: float      # newest record timestamp of the peer known when it was banned


class BanBook:
    """Bans, penalties and failed probes on a monotonic clock ``now`` (seconds)."""

    def __init__(self, now: Callable[[], float], ban_seconds: float, *, penalty_seconds: float | None = None,
                 probe_memory: float | None = None) -> None:
        self.now = now
        self.ban_seconds = ban_seconds
        self.penalty_seconds = ban_seconds if penalty_seconds is None else penalty_seconds
        self.probe_memory = ban_seconds if probe_memory is None else probe_memory
        self._bans: dict[PeerID, Ban] = {}
        self._penalties: dict[PeerID, float] = {}
        self._pairs: dict[tuple[PeerID, PeerID], float] = {}
        self._failed_probes: dict[tuple[PeerID, str, int, float], float] = {}
        #: newest record timestamp seen per peer (what a later record must beat to lift a ban)
        self.newest_ts: dict[PeerID, float] = {}

    # -- bans ------------------------------------------------------------------------------
    def ban(self, peer: PeerID, why: str, cause: BanCause) -> Ban:
        """Ban ``peer``; a stronger cause is never replaced by a liftable one, and a
        conviction is never replaced at all (the conviction is returned)."""
        old = self.active().get(peer)
        if old is not None and old.cause is BanCause.CONVICTED:
            return old
        if old is not None and not old.cause.liftable and cause.liftable:
            cause = old.cause
        ban = Ban(self.now() + self.ban_seconds, cause, why, self.newest_ts.get(peer, 0.0))
        self._bans[peer] = ban
        return ban

    def convict(self, peer: PeerID, why: str) -> Ban:
        """Ban ``peer`` for good (:attr:`BanCause.CONVICTED`, ``until`` = inf); a peer already
        convicted keeps its first conviction."""
        old = self._bans.get(peer)
        if old is not None and old.cause is BanCause.CONVICTED:
            return old
        ban = Ban(math.inf, BanCause.CONVICTED, why, self.newest_ts.get(peer, 0.0))
        self._bans[peer] = ban
        return ban

    def convicted(self) -> dict[PeerID, Ban]:
        """The convicted peers (their bans never end)."""
        return {p: b for p, b in self._bans.items() if b.cause is BanCause.CONVICTED}

    def active(self) -> dict[PeerID, Ban]:
        now = self.now()
        for p in [p for p, b in self._bans.items() if b.until <= now]:
            del self._bans[p]
        return dict(self._bans)

    def lift(self, peer: PeerID) -> Ban | None:
        return self._bans.pop(peer, None)

    def earliest_end(self, peers: Iterable[PeerID]) -> float | None:
        """When the first of ``peers``' bans ends (None: none of them is banned, or only
        convicted ones: their bans never end, so there is nothing to wait for)."""
        bans = self.active()
        ends = [bans[p].until for p in peers if p in bans and math.isfinite(bans[p].until)]
        return min(ends) if ends else None

    def see(self, records: Iterable[WorkerRecord]) -> list[tuple[PeerID, Ban]]:
        """Note the records' timestamps; returns the bans that a newer incarnation lifted."""
        lifted = []
        bans = self.active()
        for r in records:
            ban = bans.get(r.peer_id)
            if ban is not None and ban.cause.liftable and r.timestamp > ban.record_ts:
                del self._bans[r.peer_id]
                del bans[r.peer_id]
                self._penalties.pop(r.peer_id, None)
                lifted.append((r.peer_id, ban))
            if r.timestamp > self.newest_ts.get(r.peer_id, 0.0):
                self.newest_ts[r.peer_id] = r.timestamp
        return lifted

    # -- penalties -------------------------------------------------------------------------
    def deprioritise(self, peer: PeerID) -> None:
        self._penalties[peer] = self.now() + self.penalty_seconds

    def penalised(self) -> set[PeerID]:
        now = self.now()
        for p in [p for p, until in self._penalties.items() if until <= now]:
            del self._penalties[p]
        return set(self._penalties)

    def avoid_pair(self, hop: PeerID, successor: PeerID) -> None:
        self._pairs[(hop, successor)] = self.now() + self.penalty_seconds

    def avoided_pairs(self) -> set[tuple[PeerID, PeerID]]:
        now = self.now()
        for k in [k for k, until in self._pairs.items() if until <= now]:
            del self._pairs[k]
        return set(self._pairs)

    # -- failed probes ---------------------------------------------------------------------
    def probe_failed(self, record: tuple[PeerID, str, int, float]) -> None:
        """An RTT probe of (peer, host, port, record timestamp) got no answer."""
        self._failed_probes[record] = self.now() + self.probe_memory

    def probe_recently_failed(self, record: tuple[PeerID, str, int, float]) -> bool:
        now = self.now()
        for k in [k for k, until in self._failed_probes.items() if until <= now]:
            del self._failed_probes[k]
        return record in self._failed_probes

