"""Kademlia routing table (BEP 5): k-buckets over the 160-bit ID space.

Sans-I/O: the table never sends anything. When a full bucket meets a new node it
keeps the newcomer in the bucket's replacement cache and *returns* the questionable
nodes the caller should ping; the caller reports the outcome with
:meth:`RoutingTable.heard_from` (it answered) or :meth:`RoutingTable.on_timeout`.

Node states follow BEP 5: *good* answered one of our queries within the last
15 minutes (or answered once and queried us within 15 minutes), *bad* failed
``bad_after`` queries in a row, *questionable* otherwise. Only the bucket whose range
holds our own ID is ever split.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field

from pymesh.proto.krpc import Addr, Contact

K = 8
GOOD_FOR = 15 * 60.0
REFRESH_AFTER = 15 * 60.0
ID_BITS = 160


def distance(a: bytes, b: bytes) -> int:
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


@dataclass
class NodeEntry:
    node_id: bytes
    addr: Addr
    last_seen: float
    last_response: float | None = None
    fail_count: int = 0
    pinged_at: float | None = None
    nid: int = 0  # the ID as an integer, for XOR distances

    def __post_init__(self) -> None:
        self.nid = int.from_bytes(self.node_id, "big")

    @property
    def contact(self) -> Contact:
        return Contact(self.node_id, self.addr)


@dataclass
class Bucket:
    lo: int
    hi: int  # exclusive
    last_changed: float
    nodes: list[NodeEntry] = field(default_factory=list)  # least recently seen first
    replacements: list[NodeEntry] = field(default_factory=list)

    def covers(self, nid: int) -> bool:
        return self.lo <= nid < self.hi

    def find(self, node_id: bytes) -> NodeEntry | None:
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        return None


class RoutingTable:
    def __init__(self, own_id: bytes, *, now: float, k: int = K, bad_after: int = 2,
                 rng: random.Random | None = None) -> None:
        self.own_id = own_id
        self._own = int.from_bytes(own_id, "big")
        self.k = k
        self.bad_after = bad_after
        self._rng = rng or random.Random()
        self.buckets: list[Bucket] = [Bucket(0, 1 << ID_BITS, now)]
        self._los: list[int] = [0]

    # -- state ---------------------------------------------------------------------------
    def state(self, entry: NodeEntry, now: float) -> str:
        if entry.fail_count >= self.bad_after:
            return "bad"
        if entry.last_response is not None and (now - entry.last_response < GOOD_FOR or
                                                now - entry.last_seen < GOOD_FOR):
            return "good"
        return "questionable"

    def __len__(self) -> int:
        return sum(len(b.nodes) for b in self.buckets)

    def _bucket_index(self, node_id: bytes) -> int:
        # Buckets tile the ID space in order: the last one starting at or below the ID.
        return bisect.bisect_right(self._los, int.from_bytes(node_id, "big")) - 1

    def get(self, node_id: bytes) -> NodeEntry | None:
        return self.buckets[self._bucket_index(node_id)].find(node_id)

    # -- updates -------------------------------------------------------------------------
    def heard_from(self, contact: Contact, now: float, *, responded: bool) -> list[Contact]:
        """Record that ``contact`` answered us (``responded``) or sent us a query.

        Returns the nodes the caller should ping to decide whether a full bucket
        has room (each at most once per ``pinged_at`` window).
        """
        if contact.node_id == self.own_id or len(contact.node_id) != 20:
            return []
        bucket = self.buckets[self._bucket_index(contact.node_id)]
        entry = bucket.find(contact.node_id)
        if entry is not None:
            if entry.addr != contact.addr and not responded:
                return []  # an unverified sender claims a known ID from another address
            entry.addr = contact.addr
            entry.last_seen = now
            if responded:
                entry.last_response = now
                entry.fail_count = 0
                entry.pinged_at = None
            bucket.nodes.remove(entry)
            bucket.nodes.append(entry)
            bucket.last_changed = now
            return []
        new = NodeEntry(contact.node_id, contact.addr, now, now if responded else None)
        while True:
            if len(bucket.nodes) < self.k:
                bucket.nodes.append(new)
                bucket.last_changed = now
                self._drop_replacement(bucket, contact.node_id)
                return []
            bad = [n for n in bucket.nodes if self.state(n, now) == "bad"]
            if bad:
                bucket.nodes.remove(bad[0])
                bucket.nodes.append(new)
                bucket.last_changed = now
                self._drop_replacement(bucket, contact.node_id)
                return []
            if bucket.covers(self._own) and bucket.hi - bucket.lo > 1:
                self._split(bucket, now)
                bucket = self.buckets[self._bucket_index(contact.node_id)]
                continue
            break
        self._add_replacement(bucket, new)
        pings: list[Contact] = []
        for n in bucket.nodes:
            if self.state(n, now) == "questionable" and (n.pinged_at is None or now - n.pinged_at > 60.0):
                n.pinged_at = now
                pings.append(n.contact)
                break  # the least recently seen questionable node is enough
        return pings

    def on_timeout(self, node_id: bytes, now: float) -> None:
        """A query to ``node_id`` went unanswered: it gives way to a replacement if one is
        cached, else it turns bad after ``bad_after`` failures in a row."""
        bucket = self.buckets[self._bucket_index(node_id)]
        entry = bucket.find(node_id)
        if entry is None:
            self._drop_replacement(bucket, node_id)
            return
        entry.fail_count += 1
        # A replacement waits in the cache: give the failed node's place to it at once
        # rather than after ``bad_after`` failures (lookups must not keep meeting it).
        if bucket.replacements:
            bucket.nodes.remove(entry)
            repl = bucket.replacements.pop()  # most recently seen first
            bucket.nodes.append(repl)
            bucket.last_changed = now

    def remove(self, node_id: bytes) -> None:
        bucket = self.buckets[self._bucket_index(node_id)]
        entry = bucket.find(node_id)
        if entry is not None:
            bucket.nodes.remove(entry)
            if bucket.replacements:
                bucket.nodes.append(bucket.replacements.pop())

    def _add_replacement(self, bucket: Bucket, entry: NodeEntry) -> None:
        self._drop_replacement(bucket, entry.node_id)
        bucket.replacements.append(entry)
        if len(bucket.replacements) > self.k:
            bucket.replacements.pop(0)

    @staticmethod
    def _drop_replacement(bucket: Bucket, node_id: bytes) -> None:
        bucket.replacements[:] = [r for r in bucket.replacements if r.node_id != node_id]

    def _split(self, bucket: Bucket, now: float) -> None:
        mid = (bucket.lo + bucket.hi) // 2
        low = Bucket(bucket.lo, mid, now)
        high = Bucket(mid, bucket.hi, now)
        for n in bucket.nodes:
            (low if int.from_bytes(n.node_id, "big") < mid else high).nodes.append(n)
        for r in bucket.replacements:
            half = low if int.from_bytes(r.node_id, "big") < mid else high
            if len(half.nodes) < self.k:
                half.nodes.append(r)
            else:
                half.replacements.append(r)
        i = self.buckets.index(bucket)
        self.buckets[i:i + 1] = [low, high]
        self._los = [b.lo for b in self.buckets]

    # -- queries -------------------------------------------------------------------------
    def closest(self, target: bytes, n: int | None = None) -> list[Contact]:
        """The ``n`` (default k) known nodes closest to ``target``: bad nodes never, nodes
        that failed their last query only when there are not enough others."""
        t = int.from_bytes(target, "big")
        n = n or self.k
        entries = [e for b in self.buckets for e in b.nodes if e.fail_count < self.bad_after]
        entries.sort(key=lambda e: e.nid ^ t)
        fine = [e for e in entries if e.fail_count == 0]
        if len(fine) < n:
            fine = entries
        return [e.contact for e in fine[:n]]

    def questionable(self, now: float, *, repeat: float = 60.0, limit: int = 1000) -> list[Contact]:
        """Nodes not heard from for 15 minutes and not pinged in the last ``repeat``
        seconds: the caller pings them (an answer makes them good, a second silence
        makes them bad and lets a replacement in). Marks them as pinged."""
        out: list[Contact] = []
        for b in self.buckets:
            for e in b.nodes + b.replacements:
                if now - e.last_seen >= GOOD_FOR and (e.pinged_at is None or now - e.pinged_at >= repeat):
                    e.pinged_at = now
                    out.append(e.contact)
                    if len(out) >= limit:
                        return out
        return out

    def all_nodes(self) -> list[NodeEntry]:
        return [e for b in self.buckets for e in b.nodes]

    def sparse_targets(self) -> list[bytes]:
        """Random IDs inside every bucket that is not full, other than the one holding our
        own ID, farthest first: looking them up after joining fills the far buckets
        (Kademlia's join)."""
        sparse = [b for b in self.buckets if len(b.nodes) < self.k and not b.covers(self._own)]
        sparse.sort(key=lambda b: b.lo - b.hi)  # the widest (farthest) buckets first
        return [self._rng.randrange(b.lo, b.hi).to_bytes(20, "big") for b in sparse]

    def refresh_targets(self, now: float, *, after: float = REFRESH_AFTER) -> list[bytes]:
        """Random IDs inside buckets untouched for ``after`` seconds (look them up)."""
        out = []
        for b in self.buckets:
            if now - b.last_changed >= after:
                b.last_changed = now
                out.append(self._rng.randrange(b.lo, b.hi).to_bytes(20, "big"))
        return out
