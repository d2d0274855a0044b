"""An in-process DHT network simulator (no sockets, no clock: virtual time).

Every simulated node runs the real sans-I/O :class:`~pymesh.proto.dht_core.DHTCore`;
the simulator encodes each query with the sender's core, delivers the bytes to the
receiver's ``receive`` and the reply bytes back, so every message is a real KRPC
packet. Nodes join only through one bootstrap node and a lookup of their own ID.
Departed nodes stop answering: queries to them time out. A *round* is one batch of
queries issued together by the lookup state machine (alpha of them, or the rest of
the k closest when a batch brought nothing closer); all of a batch's answers arrive
before the next batch.

:func:`simulate` measures, for one network size: success_rate (lookups returning exactly
the true k closest live nodes other than the searcher), median_rounds, p95_rounds,
messages_per_lookup, plus ``join`` ("full": own-ID lookup then one lookup into each
still-sparse far bucket; "light": own-ID lookup only) and ``lookups``.
``alpha_only_success_rate`` / ``alpha_only_median_rounds`` repeat the measurement with
lookups whose batches never exceed alpha queries (no final sweep of the k closest).
After ``churn`` of the nodes leave, 15 virtual minutes pass and every live node pings its
questionable routing-table entries once (BEP 5's timers), then lookups are measured.
As in the real node, a contact that failed to answer is skipped by that node's later
lookups; ``dead_queries_per_lookup`` is how many queries a lookup still sent to
departed nodes. ``pymesh bench dht`` (:mod:`pymesh.bench.dht`) prints these rows.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from typing import Any, Callable

from pymesh.proto import krpc
from pymesh.proto.dht_core import DHTCore
from pymesh.proto.krpc import Addr, Contact, Response
from pymesh.proto.lookup import Lookup

ROUND_TRIP = 0.05   # virtual seconds a round takes when every node answers
TIMEOUT = 2.0       # virtual seconds a query to a departed node costs


@dataclass
class LookupStats:
    ok: bool
    rounds: int
    messages: int
    dead: int = 0


class SimNetwork:
    """A network of DHTCore nodes exchanging encoded KRPC packets in memory."""

    def __init__(self, *, seed: int = 1, k: int = 8, alpha: int = 3) -> None:
        self.rng = random.Random(seed)
        self.k = k
        self.alpha = alpha
        self.now = 1_700_000_000.0
        self.cores: dict[Addr, DHTCore] = {}
        self.ids: dict[Addr, bytes] = {}
        self.alive: set[Addr] = set()
        self.messages = 0
        self.dead_queries = 0
        self.bootstrap: Addr | None = None
        #: How many still-sparse far buckets a joining node fills with a lookup.
        self.join_refresh = 160

    def _new_addr(self, i: int) -> Addr:
        return (f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", 6881)

    def add_node(self) -> Addr:
        i = len(self.cores) + 1
        addr = self._new_addr(i)
        node_id = self.rng.getrandbits(160).to_bytes(20, "big")
        core = DHTCore(node_id, now=self.now, k=self.k, rng=random.Random(self.rng.getrandbits(32)))
        self.cores[addr] = core
        self.ids[addr] = node_id
        self.alive.add(addr)
        if self.bootstrap is None:
            self.bootstrap = addr
        return addr

    def leave(self, addr: Addr) -> None:
        self.alive.discard(addr)

    # -- message delivery ----------------------------------------------------------------
    def query(self, src: Addr, dst: Addr, method: bytes, args: dict[bytes, object],
              expect_id: bytes | None = None) -> Response | None:
        """Deliver one query and its reply; None means it timed out."""
        core = self.cores[src]
        tid, data = core.make_query(method, args)
        self.messages += 1
        if dst not in self.alive:
            self.dead_queries += 1
            if expect_id is not None:
                core.note_timeout(expect_id, self.now, dst)
            return None
        remote = self.cores[dst]
        inc = remote.receive(data, src, self.now)
        self._pings(dst, inc.pings)
        if inc.reply is None:
            return None
        back = core.receive(inc.reply, dst, self.now)
        msg = back.message
        if not isinstance(msg, Response) or msg.tid != tid:
            return None
        self._pings(src, core.note_response(Contact(msg.sender_id, dst), self.now))
        return msg

    def _pings(self, src: Addr, contacts: list[Contact]) -> None:
        for c in contacts:
            self.query(src, c.addr, b"ping", {}, expect_id=c.node_id)

    def lookup(self, src: Addr, target: bytes, *, sweep: bool = True) -> Lookup:
        core = self.cores[src]
        lk = Lookup(target, core.routing.closest(target, 2 * self.k), k=self.k, alpha=self.alpha,
                    own_id=core.node_id, sweep=sweep, skip=lambda c: core.recently_failed(c, self.now))
        while not lk.done:
            batch = lk.next_queries(self.now)
            if not batch:
                break
            slow = False
            for c in batch:
                resp = self.query(src, c.addr, b"find_node", {b"target": target}, expect_id=c.node_id)
                if resp is None or resp.sender_id != c.node_id:
                    lk.on_timeout(c.node_id, self.now)
                    slow = True
                    continue
                try:
                    nodes = krpc.reply_nodes_untrusted(resp.values)
                except krpc.KRPCError:
                    lk.on_timeout(c.node_id, self.now)
                    continue
                lk.on_response(c.node_id, nodes, self.now)
            self.now += TIMEOUT if slow else ROUND_TRIP
        return lk

    def join(self, addr: Addr) -> None:
        """Join through the bootstrap node only, then look up our own ID."""
        assert self.bootstrap is not None
        if addr == self.bootstrap:
            return
        resp = self.query(addr, self.bootstrap, b"find_node", {b"target": self.ids[addr]})
        if resp is None:
            return
        core = self.cores[addr]
        for c in krpc.reply_nodes_untrusted(resp.values):
            core.routing.heard_from(c, self.now, responded=False)
        self.lookup(addr, self.ids[addr])
        for target in core.routing.sparse_targets()[: self.join_refresh]:
            self.lookup(addr, target)

    # -- measuring -----------------------------------------------------------------------
    def maintenance(self, sweeps: int = 1) -> None:
        """Let 15 minutes pass, then every live node pings its questionable nodes, a few
        times over (as a BEP 5 node does on its timers): departed nodes turn bad and
        replacements move in."""
        self.now += 15 * 60.0
        for _ in range(sweeps):
            self.now += 120.0
            for addr in sorted(self.alive):
                self._pings(addr, self.cores[addr].routing.questionable(self.now))

    def true_closest(self, target: bytes, exclude: Addr | None = None) -> set[bytes]:
        """The k live nodes closest to ``target`` (other than ``exclude``, the searcher)."""
        t = int.from_bytes(target, "big")
        live = sorted((self.ids[a] for a in self.alive if a != exclude),
                      key=lambda i: int.from_bytes(i, "big") ^ t)
        return set(live[: self.k])

    def measure_lookup(self, src: Addr, *, sweep: bool = True) -> LookupStats:
        target = self.rng.getrandbits(160).to_bytes(20, "big")
        dead_before = self.dead_queries
        lk = self.lookup(src, target, sweep=sweep)
        got = {c.node_id for c in lk.result()}
        return LookupStats(got == self.true_closest(target, src), lk.rounds, lk.messages,
                           self.dead_queries - dead_before)


def simulate(nodes: int, lookups: int, *, churn: float = 0.2, seed: int = 1, maintain: bool = True,
             join_refresh: int = 160, on_progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Build a network of ``nodes`` by joining one at a time, let ``churn`` of them
    leave, then run ``lookups`` lookups for random targets from random live nodes.
    ``on_progress(done)`` is told the work done so far (of ``nodes + lookups``)."""
    net = SimNetwork(seed=seed)
    net.join_refresh = join_refresh
    for i in range(nodes):
        net.join(net.add_node())
        if on_progress is not None and i % 50 == 0:
            on_progress(i)
    # A few lookups before the departures, so the network has seen traffic.
    live = sorted(net.alive)
    for _ in range(min(lookups // 4, 50)):
        net.measure_lookup(net.rng.choice(live))
    leaving = net.rng.sample([a for a in live if a != net.bootstrap], int(churn * nodes))
    for a in leaving:
        net.leave(a)
    if maintain:
        net.maintenance()
    live = sorted(net.alive)
    stats = []
    strict = []  # the same, but no batch ever exceeds alpha queries
    for i in range(lookups):
        stats.append(net.measure_lookup(net.rng.choice(live)))
        strict.append(net.measure_lookup(net.rng.choice(live), sweep=False))
        if on_progress is not None:
            on_progress(nodes + i)
    rounds = sorted(s.rounds for s in stats)
    return {
        "nodes": nodes,
        "join": "full" if join_refresh > 0 else "light",
        "lookups": lookups,
        "success_rate": sum(s.ok for s in stats) / len(stats),
        "median_rounds": float(statistics.median(rounds)),
        "p95_rounds": float(rounds[min(len(rounds) - 1, int(0.95 * len(rounds)))]),
        "messages_per_lookup": sum(s.messages for s in stats) / len(stats),
        "dead_queries_per_lookup": sum(s.dead for s in stats) / len(stats),
        "alpha_only_success_rate": sum(s.ok for s in strict) / len(strict),
        "alpha_only_median_rounds": float(statistics.median(s.rounds for s in strict)),
    }
