"""pymesh worker records over the DHT: :class:`DHTRecords`, a component each
:class:`pymesh.net.dht.DHTNode` owns (``node.records``; the node's record methods delegate).

Each record is stored at two targets, on the k nodes closest to each (and locally
when this node is one of them): the model's target (``find_block_providers``,
``find_model_records``) and the all-records target (``list_models``,
``list_records``). Writes are ``pm_put`` with a token from a ``pm_get`` answer;
reads are a ``pm_get`` lookup (queries padded so that the first, unverified replies may
carry a full page) whose replies carry the first page of records, then further pages
(``after`` = cursor, with the node's token) from every closest node that said there is
more, while its cursor advances, within ``max_record_pages`` per node and
``max_record_pages_total`` in all. Nodes page round-robin across the addresses that stored
records, so one address cannot fill every page. Every record read is verified and checked
against the clock (older than ``record_ttl`` or from the future: dropped); bad or
other-version records are dropped with a log line.

A node re-signs and re-publishes its own records every ``heartbeat`` seconds until
:meth:`stop_refreshing` or shutdown; at clean shutdown it publishes them as offline.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import trio

from pymesh.errors import LocalProtocolError, PeerUnavailable, RemoteProtocolError
from pymesh.net.clock import Clock
from pymesh.net.dht_ops import DHTOps
from pymesh.proto.dht_core import MAX_SKEW, RECORD_PAGE_BUDGET, padded_read_args
from pymesh.proto.krpc import Contact
from pymesh.proto.records import (ALL_TARGET, RecordError, RecordVersionMismatch, WorkerRecord, base_model_id,
                                  model_target)
from pymesh.proto.routing import distance
from pymesh.proto.storage import StoredRecord
from pymesh.proto.vocab import WorkerState

log = logging.getLogger(__name__)


class DHTRecords:
    """Publishing, refreshing and reading signed worker records through one DHT node."""

    def __init__(self, net: DHTOps, clock: Clock) -> None:
        self.net = net
        self.clock = clock
        self.own: dict[str, WorkerRecord] = {}          # this node's records, refreshed each heartbeat
        self._published_at: dict[str, float] = {}       # model id -> wall time of the last publish
        self._warned_versions: set[object] = set()
        self._last_stamp = 0.0

    def _stamp(self) -> float:
        """A timestamp for a record this node signs: the wall clock, but always at least 1 ms
        (the wire's precision) past the previous one, so a newer version always replaces
        the older (an offline record right after an online one, or under a virtual clock)."""
        self._last_stamp = max(self.clock.wall(), self._last_stamp + 0.001)
        return self._last_stamp

    # -- writing -------------------------------------------------------------------------
    async def publish_record(self, record: WorkerRecord) -> int:
        """Store ``record`` on the k closest nodes of its model (and in the all-records
        index). A record of this node's own key is (re-)signed with a fresh timestamp and
        then refreshed every heartbeat. Returns how many nodes stored it under the model.

        An offline record (a node going away) gets one attempt of at most
        ``config.offline_deadline`` seconds: shutdown must not hang on a dead swarm."""
        if record.peer_id == self.net.identity.peer_id or not record.signature:
            record = record.signed(self.net.identity, timestamp=self._stamp())
            self.own[record.model_id] = record
        elif not record.verify():
            raise LocalProtocolError("publish_record: the record's signature does not verify; "
                                     "sign it with WorkerRecord.signed(identity) first")
        raw = record.to_bytes()
        self._published_at[record.model_id] = self.clock.wall()
        counts: dict[bytes, int] = {}

        async def one(target: bytes) -> None:
            counts[target] = await self._put_record(target, record, raw)

        deadline = self.net.config.offline_deadline if record.state == WorkerState.OFFLINE else float("inf")
        with trio.move_on_after(deadline) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, model_target(record.model_id))
                nursery.start_soon(one, ALL_TARGET)
        if scope.cancelled_caught:
            log.info("offline record for %s: no answer within %.1fs; it expires after the TTL instead",
                     record.model_id, deadline)
        n = counts.get(model_target(record.model_id), 0)
        log.debug("published %s record of %s for %s on %d nodes", record.state,
                  record.peer_id.short(), record.model_id, n)
        return n

    async def _put_record(self, target: bytes, record: WorkerRecord, raw: bytes) -> int:
        net = self.net
        closest, replies = await net.lookup(target, b"pm_get", {b"target": target})
        stored = 0
        ttl = net.config.record_ttl
        # A read-only node answers no pm_get: a copy kept here would help no one.
        near = len(closest) < net.config.k or distance(net.node_id, target) < distance(closest[-1].node_id, target)
        if near and not net.core.read_only:
            now = self.clock.wall()
            net.core.records.put(
                target, record.peer_id.key,
                StoredRecord(raw, record.timestamp, min(now + ttl, record.timestamp + ttl + MAX_SKEW),
                             record.start, record.stop), now)
            stored += 1

        stored += await net.write_to(closest, replies, b"pm_put", {b"target": target, b"rec": raw})
        return stored

    async def heartbeat_records(self) -> None:
        """Re-sign and re-publish this node's records whose heartbeat is due."""
        now = self.clock.wall()
        for model_id, rec in list(self.own.items()):
            if now - self._published_at.get(model_id, 0.0) >= self.net.config.heartbeat * 0.9:
                try:
                    await self.publish_record(rec)
                except Exception as exc:
                    log.warning("heartbeat for %s failed: %s", model_id, exc)

    def stop_refreshing(self, model_id: str | None = None) -> None:
        """Stop the heartbeat of this node's record(s); they expire after the TTL."""
        for m in [model_id] if model_id is not None else list(self.own):
            self.own.pop(m, None)

    async def publish_offline(self) -> None:
        """Replace this node's records with offline ones (clean shutdown): one attempt,
        all records at once, within ``config.offline_deadline`` seconds."""
        records = list(self.own.values())
        self.own.clear()
        with trio.move_on_after(self.net.config.offline_deadline):
            async with trio.open_nursery() as nursery:
                for rec in records:
                    nursery.start_soon(self.publish_record, replace(rec, state=WorkerState.OFFLINE))
        self.own.clear()

    # -- reading -------------------------------------------------------------------------
    def _parse(self, raw: object) -> WorkerRecord | None:
        if not isinstance(raw, bytes):
            return None
        try:
            return WorkerRecord.from_bytes_untrusted(raw)
        except RecordVersionMismatch as exc:
            if exc.theirs not in self._warned_versions:
                self._warned_versions.add(exc.theirs)
                log.warning("ignoring a worker record: %s", exc)
        except RecordError as exc:
            log.info("ignoring an invalid worker record: %s", exc)
        return None

    def _merge(self, into: dict[bytes, WorkerRecord], raws: object, model_id: str | None) -> int:
        """Add the valid, current records of one reply to ``into`` (newest per signer wins);
        returns how many records the reply carried. A record older than ``record_ttl`` (plus
        the MAX_SKEW a store allows) or stamped more than MAX_SKEW in the future is dropped
        here too, not only by the node that stored it: a stale or lying store cannot bring
        it back."""
        if not isinstance(raws, list):
            return 0
        now = self.clock.wall()
        oldest = now - self.net.config.record_ttl - MAX_SKEW  # what a store keeps, at most
        for raw in raws[:64]:
            rec = self._parse(raw)
            # every quantization of the model (its base id): callers pick the full id they need
            if rec is None or (model_id is not None and rec.base_id != base_model_id(model_id)):
                continue
            if not oldest <= rec.timestamp <= now + MAX_SKEW:
                log.debug("ignoring a record of %s stamped %.0fs from now", rec.peer_id.short(), rec.timestamp - now)
                continue
            old = into.get(rec.peer_id.key)
            if old is None or old.timestamp < rec.timestamp:
                into[rec.peer_id.key] = rec
        return len(raws)

    async def _read_records(self, target: bytes, model_id: str | None, block: int | None) -> list[WorkerRecord]:
        args: dict[bytes, object] = {b"target": target}
        if block is not None:
            args[b"b"] = block
        net = self.net
        # Padded so that even these first, unverified replies may carry a full page.
        closest, replies = await net.lookup(target, b"pm_get",
                                            padded_read_args(net.node_id, args, read_only=net.core.read_only))
        found: dict[bytes, WorkerRecord] = {}
        now = self.clock.wall()
        after = b""
        while True:  # our own store, every page
            raws, nxt = net.core.records.page(target, now, after=after, block=block, budget=RECORD_PAGE_BUDGET)
            self._merge(found, raws, model_id)
            if nxt is None:
                break
            after = nxt
        more = []
        for _, resp in replies.values():
            self._merge(found, resp.values.get(b"recs"), model_id)
        for c in closest:
            values = replies[c.node_id][1].values if c.node_id in replies else {}
            nxt_v, token = values.get(b"next"), values.get(b"token")
            if isinstance(nxt_v, bytes) and isinstance(token, bytes):
                more.append((c, nxt_v, token))
        # Pages come while a responder's cursor advances, within a budget shared by all of
        # them (a node full of one address's records costs a bounded number of queries).
        budget = [net.config.max_record_pages_total]

        async def pages(c: Contact, cursor: bytes, token: bytes) -> None:
            for _ in range(net.config.max_record_pages):
                if budget[0] <= 0:
                    return
                budget[0] -= 1
                try:
                    resp = await net.query(c.addr, b"pm_get", {**args, b"after": cursor, b"token": token},
                                           node_id=c.node_id)
                except (PeerUnavailable, RemoteProtocolError):
                    return
                got = self._merge(found, resp.values.get(b"recs"), model_id)
                nxt = resp.values.get(b"next")
                if not got or not isinstance(nxt, bytes) or nxt <= cursor:
                    return
                cursor = nxt

        async with trio.open_nursery() as nursery:
            for c, cursor, token in more:
                nursery.start_soon(pages, c, cursor, token)
        if block is not None:
            return sorted((r for r in found.values() if r.covers(block)), key=_order)
        return sorted(found.values(), key=_order)

    async def find_block_providers(self, model_id: str, block: int) -> list[WorkerRecord]:
        """Live, verified, not-offline records of ``model_id`` (any quantization of its base id)
        whose span covers ``block``."""
        recs = await self._read_records(model_target(model_id), model_id, block)
        return [r for r in recs if r.live]

    async def find_model_records(self, model_id: str) -> list[WorkerRecord]:
        """Every live, verified, not-offline record of ``model_id`` (any quantization of its base id)."""
        recs = await self._read_records(model_target(model_id), model_id, None)
        return [r for r in recs if r.live]

    async def list_records(self, model_id: str | None = None) -> list[WorkerRecord]:
        """Unexpired verified records (offline ones included) of one model or of all."""
        if model_id is not None:
            return await self._read_records(model_target(model_id), model_id, None)
        return await self._read_records(ALL_TARGET, None, None)

    async def list_models(self) -> list[str]:
        """Model ids that have at least one live record in the swarm."""
        return sorted({r.model_id for r in await self.list_records() if r.live})


def _order(r: WorkerRecord) -> tuple[str, int, bytes]:
    return (r.model_id, r.start, r.peer_id.key)


__all__ = ["DHTRecords"]
