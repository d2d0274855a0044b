"""The client's memory of worker records across DHT lookups. Pure, no I/O.

One lookup sees what the nodes it happened to ask hold; while nodes join and leave (a new
node becomes one of the closest to the model's key before the records reach it, or a
holder stops answering) two lookups can return different subsets. :class:`RecordBook`
keeps the union: per worker the record with the newest timestamp wins (an offline record
replaces the online one it follows), and a record no lookup has returned for the record
TTL is forgotten (the DHT checks the TTL itself when it answers). Records of workers an allowlist refuses never enter.
"""

from __future__ import annotations

from typing import Callable, Iterable

from pymesh.proto.identity import PeerID
from pymesh.proto.records import WorkerRecord


class RecordBook:
    """Newest record per worker of one model, forgotten ``ttl`` seconds (of the clock
    ``now``) after a lookup last returned it; ``allow`` filters the signers (None: everyone)."""

    def __init__(self, model_id: str, now: Callable[[], float], ttl: float,
                 allow: Callable[[PeerID], bool] | None = None) -> None:
        self.model_id = model_id
        self.now = now
        self.ttl = ttl
        self.allow = allow
        self._by_peer: dict[PeerID, WorkerRecord] = {}
        self._seen: dict[PeerID, float] = {}
        #: records dropped because the allowlist refuses their signer (for messages)
        self.refused = 0

    def merge(self, records: Iterable[WorkerRecord]) -> list[WorkerRecord]:
        """Add a lookup's records; returns those that were new or newer than what we held."""
        fresh = []
        now = self.now()
        for r in records:
            if r.model_id != self.model_id:
                continue
            if self.allow is not None and not self.allow(r.peer_id):
                self.refused += 1
                continue
            old = self._by_peer.get(r.peer_id)
            if old is None or r.timestamp > old.timestamp:
                self._by_peer[r.peer_id] = r
                fresh.append(r)
            if r.timestamp >= self._by_peer[r.peer_id].timestamp:
                self._seen[r.peer_id] = now
        return fresh

    def forget(self, peer: PeerID) -> None:
        self._by_peer.pop(peer, None)
        self._seen.pop(peer, None)

    def all(self) -> list[WorkerRecord]:
        """Unexpired records, offline ones included, in (start, peer) order."""
        horizon = self.now() - self.ttl
        for p in [p for p, seen in self._seen.items() if seen < horizon]:
            self.forget(p)
        return sorted(self._by_peer.values(), key=lambda r: (r.start, r.peer_id.key))

    def live(self) -> list[WorkerRecord]:
        """Unexpired records of workers that did not announce going offline."""
        return [r for r in self.all() if r.live]
