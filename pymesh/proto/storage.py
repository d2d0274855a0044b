"""What a DHT node stores for others: announced peers (BEP 5), items (BEP 44) and
pymesh worker records, each with expiry and size caps. Time is passed in.

Callers validate before storing (tokens, signatures); these stores only keep,
expire, cap and page.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import OrderedDict
from dataclasses import dataclass

from pymesh.proto import krpc
from pymesh.proto.krpc import Addr

PEER_TTL = 30 * 60.0
ITEM_TTL = 2 * 3600.0


class PeerStore:
    """info_hash -> announced peer addresses."""

    def __init__(self, *, ttl: float = PEER_TTL, max_hashes: int = 2000, max_peers: int = 200) -> None:
        self.ttl = ttl
        self.max_hashes = max_hashes
        self.max_peers = max_peers
        self._hashes: OrderedDict[bytes, dict[Addr, float]] = OrderedDict()

    def add(self, info_hash: bytes, addr: Addr, now: float) -> None:
        peers = self._hashes.get(info_hash)
        if peers is None:
            if len(self._hashes) >= self.max_hashes:
                self._hashes.popitem(last=False)
            peers = self._hashes[info_hash] = {}
        self._hashes.move_to_end(info_hash)
        if addr not in peers and len(peers) >= self.max_peers:
            del peers[min(peers, key=lambda a: peers[a])]
        peers[addr] = now + self.ttl

    def get(self, info_hash: bytes, now: float, limit: int = 50,
            rng: random.Random | None = None) -> list[Addr]:
        peers = self._hashes.get(info_hash)
        if not peers:
            return []
        for a in [a for a, exp in peers.items() if exp <= now]:
            del peers[a]
        live = list(peers)
        if len(live) > limit:
            live = (rng or random).sample(live, limit)
        return live


@dataclass
class Item:
    v_raw: bytes
    expires: float
    key: bytes | None = None
    sig: bytes | None = None
    seq: int | None = None
    salt: bytes = b""


def mutable_target(key: bytes, salt: bytes = b"") -> bytes:
    return hashlib.sha1(key + salt).digest()


def immutable_target(v_raw: bytes) -> bytes:
    return hashlib.sha1(v_raw).digest()


class ItemStore:
    """BEP 44 items by target. :meth:`put` returns None or a KRPC error (code, message)."""

    def __init__(self, *, ttl: float = ITEM_TTL, max_items: int = 5000) -> None:
        self.ttl = ttl
        self.max_items = max_items
        self._items: OrderedDict[bytes, Item] = OrderedDict()

    def get(self, target: bytes, now: float) -> Item | None:
        item = self._items.get(target)
        if item is not None and item.expires <= now:
            del self._items[target]
            return None
        return item

    def _keep(self, target: bytes, item: Item) -> None:
        if target not in self._items and len(self._items) >= self.max_items:
            self._items.popitem(last=False)
        self._items[target] = item
        self._items.move_to_end(target)

    def put_immutable(self, v_raw: bytes, now: float) -> bytes:
        target = immutable_target(v_raw)
        self._keep(target, Item(v_raw, now + self.ttl))
        return target

    def put_mutable(self, key: bytes, salt: bytes, seq: int, sig: bytes, v_raw: bytes,
                    cas: int | None, now: float) -> tuple[int, str] | None:
        """Store a mutable item whose signature the caller has checked."""
        target = mutable_target(key, salt)
        old = self.get(target, now)
        if old is not None and old.seq is not None:
            if cas is not None and cas != old.seq:
                return krpc.CAS_MISMATCH, f"CAS mismatch: stored seq is {old.seq}, not {cas}"
            if seq < old.seq:
                return krpc.SEQ_TOO_OLD, f"sequence number {seq} is less than the stored {old.seq}"
            if seq == old.seq and v_raw != old.v_raw:
                return krpc.SEQ_TOO_OLD, f"sequence number {seq} already stored with another value"
        self._keep(target, Item(v_raw, now + self.ttl, key, sig, seq, salt))
        return None


@dataclass
class StoredRecord:
    raw: bytes
    timestamp: float
    expires: float
    start: int
    stop: int
    #: IP address that stored it ("" for this node's own records); quotas are per source.
    source: str = ""


_Key = tuple[bytes, bytes]  # (target, signer)


class RecordStore:
    """Signed pymesh records by target, one per signer key, newest timestamp wins.

    Storage is shared fairly between sources. Each signer key may hold records under at
    most ``max_targets_per_signer`` targets and each source IP at most ``max_per_source``
    records; a source or signer over its quota displaces its *own* least recently stored
    record. The global caps (``max_records``, ``max_targets``) and the per-target cap
    take room from the heaviest source (the IP holding the most records), so a flood
    from one address or key never evicts what other sources stored. When the target
    table is full and no target can be freed from a heavy source, a new target is
    refused instead.
    """

    def __init__(self, *, max_targets: int = 512, max_per_target: int = 1024, max_records: int = 8192,
                 max_per_source: int = 256, max_targets_per_signer: int = 16, salt: bytes | None = None) -> None:
        self._salt = os.urandom(16) if salt is None else salt
        self.max_targets = max_targets
        self.max_per_target = max_per_target
        self.max_records = max_records
        self.max_per_source = max_per_source
        self.max_targets_per_signer = max_targets_per_signer
        self._targets: dict[bytes, dict[bytes, StoredRecord]] = {}
        # Least recently stored first, for choosing what a source / signer gives up.
        self._by_source: dict[str, OrderedDict[_Key, None]] = {}
        self._by_signer: dict[bytes, OrderedDict[bytes, None]] = {}
        self._count = 0
        self._swept = float("-inf")
        self.evicted = 0
        self.refused = 0

    def __len__(self) -> int:
        return self._count

    def source_count(self, source: str) -> int:
        return len(self._by_source.get(source, ()))

    # -- bookkeeping -----------------------------------------------------------------------
    def _insert(self, target: bytes, signer: bytes, rec: StoredRecord) -> None:
        self._targets.setdefault(target, {})[signer] = rec
        self._by_source.setdefault(rec.source, OrderedDict())[(target, signer)] = None
        self._by_signer.setdefault(signer, OrderedDict())[target] = None
        self._count += 1

    def _remove(self, target: bytes, signer: bytes) -> None:
        recs = self._targets[target]
        rec = recs.pop(signer)
        if not recs:
            del self._targets[target]
        by_source = self._by_source[rec.source]
        del by_source[(target, signer)]
        if not by_source:
            del self._by_source[rec.source]
        by_signer = self._by_signer[signer]
        del by_signer[target]
        if not by_signer:
            del self._by_signer[signer]
        self._count -= 1

    def _evict(self, target: bytes, signer: bytes) -> None:
        self._remove(target, signer)
        self.evicted += 1

    def _sweep(self, now: float) -> None:
        """Drop every expired record (at most once a second: quotas count live records)."""
        if now - self._swept < 1.0:
            return
        self._swept = now
        dead = [(t, s) for t, recs in self._targets.items() for s, r in recs.items() if r.expires <= now]
        for t, s in dead:
            self._remove(t, s)

    def _heaviest_sources(self) -> list[str]:
        return sorted(self._by_source, key=lambda src: -len(self._by_source[src]))

    # -- making room -----------------------------------------------------------------------
    def _make_room(self, target: bytes, signer: bytes, source: str) -> bool:
        mine = self._by_signer.get(signer)
        while mine and len(mine) >= self.max_targets_per_signer:
            self._evict(next(iter(mine)), signer)
            mine = self._by_signer.get(signer)
        own = self._by_source.get(source)
        while own and len(own) >= self.max_per_source:
            self._evict(*next(iter(own)))
            own = self._by_source.get(source)
        recs = self._targets.get(target)
        if recs is not None and len(recs) >= self.max_per_target:
            per: dict[str, int] = {}
            for r in recs.values():
                per[r.source] = per.get(r.source, 0) + 1
            heavy = max(per, key=lambda src: per[src])
            victim = next(k for k in self._by_source[heavy] if k[0] == target)
            self._evict(*victim)
        while self._count >= self.max_records:
            heaviest = max(self._by_source, key=lambda src: len(self._by_source[src]))
            self._evict(*next(iter(self._by_source[heaviest])))
        if target not in self._targets and len(self._targets) >= self.max_targets:
            return self._free_a_target()
        return True

    def _free_a_target(self) -> bool:
        """Evict a record that is alone under its target, from the heaviest source that
        has one. False when every target is shared (the new target is refused)."""
        for src in self._heaviest_sources():
            for t, s in self._by_source[src]:
                if len(self._targets[t]) == 1:
                    self._evict(t, s)
                    return True
        return False

    # -- API -------------------------------------------------------------------------------
    def put(self, target: bytes, signer: bytes, rec: StoredRecord, now: float) -> bool:
        """Keep ``rec`` unless a record of the same signer with a newer or equal timestamp
        is stored, or no room can be made fairly. Returns whether it was stored."""
        self._sweep(now)
        old = self._targets.get(target, {}).get(signer)
        if old is not None:
            if old.expires > now and old.timestamp >= rec.timestamp:
                return False
            self._remove(target, signer)
        if not self._make_room(target, signer, rec.source):
            self.refused += 1
            return False
        self._insert(target, signer, rec)
        return True

    def _expire(self, target: bytes, now: float) -> None:
        recs = self._targets.get(target, {})
        for s in [s for s, r in recs.items() if r.expires <= now]:
            self._remove(target, s)

    def _order_key(self, source: str) -> bytes:
        """Where ``source``'s records go in a round of a page order: a keyed hash, so no one
        can choose (by grinding keys or picking addresses) to come first."""
        return hashlib.blake2b(source.encode("utf-8", "replace"), key=self._salt, digest_size=8).digest()

    def page(self, target: bytes, now: float, *, after: bytes = b"", block: int | None = None,
             budget: int = 900) -> tuple[list[bytes], bytes | None]:
        """Raw records after cursor ``after`` that fit in ``budget`` bytes, and the cursor for
        the next page (None when this page is the last).

        Records are served round-robin across sources: every source's first record (its
        signers in key order), then every source's second, and so on, sources in an order
        keyed by this store's secret. One address holding its whole quota under keys ground
        to sort first therefore delays each honest source by at most one round, instead of
        pushing it past the last page a reader fetches. A cursor is (round, source key): 12
        bytes that grow strictly, so readers stop when it does not advance."""
        self._expire(target, now)
        recs = self._targets.get(target)
        if not recs:
            return [], None
        groups: dict[str, list[bytes]] = {}
        for signer in sorted(recs):
            r = recs[signer]
            if block is None or r.start <= block < r.stop:
                groups.setdefault(r.source, []).append(signer)
        order = sorted((rank.to_bytes(4, "big") + self._order_key(src), signer)
                       for src, signers in groups.items() for rank, signer in enumerate(signers))
        out: list[bytes] = []
        used = 0
        prev = b""
        for pos, signer in order:
            if after and pos <= after:
                continue
            raw = recs[signer].raw
            size = len(raw) + 6
            if used + size > budget:
                return out, prev or after
            out.append(raw)
            used += size
            prev = pos
        return out, None

    def count(self, target: bytes) -> int:
        return len(self._targets.get(target, {}))
