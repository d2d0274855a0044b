"""Which other workers' records placement may count: those whose address answers as the record says.

A record is signed by its worker's key, but anyone can sign a record for an address where
nothing listens. Counted as coverage, such records hide real gaps (a joining worker avoids
blocks nobody serves) and, coming and going, fake gaps. So before placement counts a record
its address is probed (``probe``: a ``pm.info`` through the worker's own node, answered by
that peer's key for that model and span) and the answer remembered:

- a confirmed (peer, host, port, span) stays confirmed for ``ttl`` seconds across the
  worker's heartbeats (each re-signs its record with a new timestamp);
- a failure is remembered per (peer, host, port, timestamp) for ``ttl`` seconds: the same
  record is not probed again, a new one (a restarted worker) is probed at once;
- at most ``max_probes`` records are probed per round, chosen at random among the unknown
  ones, each within ``timeout`` seconds, all at once: a flood of fake records costs a bounded
  number of dials and seconds per round, and cannot starve honest records for long.

Records left unprobed by the bound are not counted and are reported as ``unknown``.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Hashable, Sequence, TypeVar

import trio

from pymesh.net.clock import Clock
from pymesh.proto.identity import PeerID
from pymesh.proto.records import WorkerRecord

log = logging.getLogger(__name__)

#: answers whether the worker behind a record answers at its address as that record says
Probe = Callable[[WorkerRecord], Awaitable[bool]]

_Good = tuple[PeerID, str, int, int, int]        # peer, host, port, start, stop
_Bad = tuple[PeerID, str, int, float]            # peer, host, port, timestamp
_K = TypeVar("_K", bound=Hashable)


@dataclass(frozen=True)
class Reachable:
    """The records placement may count, and how many were left unprobed this round."""

    records: list[WorkerRecord]
    unknown: int


@dataclass
class ReachabilityCache:
    probe: Probe
    clock: Clock
    ttl: float = 300.0
    max_probes: int = 16
    timeout: float = 3.0
    max_entries: int = 4096
    rng: random.Random = field(default_factory=random.Random)
    _good: dict[_Good, float] = field(default_factory=dict)
    _bad: dict[_Bad, float] = field(default_factory=dict)
    probes: int = 0                                   # probes sent so far (for tests and logs)

    def known(self, rec: WorkerRecord) -> bool | None:
        """True/False if ``rec``'s address answered/failed within ``ttl``; None if not known."""
        now = self.clock.monotonic()
        at = self._good.get(_good_key(rec))
        if at is not None and now - at < self.ttl:
            return True
        at = self._bad.get(_bad_key(rec))
        if at is not None and now - at < self.ttl:
            return False
        return None

    async def reachable(self, records: Sequence[WorkerRecord]) -> Reachable:
        """The records whose worker answered (probing at most ``max_probes`` unknown ones now)."""
        self._prune()
        unknown = [r for r in records if self.known(r) is None]
        self.rng.shuffle(unknown)
        batch, left = unknown[:self.max_probes], len(unknown) - min(len(unknown), self.max_probes)
        if batch:
            async with trio.open_nursery() as nursery:
                for rec in batch:
                    nursery.start_soon(self._probe_one, rec)
        if left:
            log.info("placement: %d record(s) left unprobed this round (at most %d probes per round)",
                     left, self.max_probes)
        return Reachable([r for r in records if self.known(r)], left)

    async def _probe_one(self, rec: WorkerRecord) -> None:
        self.probes += 1
        ok = False
        with trio.move_on_after(self.timeout):
            ok = await self.probe(rec)
        now = self.clock.monotonic()
        if ok:
            self._good[_good_key(rec)] = now
        else:
            log.info("placement ignores the record of %s for blocks %d-%d: nothing answered as it at %s:%d",
                     rec.peer_id.short(), rec.start, rec.stop - 1, rec.host, rec.port)
            self._bad[_bad_key(rec)] = now

    def _prune(self) -> None:
        now = self.clock.monotonic()
        self._good = _fresh(self._good, now, self.ttl, self.max_entries)
        self._bad = _fresh(self._bad, now, self.ttl, self.max_entries)


def _fresh(table: dict[_K, float], now: float, ttl: float, cap: int) -> dict[_K, float]:
    """The entries younger than ``ttl``, at most ``cap`` of them (the newest)."""
    kept = [(k, at) for k, at in table.items() if now - at < ttl]
    kept.sort(key=lambda item: item[1])
    return dict(kept[-cap:]) if len(kept) > cap else dict(kept)


def _good_key(rec: WorkerRecord) -> _Good:
    return (rec.peer_id, rec.host, rec.port, rec.start, rec.stop)


def _bad_key(rec: WorkerRecord) -> _Bad:
    return (rec.peer_id, rec.host, rec.port, rec.timestamp)
