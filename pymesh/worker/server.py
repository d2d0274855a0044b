"""A worker process: transport node + DHT node + span runtime + announcements.

Life of a worker: bind the transport (``--port``) and the DHT (``--dht-port``, default
port+1), choose its blocks (``--layers`` or automatic placement from the swarm's
records), announce them as "joining", load them, measure throughput, announce
"online", then refresh its record on a heartbeat until Ctrl-C/SIGTERM, when it
announces "offline" and exits. Without ``--layers`` it re-reads the swarm now and then
and moves when that clearly helps (blocks nobody serves, or a much better bottleneck),
counting only other workers' online records (and, with ``allow_peers``, listed ones) whose
address answers as the record says (``reachability``: probed, cached, bounded per round), with
hysteresis (``placement.MoveGuard``), and not while its sessions are stepping.
"""

from __future__ import annotations

import logging
import random
import signal
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import trio

from pymesh.errors import ConfigError, PymeshError
from pymesh.net.clock import Clock, TrioClock
from pymesh.proto import session_wire as sw
from pymesh.proto.addr import parse_addr
from pymesh.proto.identity import Identity, PeerID, default_identity_path
from pymesh.proto.records import WorkerRecord
from pymesh.proto.vocab import Transport, WorkerState
from pymesh.settings import Settings
from pymesh.worker import placement
from pymesh.worker.directory import PeerFilter, RecordDirectory
from pymesh.worker.nat import NatOptions, NatStanding
from pymesh.net.relay import RelayLimits
from pymesh.worker.reachability import ReachabilityCache
from pymesh.worker.runtime import Runtime, Throughput, block_bytes, load_runtime
from pymesh.worker.sessions import SessionTable

if TYPE_CHECKING:
    from pymesh.net.dht import DHTNode
    from pymesh.net.rpc import Connection, RpcNode
    from pymesh.worker.service import WorkerService

log = logging.getLogger(__name__)


@dataclass
class WorkerOptions:
    bootstrap: list[str]
    layers: tuple[int, int] | None = None          # [start, stop)
    model_path: str | None = None
    #: ``--quantize``: the block format the weight matrices are computed in (model id suffix)
    quantize: str | None = None
    model_name: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    host: str = "0.0.0.0"
    port: int = 0
    dht_port: int | None = None
    announce_addr: str | None = None
    transport: str = "quic"                        # quic, tcp or both
    cache_tokens: int = 8192
    identity: str | None = None
    threads: int | None = None                     # what the CLI set (reported only)
    max_blocks: int | None = None                  # None: settings.worker.max_blocks
    num_layers: int | None = None                  # echo mode without --layers
    session_idle: float | None = None              # None: settings.worker.session_idle
    rebalance_period: float | None = None          # None: settings.worker.rebalance_period
    progress: bool = False
    settings: Settings = field(default_factory=Settings)
    #: serve only listed clients and push only to listed workers (``--allow-peers``); None: anyone
    allow_peers: PeerFilter | None = None
    #: ``--reachability``: auto (dial-back check), public, or nat (reach me via relays)
    reachability: str = "auto"
    #: ``--relay``: carry circuits for peers behind NAT, within these limits
    relay: bool = False
    relay_limits: RelayLimits = field(default_factory=RelayLimits)

    def transports(self) -> list[Transport]:
        if self.transport == "both":
            return [Transport.QUIC, Transport.TCP]
        return [Transport.parse(self.transport)]


