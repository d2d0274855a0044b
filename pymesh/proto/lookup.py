"""Iterative Kademlia lookup as a state machine (no I/O, time passed in).

Usage::

    lk = Lookup(target, table.closest(target))
    while not lk.done:
        for contact in lk.next_queries(now):      # send these (up to alpha in flight)
            ...
        lk.on_response(node_id, nodes_in_reply, now) or lk.on_timeout(node_id, now)
    lk.result()                                   # the k closest nodes that answered

Queries go to the closest not-yet-queried candidates among the k closest known
(failed ones excluded). The lookup stops when the k closest known candidates have all
answered. As in the Kademlia paper, when a whole batch brings nothing closer than the
best node already known, the next batch goes to every not-yet-queried node of the k
closest at once instead of alpha of them (``sweep=False`` keeps every batch at alpha).

Dead contacts must not stall a lookup: candidates the caller already knows to have
failed (``skip``) are never queried, and a query that outlives its (adaptive) soft
timeout is reported with :meth:`Lookup.on_slow`: the node leaves the window so the
lookup goes on without it, but a late answer still counts. :class:`RttEstimator`
gives that soft timeout from measured round-trip times.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from pymesh.proto.krpc import Addr, Contact
from pymesh.proto.routing import K

ALPHA = 3
NEW, INFLIGHT, ANSWERED, FAILED, SLOW = range(5)


@dataclass
class _Candidate:
    contact: Contact
    dist: int
    state: int = NEW


class Lookup:
    def __init__(self, target: bytes, seeds: list[Contact], *, k: int = K, alpha: int = ALPHA,
                 own_id: bytes | None = None, max_queries: int = 200, max_candidates: int = 256,
                 sweep: bool = True, skip: Callable[[Contact], bool] | None = None) -> None:
        self.target = target
        self._t = int.from_bytes(target, "big")
        self.k = k
        self.alpha = alpha
        self.own_id = own_id
        self.max_queries = max_queries
        self.max_candidates = max_candidates
        self.sweep = sweep
        self.skip = skip
        self._cands: dict[bytes, _Candidate] = {}
        self._sorted: list[_Candidate] = []
        self.rounds = 0
        self.messages = 0
        self.responses = 0
        self.timeouts = 0
        self.slow = 0       # queries past their soft timeout (not yet answered or failed)
        self.skipped = 0    # candidates never queried because they were known to have failed
        self._best_at_last_batch: int | None = None
        self._skipped_ids: list[bytes] = []
        self.add(seeds)

    # -- candidate set ---------------------------------------------------------------------
    def add(self, contacts: list[Contact]) -> None:
        changed = False
        for c in contacts:
            if c.node_id == self.own_id or c.node_id in self._cands or len(c.node_id) != 20:
                continue
            cand = _Candidate(c, int.from_bytes(c.node_id, "big") ^ self._t)
            if self.skip is not None and self.skip(c):
                cand.state = FAILED
                self.skipped += 1
                self._skipped_ids.append(c.node_id)
            self._cands[c.node_id] = cand
            self._sorted.append(cand)
            changed = True
        if changed:
            self._sorted.sort(key=lambda x: x.dist)
            if len(self._sorted) > self.max_candidates:
                for cand in self._sorted[self.max_candidates:]:
                    if cand.state == NEW:
                        del self._cands[cand.contact.node_id]
                self._sorted = [c for c in self._sorted if c.contact.node_id in self._cands]

    def _window(self) -> list[_Candidate]:
        """The k closest candidates that have not failed (nor gone past a soft timeout)."""
        out = []
        for c in self._sorted:
            if c.state not in (FAILED, SLOW):
                out.append(c)
                if len(out) == self.k:
                    break
        return out

    def _best(self) -> int | None:
        for c in self._sorted:
            if c.state not in (FAILED, SLOW):
                return c.dist
        return None

    # -- driving ---------------------------------------------------------------------------
    @property
    def inflight(self) -> int:
        return sum(1 for c in self._sorted if c.state == INFLIGHT)

    @property
    def done(self) -> bool:
        window = self._window()
        if self.messages >= self.max_queries:
            return self.inflight == 0
        if not window and self._stuck():
            return False  # next_queries asks the skipped contacts after all
        if not window:
            # Nothing left to ask. Wait for late answers only if nobody has answered at
            # all (a lone slow bootstrap node); otherwise a slow node is not waited for.
            return self.inflight == 0 and (self.responses > 0 or self.pending_slow == 0)
        return all(c.state == ANSWERED for c in window)

    def _stuck(self) -> bool:
        """Every candidate was skipped as recently failed and nobody has answered: the
        memory of failures must not isolate a node (e.g. after its own network was down)."""
        return bool(self._skipped_ids) and self.responses == 0 and self.inflight == 0 \
            and self.pending_slow == 0 and not any(c.state == NEW for c in self._sorted)

    def next_queries(self, now: float) -> list[Contact]:
        """Contacts to query now (marks them in flight). Empty when waiting or done."""
        if self._stuck():
            for nid in self._skipped_ids:
                cand = self._cands.get(nid)
                if cand is not None and cand.state == FAILED:
                    cand.state = NEW
            self._skipped_ids.clear()
        if self.done:
            return []
        inflight = self.inflight
        fresh = [c for c in self._window() if c.state == NEW]
        if not fresh:
            return []
        best = self._best()
        if self.sweep and inflight == 0 and self._best_at_last_batch is not None \
                and best == self._best_at_last_batch:
            batch = fresh  # no progress in the last batch: query the rest of the k closest
        else:
            batch = fresh[: max(0, self.alpha - inflight)]
        batch = batch[: max(0, self.max_queries - self.messages)]
        if not batch:
            return []
        for c in batch:
            c.state = INFLIGHT
        self.messages += len(batch)
        self.rounds += 1
        self._best_at_last_batch = best
        return [c.contact for c in batch]

    @property
    def pending_slow(self) -> int:
        return sum(1 for c in self._sorted if c.state == SLOW)

    def on_slow(self, node_id: bytes, now: float) -> bool:
        """``node_id`` has not answered within its soft timeout: stop waiting for it
        (its slot goes to the next candidate) but accept a late answer. Returns whether
        the query was still in flight."""
        cand = self._cands.get(node_id)
        if cand is None or cand.state != INFLIGHT:
            return False
        cand.state = SLOW
        self.slow += 1
        return True

    def on_response(self, node_id: bytes, contacts: list[Contact], now: float) -> None:
        cand = self._cands.get(node_id)
        if cand is None or cand.state not in (INFLIGHT, SLOW):
            return
        cand.state = ANSWERED
        self.responses += 1
        self.add(contacts)

    def on_timeout(self, node_id: bytes, now: float) -> None:
        cand = self._cands.get(node_id)
        if cand is None or cand.state not in (INFLIGHT, SLOW):
            return
        cand.state = FAILED
        self.timeouts += 1

    def result(self) -> list[Contact]:
        """The k closest candidates that answered, closest first."""
        out = [c.contact for c in self._sorted if c.state == ANSWERED]
        return out[: self.k]

    def answered(self) -> list[Contact]:
        return [c.contact for c in self._sorted if c.state == ANSWERED]


class RttEstimator:
    """Smoothed round-trip times (per address, and over all addresses) that give each
    query a soft timeout: ``max(floor, 4 x srtt)`` capped by the hard RPC timeout. With no
    measurement yet the soft timeout is the hard one."""

    def __init__(self, *, floor: float = 0.25, gain: float = 0.125, max_addrs: int = 4096) -> None:
        self.floor = floor
        self.gain = gain
        self.max_addrs = max_addrs
        self.srtt: float | None = None
        self._by_addr: OrderedDict[Addr, float] = OrderedDict()

    def observe(self, addr: Addr, rtt: float) -> None:
        rtt = max(0.0, rtt)
        self.srtt = rtt if self.srtt is None else self.srtt + self.gain * (rtt - self.srtt)
        old = self._by_addr.pop(addr, None)
        self._by_addr[addr] = rtt if old is None else old + self.gain * (rtt - old)
        if len(self._by_addr) > self.max_addrs:
            self._by_addr.popitem(last=False)

    def soft_timeout(self, addr: Addr, cap: float) -> float:
        srtt = self._by_addr.get(addr, self.srtt)
        if srtt is None:
            return cap
        return min(cap, max(self.floor, 4 * srtt))
