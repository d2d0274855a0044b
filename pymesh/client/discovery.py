"""The client's memory of worker records across DHT lookups. Pure, no I/O.

One lookup sees what the nodes it happened to ask hold; while nodes join and leave (a new
node becomes one of the closest to the model's key before the records reach it, or a
holder stops answering) two lookups can return different subsets. :class:`RecordBook`
keeps the union: per worker the record with the newest timestamp wins (an offline record
replaces the online one it follows), and a record no lookup has returned for the record
TTL is forgotten (the DHT checks the TTL itself when it answers). Records of workers an allowlist refuses never enter.

Quantizations (issue 15): lookups return the records of every quantization of the model's
base id. Only those of the client's full id (``name@fp:q8_0`` or ``name@fp``) are routed
through, since mixing precisions changes the numbers, unless ``allow_mixed``; the others
are kept so that :meth:`RecordBook.mixed_hint` can say which quantizations serve a block
nobody of the client's own serves.
"""

from __future__ import annotations

from typing import Callable, Iterable

from pymesh.proto.identity import PeerID
from pymesh.proto.records import WorkerRecord, base_model_id, split_model_id
from pymesh.proto.vocab import WorkerState


class RecordBook:
    """Newest record per worker of one model, forgotten ``ttl`` seconds (of the clock
    ``now``) after a lookup last returned it; ``allow`` filters the signers (None: everyone);
    ``allow_mixed``: records of every quantization of the model are routed through."""

    def __init__(self, model_id: str, now: Callable[[], float], ttl: float,
                 allow: Callable[[PeerID], bool] | None = None, *, allow_mixed: bool = False) -> None:
        self.model_id = model_id
        self.base_id = base_model_id(model_id)
        self.allow_mixed = allow_mixed
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
            if r.base_id != self.base_id:
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

    def usable(self, record: WorkerRecord) -> bool:
        """Whether routes may use ``record``'s worker: the client's own quantization, or any
        quantization of the model with ``allow_mixed``."""
        return self.allow_mixed or record.model_id == self.model_id

    def _unexpired(self) -> list[WorkerRecord]:
        horizon = self.now() - self.ttl
        for p in [p for p, seen in self._seen.items() if seen < horizon]:
            self.forget(p)
        return sorted(self._by_peer.values(), key=lambda r: (r.start, r.peer_id.key))

    def all(self) -> list[WorkerRecord]:
        """Unexpired records routes may use (:meth:`usable`), offline ones included, in
        (start, peer) order."""
        return [r for r in self._unexpired() if self.usable(r)]

    def others(self) -> list[WorkerRecord]:
        """Unexpired online records of the model's other quantizations (not usable here)."""
        return [r for r in self._unexpired() if not self.usable(r) and r.state == WorkerState.ONLINE]

    def mixed_hint(self, block: int | None) -> str | None:
        """Why a block no usable worker serves could still be served: which other
        quantizations of the model serve it (``block`` None: any block), and what to pass
        to use them. None when no other quantization serves it."""
        return mixed_hint(self.model_id, [r for r in self.others() if block is None or r.covers(block)], block)

    def live(self) -> list[WorkerRecord]:
        """Unexpired records of workers that did not announce going offline."""
        return [r for r in self.all() if r.live]


def mixed_hint(model_id: str, others: list[WorkerRecord], block: int | None) -> str | None:
    """The advice :meth:`RecordBook.mixed_hint` gives, from the records of other quantizations
    that serve ``block``. Pure."""
    if not others:
        return None
    counts: dict[str, int] = {}
    for r in others:
        label = r.quant or "float"
        counts[label] = counts.get(label, 0) + 1
    served = ", ".join(f"{q} ({n} worker{'s' if n > 1 else ''})" for q, n in sorted(counts.items()))
    where = f"layer {block}" if block is not None else "the missing layers"
    mine = split_model_id(model_id)[1] or "float"
    ways = [f"--quantize {q}" for q in sorted(counts) if q != "float"]
    if "float" in counts:
        ways.append("no --quantize (float weights)")
    return (f"{where} is served only by other quantizations of this model: {served}, while this client "
            f"computes in {mine} ({model_id}); run the client with {' or '.join(ways)} (or --model-path the "
            "GGUF file those workers load) to use them, or with --allow-mixed to route through every "
            "quantization (mixing precisions changes the outputs)")
