"""The client's view of the swarm: its transport node, its DHT node, discovery and bans.

:class:`Swarm` is what an inference session talks through. It reads worker records from the
DHT, measures round-trip times (``pm.info``), bans workers that failed for a while, and routes
the pushes workers send back (``pm.out``, ``pm.err``, parsed first) to their sessions.

Discovery keeps the union of the records its lookups returned (:mod:`pymesh.client.discovery`):
one lookup can miss records another saw; a layer nobody seems to serve gets a lookup of its
own first. A newer record of a banned worker (a new incarnation) lifts a ban a failure or
timeout caused; when every provider of a span is banned, discovery waits for the earliest
ban to end. ``allow_peers``: route only through listed workers. Workers behind NAT are
dialed through the relays their records name (hole punching first).

A worker a verified-inference check proved wrong is **convicted** (:meth:`Swarm.convict`):
banned for good, its evidence written beside the ``blocklist`` file and the peer added to it,
so later clients with that blocklist never route through it (listed peers: at start).
"""

from __future__ import annotations

import functools
import logging
import time
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, ClassVar, Protocol, Sequence

import trio

from pymesh.client.bans import PENALTY_MS, BanBook, BanCause
from pymesh.client.blocklist import Blocklist, Evidence, record_conviction
from pymesh.client.discovery import RecordBook
from pymesh.client.routing import (DEFAULT_RTT_MS, NoRouteError, SpanOption, choose_route, first_uncovered_block,
                                    providers_of)
from pymesh.errors import ConfigError, PeerUnavailable, PymeshError
from pymesh.net.clock import Clock, TrioClock
from pymesh.proto import session_wire as sw
from pymesh.proto.addr import parse_addr
from pymesh.proto.allowlist import PeerAllowlist
from pymesh.proto.frames import Meta, TensorBlob
from pymesh.proto.identity import Identity, PeerID
from pymesh.proto.records import WorkerRecord
from pymesh.proto.vocab import Transport, WorkerState
from pymesh.settings import Settings

if TYPE_CHECKING:
    from pymesh.net.conn import Connection
    from pymesh.net.dht import DHTNode
    from pymesh.net.rpc import RpcNode

log = logging.getLogger(__name__)


class PushSink(Protocol):
    """A session's end of the pushes workers send it (already parsed)."""

    def on_out(self, peer: PeerID, out: sw.Out, tensors: list[TensorBlob]) -> None: ...

    def on_err(self, peer: PeerID, err: sw.Err) -> None: ...


class Request(Protocol):
    """A call message of :mod:`pymesh.proto.session_wire`."""

    METHOD: ClassVar[str]

    def to_meta(self) -> dict[str, object]: ...