class Worker:
    def __init__(self, opts: WorkerOptions, *, clock: Clock | None = None) -> None:
        self.opts = opts
        self.settings = opts.settings
        self.clock: Clock = clock or TrioClock()
        if opts.identity or opts.port:
            home = self.settings.runtime.home
            self.identity = Identity.load_or_create(opts.identity or default_identity_path(f"worker-{opts.port}", home))
        else:  # any port: no stable key file to share with other workers on this machine
            self.identity = Identity.generate()
        self.peer_id: PeerID = self.identity.peer_id
        self.model_id = self._model_id()
        #: a mixed GGUF file's weight matrices counted by the type they compute in (the record's
        #: ``wt``); empty when the id's suffix (or its absence) says it all
        self.weight_types = self._weight_types()
        self.num_blocks: int | None = opts.num_layers
        self.throughput = Throughput(1.0, 1.0)
        self._service: WorkerService | None = None
        self._dht: DHTNode | None = None
        self.nodes: dict[Transport, RpcNode] = {}
        self.directory = RecordDirectory(self._read_records, self.clock, opts.transports(), model_id=self.model_id)
        self.move_guard = placement.MoveGuard()
        self.reachability = ReachabilityCache(self._probe, self.clock,
                                              timeout=min(self.settings.worker.next_hop_timeout, 3.0))
        self.port = opts.port
        self.nat: NatStanding | None = None
        self.state = WorkerState.JOINING
        self.stopping = trio.Event()

    @property
    def service(self) -> "WorkerService":
        if self._service is None:
            raise RuntimeError("the worker's service starts in serve()")
        return self._service

    @property
    def dht(self) -> "DHTNode":
        if self._dht is None:
            raise RuntimeError("the worker's DHT node starts in serve()")
        return self._dht

    async def _read_records(self) -> list[WorkerRecord]:
        recs = await self.dht.find_model_records(self.model_id)
        for rec in recs:   # a next hop behind NAT is dialed through its relays
            for node in self.nodes.values():
                node.learn_reach(rec.peer_id, rec.reach)
        return recs

    def _model_id(self) -> str:
        if self.opts.model_path is None:
            return self.opts.model_name or "echo"
        from pymesh.model.fingerprint import model_id

        return model_id(Path(self.opts.model_path), self.opts.model_name, self.opts.quantize)

    def _weight_types(self) -> tuple[tuple[str, int], ...]:
        path = self.opts.model_path
        if path is None:
            return ()
        from pymesh.model.gguf_file import is_gguf

        if not is_gguf(path):
            return ()   # a folder: every block matrix in the --quantize format, or float
        from pymesh.model.gguf_identity import weight_types

        counts = weight_types(path)
        return tuple(sorted(counts.items())) if len(counts) > 1 else ()

    # -- records ---------------------------------------------------------------------------
    def record(self, state: WorkerState) -> WorkerRecord:
        rt: Runtime = self.service.runtime
        return WorkerRecord(
            peer_id=self.peer_id, model_id=self.model_id, start=rt.start, stop=rt.stop, host=self.announced_host(),
            port=self.port, transports=tuple(t.value for t in self.nodes), state=state,
            block_ms=self.throughput.block_ms, tokens_per_s=self.throughput.tokens_per_s,
            cache_tokens_free=self.service.table.free_tokens,
            cache_tokens_total=self.service.table.budget_tokens,
            sessions=len(self.service.table.sessions), weight_types=self.weight_types,
            reach=self.nat.reach() if self.nat is not None else None,
        ).signed(self.identity)

    def announced_host(self) -> str:
        """--announce-addr, else --host unless a wildcard, else the address several DHT peers
        agree they see, else where a dial-back checker saw this worker, else 127.0.0.1."""
        opts = self.opts
        if opts.announce_addr:
            return opts.announce_addr
        if opts.host not in ("0.0.0.0", "::", ""):
            return opts.host
        belief = self._dht.core.observed.belief() if self._dht is not None else None
        if belief is not None:
            return belief[0]
        return self.nat.public_ip if self.nat is not None and self.nat.public_ip else "127.0.0.1"

    async def announce(self, state: WorkerState) -> None:
        self.state = state
        self.service.state = state
        try:
            with trio.move_on_after(10):
                stored = await self.dht.publish_record(self.record(state))
                log.debug("record (%s) stored on %d DHT nodes", state, stored)
        except Exception as exc:  # the heartbeat retries; a publish failure must not kill us
            log.warning("announcing %s failed: %s", state, exc)

    # -- placement -------------------------------------------------------------------------
    async def _other_records(self, *, online_only: bool = False) -> list[WorkerRecord]:
        """Other workers' verified records of this model (not offline; ``online_only``: serving
        now, not joining), from listed peers only when the worker has an allowlist."""
        allow = self.opts.allow_peers
        with trio.move_on_after(10):
            recs = await self.directory.records(max_age=0)
            return [r for r in recs if r.peer_id != self.peer_id and r.state != WorkerState.OFFLINE
                    and r.model_id == self.model_id and (not online_only or r.state == WorkerState.ONLINE)
                    and (allow is None or allow.allows(r.peer_id))]
        log.warning("reading the swarm's records timed out; assuming an empty swarm")
        return []

    async def _counted_records(self, *, online_only: bool = False) -> tuple[list[WorkerRecord], int]:
        """The other records placement counts: those whose worker answered a probe at the
        announced address; and how many were left unprobed this round (not counted)."""
        found = await self.reachability.reachable(await self._other_records(online_only=online_only))
        return found.records, found.unknown

    async def _others(self, *, online_only: bool = False) -> list[placement.Announced]:
        recs, _ = await self._counted_records(online_only=online_only)
        return [placement.Announced(r.start, r.stop, r.tokens_per_s) for r in recs]

    async def _probe(self, rec: WorkerRecord) -> bool:
        """Does ``rec``'s peer answer at its address for this model and span? (pm.info)"""
        common = [t for t in self.nodes if t.value in rec.transports]
        if not common:
            return False
        try:
            conn = await self._dial(common[0], rec.host, rec.port, rec.peer_id)
            reply, _ = await conn.call(sw.INFO, sw.Info().to_meta(), timeout=self.reachability.timeout)
            info = sw.InfoReply.from_meta_untrusted(reply)
        except (PymeshError, OSError) as exc:
            log.debug("probing %s at %s:%d: %s", rec.peer_id.short(), rec.host, rec.port, exc)
            return False
        return (info.peer, info.model, info.start, info.stop) == (rec.peer_id, rec.model_id, rec.start, rec.stop)

    async def _settle_span(self, start: int, stop: int) -> tuple[int, int]:
        """Workers joining at the same moment may pick the same span. After announcing
        "joining", wait a little and look again: if a worker with a smaller peer ID
        overlaps ours, choose again knowing about it (the smaller ID keeps its choice)."""
        assert self.num_blocks is not None
        await trio.sleep(random.uniform(0.5, 1.0) * self.settings.worker.join_settle)
        recs, _ = await self._counted_records()
        if not any(r.start < stop and start < r.stop and r.peer_id < self.peer_id for r in recs):
            return start, stop
        others = [placement.Announced(r.start, r.stop, r.tokens_per_s) for r in recs]
        new = placement.choose_start(self.num_blocks, stop - start, others)
        if new != start:
            log.info("another worker joined on layers %d-%d at the same time; taking %d-%d instead",
                     start, stop - 1, new, new + stop - start - 1)
            log.info("Worker announcing layers %d-%d", new, new + stop - start - 1)
        return new, new + stop - start

    def _how_many_blocks(self) -> int:
        assert self.opts.model_path is not None and self.num_blocks is not None
        per_block, kv_per_token_block, n = block_bytes(self.opts.model_path, self.opts.dtype, self.opts.quantize)
        cap = self.opts.max_blocks or self.settings.worker.max_blocks
        avail = placement.available_memory_bytes(self.opts.device)
        cache = self.opts.cache_tokens * kv_per_token_block
        count = placement.blocks_that_fit(avail, per_block + cache, 0, 256 << 20, n, max_blocks=cap)
        log.info("%.1f GiB available: room for %d of %d blocks", avail / 2**30, count, n)
        return count

    async def _choose_span(self) -> tuple[int, int]:
        if self.opts.layers is not None:
            return self.opts.layers
        if self.num_blocks is None:
            raise ConfigError("echo mode without --layers needs --num-layers to place itself")
        length = self._how_many_blocks() if self.opts.model_path else min(self.opts.max_blocks or self.num_blocks, self.num_blocks)
        start = placement.choose_start(self.num_blocks, length, await self._others())
        return start, start + length

    async def _load(self, start: int, stop: int) -> Runtime:
        opts = self.opts
        rt = await trio.to_thread.run_sync(
            lambda: load_runtime(opts.model_path, start, stop, device=opts.device, dtype_name=opts.dtype,
                                 progress=opts.progress, quantize=opts.quantize))
        ws = self.settings.worker
        self.throughput = await trio.to_thread.run_sync(
            lambda: rt.measure_throughput(announced=ws.throughput, skip=ws.skip_throughput))
        log.info("throughput: %.2f ms per block per token, %.1f tokens/s for the span",
                 self.throughput.block_ms, self.throughput.tokens_per_s)
        return rt

    async def _rebalance_loop(self) -> None:
        assert self.num_blocks is not None
        period = self.opts.rebalance_period or self.settings.worker.rebalance_period
        while True:
            await trio.sleep(period * random.uniform(0.8, 1.2))
            rt: Runtime = self.service.runtime
            mine = placement.Announced(rt.start, rt.stop, self.throughput.tokens_per_s)
            decision = await self._move_decision(mine)
            if not self.move_guard.admit(decision):
                continue
            # Random delay, then look again: two workers seeing the same gap should not both move.
            await trio.sleep(random.uniform(0.0, period / 2))
            decision = await self._move_decision(mine)
            if not decision.move:
                continue
            if self._sessions_active():
                log.info("sessions are stepping here: not moving to layers from %d now; will look again",
                         decision.new_start)
                continue
            new = (decision.new_start, decision.new_start + rt.stop - rt.start)
            log.info("Worker moving from layers %d-%d to %d-%d: %s", rt.start, rt.stop - 1, new[0],
                     new[1] - 1, decision.reason)
            log.info("Worker announcing layers %d-%d", new[0], new[1] - 1)
            await self.announce(WorkerState.OFFLINE)
            runtime = await self._load(*new)
            dropped = self.service.swap_runtime(runtime)
            if dropped:
                log.info("dropped %d session(s) on the old span; their clients recover elsewhere", dropped)
            await self.announce(WorkerState.ONLINE)

    async def _move_decision(self, mine: placement.Announced) -> placement.MoveDecision:
        """``should_move`` over the reachable online records; no move while records are left
        unprobed (a move drops sessions: not on partial knowledge)."""
        assert self.num_blocks is not None
        recs, unknown = await self._counted_records(online_only=True)
        if unknown:
            return placement.MoveDecision(False, mine.start, f"{unknown} record(s) not probed yet")
        others = [placement.Announced(r.start, r.stop, r.tokens_per_s) for r in recs]
        return placement.should_move(self.num_blocks, mine, others)

    def _sessions_active(self) -> bool:
        """Any session computing or stepped within the last step_wait seconds."""
        now = self.clock.monotonic()
        wait = self.settings.worker.step_wait
        return any(s.busy or (s.stepped and now - s.last_used < wait) for s in self.service.table.sessions.values())

    # -- main ------------------------------------------------------------------------------
    async def serve(self, *, task_status: "trio.TaskStatus[Worker]" = trio.TASK_STATUS_IGNORED) -> None:
        from pymesh.net.dht import DHTNode
        from pymesh.net.rpc import RpcNode
        from pymesh.worker.faults import Corruptor
        from pymesh.worker.service import WorkerService

        opts = self.opts
        boots = [parse_addr(b) for b in opts.bootstrap]
        transports = opts.transports()
        if opts.model_path is not None:
            from pymesh.model.config import load_config

            cfg = load_config(Path(opts.model_path))
            self.num_blocks = cfg.num_hidden_layers
            hidden: int | None = cfg.hidden_size
            if opts.layers is not None and opts.layers[1] > cfg.num_hidden_layers:
                raise ConfigError(f"--layers {opts.layers[0]}-{opts.layers[1] - 1}: the model has only "
                                  f"{cfg.num_hidden_layers} layers (0-{cfg.num_hidden_layers - 1})")
        else:
            hidden = None
        any_port = not self.port  # --port 0: whatever port is free
        async with trio.open_nursery() as nursery:
            for t in transports:
                node = RpcNode(self.identity, transport=t, config=self.settings.transport_config(),
                               clock=self.clock)
                await nursery.start(run_node, node)
                self.port = await node.listen(opts.host, self.port)
                self.nodes[t] = node
            dht_port = opts.dht_port if opts.dht_port is not None else (self.port + 1 if self.port else 0)
            dht = self._dht = DHTNode(self.identity, host=opts.host, port=dht_port, bootstrap=boots,
                                      config=self.settings.dht_config(), clock=self.clock)
            try:
                await nursery.start(run_node, dht)
            except ConfigError:
                if opts.dht_port is not None or not any_port:
                    raise
                # the transport took a free port, but port+1 is someone else's: any free one will do
                log.info("UDP %d is taken; the DHT listens on another free port", dht_port)
                dht = self._dht = DHTNode(self.identity, host=opts.host, port=0, bootstrap=boots,
                                          config=self.settings.dht_config(), clock=self.clock)
                await nursery.start(run_node, dht)
            log.info("worker %s: transport %s on port %d, DHT on UDP %d", self.peer_id,
                     "+".join(t.value for t in transports), self.port, dht.port)
            await self._start_nat(nursery)
            start, stop = await self._choose_span()
            log.info("Worker announcing layers %d-%d", start, stop - 1)
            table = SessionTable(opts.cache_tokens, opts.session_idle or self.settings.worker.session_idle,
                                 lapse=self.settings.worker.reserve_lapse)
            service = self._service = WorkerService(
                load_runtime(None, start, stop, device=opts.device, dtype_name=opts.dtype), table,
                model_id=self.model_id, peer=self.peer_id, dial=self._dial, resolve_next=self.directory,
                hidden_size=hidden, settings=self.settings.worker, clock=self.clock, allow_peers=opts.allow_peers,
                signer=self.identity, corruptor=Corruptor.from_settings(self.settings.worker))
            for node in self.nodes.values():
                service.register(node)
            await nursery.start(service.run)
            await self.announce(WorkerState.JOINING)
            if opts.layers is None:
                settled = await self._settle_span(start, stop)
                if settled != (start, stop):
                    start, stop = settled
                    self.service.swap_runtime(load_runtime(None, start, stop, device=opts.device,
                                                           dtype_name=opts.dtype))
                    await self.announce(WorkerState.JOINING)
            runtime = await self._load(start, stop)
            self.service.swap_runtime(runtime)
            await self.announce(WorkerState.ONLINE)
            log.info("Worker bootstrapped: %s serves %s layers %d-%d", self.peer_id.short(), self.model_id,
                     start, stop - 1)
            nursery.start_soon(self._heartbeat)
            if opts.layers is None:
                nursery.start_soon(self._rebalance_loop)
            task_status.started(self)
            await self.stopping.wait()
            log.info("worker stopping: announcing offline")
            with trio.move_on_after(5):
                await self.announce(WorkerState.OFFLINE)
            nursery.cancel_scope.cancel()

    async def _start_nat(self, nursery: trio.Nursery) -> None:
        """Reachability (direct, or relays and hole punching behind NAT) and, with --relay,
        relaying for others (:mod:`pymesh.worker.nat`)."""
        opts = self.opts
        nat = self.nat = NatStanding(self.nodes, self.dht, NatOptions(opts.reachability, opts.relay,
                                                                      opts.relay_limits),
                                     announce=self._reannounce)
        await nat.start(nursery, opts.host, self.port, announced=bool(opts.announce_addr))
        if nat.relay is not None and nat.keeper is not None:
            log.warning("--relay: this worker is behind NAT itself, so nobody could reach it as a relay; "
                        "it does not announce itself as one")
        elif nat.relay is not None:
            await self.dht.publish_record(nat.relay_record(self.identity, self.announced_host(), self.port))

    async def _reannounce(self) -> None:
        if self._service is not None:   # before the service starts, its first announcement carries it
            await self.announce(self.state)

    async def _dial(self, transport: Transport, host: str, port: int, peer: PeerID) -> "Connection":
        node = self.nodes.get(transport) or next(iter(self.nodes.values()))
        return await node.connect(host, port, peer)

    async def _heartbeat(self) -> None:
        period = self.dht.config.heartbeat
        while True:
            await trio.sleep(period)
            await self.announce(self.state)


async def run_node(node: AbstractAsyncContextManager[object], *,
                   task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Enter an async-context-managed node and keep it open until cancelled."""
    async with node:
        task_status.started()
        await trio.sleep_forever()


async def run_worker(opts: WorkerOptions, on_created: Callable[[Worker], object] | None = None) -> None:
    """Serve until SIGINT/SIGTERM, then announce offline and return (``on_created``: e.g. metrics)."""
    worker = Worker(opts)
    if on_created is not None:
        on_created(worker)
    async with trio.open_nursery() as nursery:
        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for sig in signals:
                    log.info("received %s", signal.Signals(sig).name)
                    worker.stopping.set()
                    return

        nursery.start_soon(watch_signals)
        await worker.serve()
        nursery.cancel_scope.cancel()
