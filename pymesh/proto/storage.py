"""What a DHT node stores for others: announced peers (BEP 5), items (BEP 44) and
pymesh worker records, each with expiry and size caps. Time is passed in.

Callers validate before storing (tokens, signatures); these stores only keep,
expire, cap and page.
"""

from __future__ import annotations

import hashlib
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


class RecordStore:
    """Signed pymesh records by target, one per signer key, newest timestamp wins."""

    def __init__(self, *, max_targets: int = 512, max_per_target: int = 1024) -> None:
        self.max_targets = max_targets
        self.max_per_target = max_per_target
        self._targets: OrderedDict[bytes, dict[bytes, StoredRecord]] = OrderedDict()

    def put(self, target: bytes, signer: bytes, rec: StoredRecord, now: float) -> bool:
        """Keep ``rec`` unless a record of the same signer with a newer or equal timestamp
        is stored. Returns whether it was stored."""
        recs = self._targets.get(target)
        if recs is None:
            if len(self._targets) >= self.max_targets:
                self._targets.popitem(last=False)
            recs = self._targets[target] = {}
        self._targets.move_to_end(target)
        self._expire(recs, now)
        old = recs.get(signer)
        if old is not None and old.timestamp >= rec.timestamp:
            return False
        if old is None and len(recs) >= self.max_per_target:
            oldest = min(recs, key=lambda s: recs[s].expires)
            del recs[oldest]
        recs[signer] = rec
        return True

    @staticmethod
    def _expire(recs: dict[bytes, StoredRecord], now: float) -> None:
        for s in [s for s, r in recs.items() if r.expires <= now]:
            del recs[s]

    def page(self, target: bytes, now: float, *, after: bytes = b"", block: int | None = None,
             budget: int = 900) -> tuple[list[bytes], bytes | None]:
        """Raw records (sorted by signer key) after ``after`` that fit in ``budget`` bytes;
        also the cursor for the next page (None when this page is the last)."""
        recs = self._targets.get(target)
        if not recs:
            return [], None
        self._expire(recs, now)
        out: list[bytes] = []
        used = 0
        prev = b""
        for signer in sorted(recs):
            if signer <= after and after:
                continue
            r = recs[signer]
            if block is not None and not r.start <= block < r.stop:
                continue
            size = len(r.raw) + 6
            if out and used + size > budget:
                return out, prev
            out.append(r.raw)
            used += size
            prev = signer
        return out, None

    def count(self, target: bytes) -> int:
        return len(self._targets.get(target, {}))