class Swarm:
    """Transport + DHT for a client; use as ``async with Swarm(...) as swarm``."""

    def __init__(
        self,
        bootstrap: Sequence[str],
        model_id: str,
        *,
        transport: str = "quic",
        identity: Identity | None = None,
        dht_port: int = 0,
        settings: Settings | None = None,
        clock: Clock | None = None,
        allow_peers: PeerAllowlist | None = None,
        blocklist: Blocklist | None = None,
    ) -> None:
        self.transport = Transport.parse(transport)
        if not bootstrap:
            raise ConfigError("give at least one --bootstrap address (HOST:PORT of a bootstrap node)")
        self.bootstrap = [parse_addr(b) for b in bootstrap]
        self.model_id = model_id
        self.identity = identity or Identity.generate()
        self.dht_port = dht_port
        self.settings = settings if settings is not None else Settings()
        #: bans and discovery deadlines run on this clock (trio's, so virtual in tests)
        self.clock: Clock = clock if clock is not None else TrioClock()
        c = self.settings.client
        self.ban_seconds = c.ban_seconds
        self.discovery_timeout = c.discovery_timeout
        self.rpc_timeout = c.rpc_timeout
        #: route only through these workers (None: an open swarm)
        self.allow_peers = allow_peers
        #: a failed RTT probe is remembered as long as the record it was made for may live
        self.bans = BanBook(self.clock.monotonic, self.ban_seconds, probe_memory=self.settings.record_ttl)
        self.book = RecordBook(model_id, self.clock.monotonic, self.settings.record_ttl, allow_peers.allows
                               if allow_peers is not None else None, allow_mixed=self.settings.client.allow_mixed)
        self.rtt_ms: dict[PeerID, float] = {}
        #: workers whose allowlist does not list this client (final: never asked again)
        self.not_listing: dict[PeerID, str] = {}
        self.sinks: dict[bytes, PushSink] = {}
        #: convictions persist here (None: only for this process's life)
        self.blocklist = blocklist
        #: peers this process convicted, and why (the blocklist's older entries are not here)
        self.convicted: dict[PeerID, str] = {}
        self._node: RpcNode | None = None
        self._dht: DHTNode | None = None
        self._stack = AsyncExitStack()
        #: verified inference: peers whose output passed a spot check (the first step through
        #: any other peer is checked before its output is used)
        self.checked: set[PeerID] = set()
        self.tasks: trio.Nursery | None = None

    @property
    def node(self) -> "RpcNode":
        if self._node is None:
            raise PymeshError("the swarm is not started: use `async with Swarm(...)`")
        return self._node

    @property
    def dht(self) -> "DHTNode":
        if self._dht is None:
            raise PymeshError("the swarm is not started: use `async with Swarm(...)`")
        return self._dht

    async def __aenter__(self) -> "Swarm":
        from pymesh.net.dht import DHTNode
        from pymesh.net.punch import Puncher
        from pymesh.net.rpc import RpcNode
        self.load_blocklist()
        await self._stack.__aenter__()
        try:
            self._node = RpcNode(self.identity, transport=self.transport.value,
                                 config=self.settings.transport_config())
            await self._stack.enter_async_context(self._node)
            self._node.on_push(sw.OUT, self._on_out)
            self._node.on_push(sw.ERR, self._on_err)
            Puncher(self._node)   # hole punching to workers behind NAT
            # BEP 43: a client joins read-only and leaves no dead contact behind
            self._dht = DHTNode(self.identity, host="0.0.0.0", port=self.dht_port, bootstrap=self.bootstrap,
                                config=self.settings.dht_config(), read_only=True, clock=self.clock)
            await self._stack.enter_async_context(self._dht)
            # background work of sessions (verification spot checks): cancelled first on exit
            self.tasks = await self._stack.enter_async_context(trio.open_nursery())
            self._stack.callback(self.tasks.cancel_scope.cancel)
        except BaseException:
            await self._stack.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            await self._stack.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            # The nodes' nurseries wrap whatever left the `async with` body in a group;
            # hand the caller the error it raised, not the wrapping.
            original = exc
            if original is not None and _leaves(group) == [original]:
                raise original from None
            raise

    def _sink(self, conn: "Connection", topic: str, sid: bytes) -> PushSink | None:
        sink = self.sinks.get(sid)
        if sink is None:
            log.debug("push %s for an unknown session from %s dropped", topic, conn.peer.short())
        return sink

    async def _on_out(self, conn: "Connection", meta: Meta, tensors: list[TensorBlob]) -> None:
        try:
            out = sw.Out.from_meta_untrusted(meta)
            sw.check_tensor_count(tensors, len(out.steps), "pm.out")
        except sw.BadRequest as exc:
            log.debug("malformed pm.out from %s dropped: %s", conn.peer.short(), exc)
            return
        sink = self._sink(conn, sw.OUT, out.sid)
        if sink is not None:
            sink.on_out(conn.peer, out, tensors)

    async def _on_err(self, conn: "Connection", meta: Meta, tensors: list[TensorBlob]) -> None:
        try:
            err = sw.Err.from_meta_untrusted(meta)
        except sw.BadRequest as exc:
            log.debug("malformed pm.err from %s dropped: %s", conn.peer.short(), exc)
            return
        sink = self._sink(conn, sw.ERR, err.sid)
        if sink is not None:
            sink.on_err(conn.peer, err)

    # -- bans ------------------------------------------------------------------------------
    def ban(self, peer: PeerID, why: str, cause: BanCause = BanCause.TIMEOUT) -> None:
        ban = self.bans.ban(peer, why, cause)
        if ban.cause is BanCause.CONVICTED:
            log.debug("Client: worker %s is convicted already (%s); not banning it again for: %s",
                      peer.short(), ban.why, why)
            return
        log.warning("Client: banning worker %s for %.0f s (%s): %s", peer.short(), self.ban_seconds,
                    ban.cause.value, why)

    def convict(self, peer: PeerID, why: str, evidence: Evidence | None = None) -> Path | None:
        """A verified-inference check proved ``peer`` wrong: ban it for good, write
        ``evidence`` to the blocklist's evidence folder and add the peer to the blocklist.
        Returns the evidence file (None: no blocklist, no evidence, already convicted by this
        process, or the write failed: logged)."""
        if peer in self.convicted:
            log.debug("Client: worker %s is convicted already; further proof ignored: %s", peer.short(), why)
            return None
        self.bans.convict(peer, why)
        self.convicted[peer] = why
        path = record_conviction(self.blocklist, peer, why, evidence)
        if self.blocklist is None:
            where = "no blocklist: kept for this run only"
            if evidence is not None:
                where += f", {evidence.kind} evidence not written"
        else:
            where = f"blocklist {self.blocklist.path}, evidence {path if path is not None else 'none'}"
        log.warning("Client: convicted worker %s (%s) of a wrong answer, never routing through it again: %s (%s)",
                    peer.short(), peer.to_text(), why, where)
        return path

    def load_blocklist(self) -> int:
        """Convict every peer the blocklist names (done on start; BlocklistError if the file
        is malformed); returns how many it names."""
        blocklist = self.blocklist
        if blocklist is None:
            return 0
        entries = blocklist.load()
        for peer, entry in entries.items():
            self.bans.convict(peer, f"on the blocklist {blocklist.path}: {entry.why}")
        if entries:
            log.info("Client: %d worker(s) on the blocklist %s are never routed through", len(entries),
                     blocklist.path)
        return len(entries)

    def deprioritise(self, peer: PeerID, why: str) -> None:
        """Route around ``peer`` while another worker serves its blocks, without banning it."""
        log.info("Client: deprioritising worker %s: %s", peer.short(), why)
        self.bans.deprioritise(peer)

    def avoid_pair(self, hop: PeerID, successor: PeerID, why: str) -> None:
        """Prefer routes on which ``hop`` is not followed by ``successor`` (neither is banned)."""
        log.info("Client: avoiding the link %s -> %s: %s", hop.short(), successor.short(), why)
        self.bans.avoid_pair(hop, successor)

    def not_listed_by(self, peer: PeerID, why: str) -> None:
        """``peer`` refused this client because its allowlist does not list it: routes never
        use it again (retrying cannot help; its operator must list us)."""
        if peer not in self.not_listing:
            log.warning("Client: worker %s does not have this client (%s) on its allowlist; not using it",
                        peer.short(), self.identity.peer_id.short())
        self.not_listing[peer] = why

    @property
    def banned(self) -> dict[PeerID, float]:
        """Banned peers and when (monotonic) their bans end."""
        return {p: b.until for p, b in self.bans.active().items()}

    def current_bans(self) -> set[PeerID]:
        return set(self.bans.active())

    # -- discovery -------------------------------------------------------------------------
    async def lookup(self, block: int | None = None) -> list[WorkerRecord]:
        """One DHT read of the model's records (offline ones included: they replace the
        online record they follow); ``block``: only records covering that block."""
        if block is not None:
            return list(await self.dht.find_block_providers(self.model_id, block))
        return list(await self.dht.list_records(self.model_id))

    async def records(self, gaps: Sequence[int] = ()) -> list[WorkerRecord]:
        """Live records of the model: the union of this lookup (plus one per block of
        ``gaps``) with what earlier lookups returned, newest record per worker."""
        got: list[list[WorkerRecord]] = []

        async def one(block: int | None) -> None:
            got.append(await self.lookup(block))

        with trio.move_on_after(max(self.rpc_timeout, 5.0)) as scope:
            async with trio.open_nursery() as nursery:
                for block in (None, *gaps):
                    nursery.start_soon(one, block)
        if scope.cancelled_caught:
            log.warning("Client: DHT lookup for %s timed out", self.model_id)
        for rec in (r for recs in got for r in self.book.merge(recs)):
            if self._node is not None:   # (tests drive discovery without a transport)
                self._node.learn_reach(rec.peer_id, rec.reach)
        for peer, ban in self.bans.see(self.book.all()):
            log.warning("Client: worker %s announced itself again (a new incarnation): lifting its ban (%s)",
                        peer.short(), ban.why)
        return self.book.live()

    def options_from(self, records: Sequence[WorkerRecord]) -> list[SpanOption]:
        out = []
        for r in records:
            if r.state != WorkerState.ONLINE or self.transport not in r.transports:
                continue
            if self.allow_peers is not None and not self.allow_peers.allows(r.peer_id):
                continue
            out.append(SpanOption(r.peer_id, r.start, r.stop, r.host, r.port,
                                  tuple(t for t in Transport if t in r.transports),
                                  r.block_ms, r.cache_tokens_free, {"ts": r.timestamp, "model": r.model_id}))
        return out

    async def find_route(
        self,
        start: int,
        stop: int,
        *,
        min_cache_tokens: int = 0,
        prefer: Sequence[tuple[PeerID, int, int]] = (),
        exclude: Sequence[PeerID] = (),
    ) -> list[SpanOption]:
        """Discover workers and choose the fastest chain for ``[start, stop)``.

        Retries while blocks are missing (workers may be joining) for at most
        ``PYMESH_DISCOVERY_TIMEOUT`` seconds, each retry adding a lookup of the missing
        block to the model-wide one, then raises :class:`NoRouteError` naming the first
        layer nobody serves. When the workers serving a block are all banned it waits
        instead for the first of their bans to end (a new incarnation's record may lift
        one sooner). Deprioritised workers cost :data:`PENALTY_MS` more, except where
        ``prefer`` keeps them (they hold the session already).
        """
        deadline = self.clock.monotonic() + self.discovery_timeout
        delay = 0.2
        gaps: list[int] = []
        while True:
            records = await self.records(gaps)
            options = self.options_from(records)
            await self.measure_rtts([o for o in options if o.peer not in self.rtt_ms])
            banned = self.current_bans() | set(exclude) | set(self.not_listing)
            rtt = dict(self.rtt_ms)
            for p in self.bans.penalised():
                rtt[p] = rtt.get(p, DEFAULT_RTT_MS) + PENALTY_MS
            route_over = functools.partial(choose_route, options, start, stop, rtt_ms=rtt, banned=banned,
                                           prefer=prefer, avoid_pairs=self.bans.avoided_pairs(),
                                           pair_penalty_ms=PENALTY_MS)
            try:
                return route_over(min_cache_tokens=min_cache_tokens)
            except NoRouteError as exc:
                refused = self._not_listed_everywhere(options, exc.missing_block) \
                    or self._convicted_everywhere(options, exc.missing_block)
                if refused is not None:
                    raise refused from None
                if min_cache_tokens > 0:
                    # records are snapshots (republished every heartbeat): a worker that was
                    # full when it last announced may have room now. Try the route the cache
                    # filter ruled out; a worker that really is full refuses the session.
                    try:
                        route = route_over()
                    except NoRouteError:
                        pass
                    else:
                        log.info("Client: the records of layer %s's workers show no free cache for %d tokens; "
                                 "trying them anyway (the records may be stale)", exc.missing_block,
                                 min_cache_tokens)
                        return route
                now = self.clock.monotonic()
                wake = now + delay
                gap = first_uncovered_block(options, start, stop)
                gaps = [gap] if gap is not None else []
                ban_end = None if gap is not None else self._earliest_ban_end(options, exc.missing_block)
                if ban_end is not None and ban_end > deadline:
                    # every provider is banned: wait for the first ban to end (or for a new
                    # incarnation's record to lift one) instead of giving up before it does
                    log.info("Client: every worker for layer %s is banned; waiting %.1f s for the first ban "
                             "to end", exc.missing_block, ban_end - now)
                    deadline = ban_end
                if ban_end is not None:
                    wake = min(wake, ban_end)
                if wake > deadline:
                    raise await self._explain(exc, records, options) from None
                log.info("Client: %s; retrying", exc)
            await trio.sleep(max(wake - self.clock.monotonic(), 0.0))
            delay = min(delay * 2, 2.0)

    def _not_listed_everywhere(self, options: Sequence[SpanOption], block: int | None) -> NoRouteError | None:
        """If every worker serving ``block`` refused this client for its allowlist, the error
        to fail with at once (waiting cannot help)."""
        providers = providers_of(options, block)
        if not providers or not providers <= set(self.not_listing):
            return None
        me = self.identity.peer_id
        return NoRouteError(
            f"this client ({me}) is not on the allowlist of the workers serving layer {block}: "
            f"{len(providers)} worker(s) refused it. Ask their operators to add this peer id to their "
            "--allow-peers file, or run the client with --identity FILE holding a key they list "
            "(`pymesh identity show FILE` prints its peer id)", block)

    def _convicted_everywhere(self, options: Sequence[SpanOption], block: int | None) -> NoRouteError | None:
        """If every worker serving ``block`` was convicted of wrong outputs, the error to fail
        with at once (convictions do not end)."""
        providers = providers_of(options, block)
        convicted = {p for p, ban in self.bans.active().items() if ban.cause is BanCause.CONVICTED}
        if not providers or not providers <= convicted:
            return None
        where = f" (blocklist {self.blocklist.path})" if self.blocklist is not None else ""
        return NoRouteError(
            f"every worker serving layer {block} ({len(providers)}) was convicted of wrong outputs and is "
            f"blocklisted{where}: start or find another worker for layer {block}; `pymesh blocklist list` "
            "shows why each was convicted", block)

    def _earliest_ban_end(self, options: Sequence[SpanOption], block: int | None) -> float | None:
        return None if block is None else self.bans.earliest_end(providers_of(options, block))

    async def _explain(self, exc: NoRouteError, records: Sequence[WorkerRecord],
                       options: Sequence[SpanOption]) -> NoRouteError:
        """The most useful reason discovery failed: bootstrap unreachable, another model,
        another transport, or a layer nobody serves."""
        waited = f"(gave up after {self.discovery_timeout:.0f} s)"
        block = exc.missing_block
        if (hint := self.book.mixed_hint(block)) is not None:   # other quantizations serve it
            return NoRouteError(f"{exc} {waited}; {hint}", block)
        if not records and len(self.dht.core.routing) == 0:
            boots = ", ".join(str(b) for b in self.bootstrap)
            return NoRouteError(f"the bootstrap node {boots} did not answer: no DHT node is reachable from here "
                                f"{waited}; check the --bootstrap address and that the bootstrap is running", block)
        if not records:
            models: list[str] = []
            with trio.move_on_after(5):
                models = sorted(await self.dht.list_models())
            if not models:
                return NoRouteError(f"{exc} {waited}; the DHT holds no worker records at all (are the workers "
                                    "running and bootstrapped on the same bootstrap node?)", block)
            return NoRouteError(f"{exc} {waited}; no worker announces model {self.model_id} -- the swarm serves "
                                f"{', '.join(models[:8])}; use the same model folder (or --model-name) as the "
                                "workers", block)
        if block is not None:
            others = sorted({t for r in records if r.state == WorkerState.ONLINE and r.covers(block)
                             for t in r.transports if t != self.transport})
            if others and not any(o.start <= block < o.stop for o in options):
                return NoRouteError(f"no worker serves layer {block} over {self.transport}: its workers speak only "
                                    f"{', '.join(others)}; run the client with --transport {others[0]} {waited}",
                                    block)
        refused = f"; records of workers not on the allowlist were ignored ({self.book.refused} seen)"
        return NoRouteError(f"{exc} {waited}{refused if self.allow_peers is not None and self.book.refused else ''}",
                            block)

    async def measure_rtts(self, options: Sequence[SpanOption]) -> None:
        """Measure the RTT to each option's worker; one that does not answer is banned and
        not probed again for this record (a dead address costs one timeout, not one per
        route search)."""
        banned = self.current_bans()

        def key(o: SpanOption) -> tuple[PeerID, str, int, float]:
            ts = o.extra.get("ts", 0.0)
            return (o.peer, o.host, o.port, ts if isinstance(ts, float) else 0.0)

        async def one(o: SpanOption) -> None:
            try:
                with trio.fail_after(self.rpc_timeout):
                    conn = await self.connect(o)  # the handshake is not part of the RTT
                    t0 = time.perf_counter()
                    await conn.call(sw.INFO, sw.Info().to_meta())
                self.rtt_ms[o.peer] = (time.perf_counter() - t0) * 1000.0
            except (PymeshError, trio.TooSlowError, OSError) as exc:
                why = str(exc) or f"no answer within {self.rpc_timeout:.0f} s"
                self.bans.probe_failed(key(o))
                self.ban(o.peer, f"unreachable at {o.host}:{o.port} over {self.transport}: {why}",
                         BanCause.UNREACHABLE)

        seen: set[PeerID] = set()
        async with trio.open_nursery() as nursery:
            for o in options:
                if o.peer in banned or self.bans.probe_recently_failed(key(o)):
                    continue
                if o.peer not in seen:
                    seen.add(o.peer)
                    nursery.start_soon(one, o)

    async def connect(self, option: SpanOption) -> "Connection":
        return await self.node.connect(option.host, option.port, option.peer)

    async def request(self, option: SpanOption, message: Request, tensors: Sequence[TensorBlob] = (),
                      *, timeout: float | None = None) -> tuple[Meta, list[TensorBlob]]:
        """Call ``message.METHOD`` on the worker of ``option``; the reply is still untrusted."""
        return await self.call(option, message.METHOD, message.to_meta(), tensors, timeout=timeout)

    async def call(self, option: SpanOption, method: str, meta: Meta, tensors: Sequence[TensorBlob] = (),
                   *, timeout: float | None = None) -> tuple[Meta, list[TensorBlob]]:
        t = timeout if timeout is not None else self.rpc_timeout
        try:
            with trio.fail_after(t):
                conn = await self.connect(option)
                return await conn.call(method, meta, tensors, timeout=t)
        except trio.TooSlowError:
            raise PeerUnavailable(f"worker {option.peer.short()} did not answer {method} within {t:.0f} s") from None


def _leaves(group: BaseException) -> list[BaseException]:
    if isinstance(group, BaseExceptionGroup):
        return [leaf for e in group.exceptions for leaf in _leaves(e)]
    return [group]
