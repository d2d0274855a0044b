"""The monitor's trio loop: poll the DHT, ping the workers, redraw.

A throwaway DHT node (fresh identity, ephemeral port) joins through the bootstrap
address, lists every worker record, measures each live worker's round trip, feeds
:func:`pymesh.monitor.state.update` and hands the result to the pure view. rich's
``Live`` runs with ``auto_refresh=False`` and is refreshed from this loop only, never
from rich's own thread.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Awaitable, Callable, Mapping, Protocol, Sequence

import trio
from rich.console import Console

from pymesh.monitor.state import MonitorState, RecordLike, admissible, peer_text, update
from pymesh.monitor.view import render
from pymesh.proto.addr import PeerAddr
from pymesh.proto.allowlist import PeerAllowlist
from pymesh.proto.vocab import Transport, WorkerState
from pymesh.settings import Settings

if TYPE_CHECKING:
    from pymesh.net.rpc import RpcNode
    from pymesh.proto.identity import Identity

log = logging.getLogger(__name__)

#: ``async (record) -> rtt in ms`` or None when the worker did not answer.
Pinger = Callable[[RecordLike], Awaitable["float | None"]]


@dataclass
class MonitorOptions:
    bootstrap: Sequence[PeerAddr]
    model: str | None = None
    interval: float = 2.0
    poll_timeout: float = 5.0
    rtt_timeout: float = 1.0
    host: str = "0.0.0.0"
    model_blocks: dict[str, int] | None = None
    settings: Settings = field(default_factory=Settings)   # DHT and transport timers (PYMESH_*)
    allow_peers: PeerAllowlist | None = None   # --allow-peers: records of other signers are ignored
    #: --blocklist: read at every poll, peer text -> why of the flagged workers (None: no blocklist)
    flagged: Callable[[], Mapping[str, str]] | None = None


class RecordSource(Protocol):
    """What the monitor needs of its DHT node (a :class:`pymesh.net.dht.DHTNode`, or a test's stand-in)."""

    async def list_records(self, model_id: str | None = None) -> Sequence[RecordLike]: ...


#: identity -> the DHT node's async context manager
NodeFactory = Callable[["Identity"], AbstractAsyncContextManager[RecordSource]]


class SwarmPoller:
    """One DHT node and the per-poll work: records, bootstrap check, RTTs."""

    def __init__(self, node: RecordSource, options: MonitorOptions, pinger: Pinger | None) -> None:
        self.node = node
        self.options = options
        self.pinger = pinger

    async def bootstrap_reachable(self) -> bool | None:
        """Ping the bootstrap nodes through the DHT node, when it offers a ping."""
        ping = getattr(self.node, "ping", None)
        if ping is None:
            return None
        for addr in self.options.bootstrap:
            with trio.move_on_after(self.options.rtt_timeout):
                try:
                    infos = await trio.socket.getaddrinfo(addr.host, addr.port, type=trio.socket.SOCK_DGRAM)
                    host = str(infos[0][4][0])
                    await ping((host, addr.port))
                    return True
                except Exception as exc:  # a failed ping is the answer, not a crash
                    log.debug("bootstrap %s ping failed: %s", addr, exc)
        return False

    async def records(self) -> list[RecordLike]:
        got: list[RecordLike] = []
        with trio.fail_after(self.options.poll_timeout):
            got.extend(await self.node.list_records(None))
        return got

    async def rtts(self, records: Sequence[RecordLike]) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        if self.pinger is None:
            return out
        pinger = self.pinger

        async def one(rec: RecordLike) -> None:
            rtt: float | None = None
            with trio.move_on_after(self.options.rtt_timeout):
                try:
                    rtt = await pinger(rec)
                except Exception as exc:
                    log.debug("ping %s failed: %s", peer_text(rec.peer_id)[:10], exc)
            out[peer_text(rec.peer_id)] = rtt

        async with trio.open_nursery() as nursery:
            for rec in records:
                if rec.state != WorkerState.OFFLINE:
                    nursery.start_soon(one, rec)
        return out

    async def poll(self, state: MonitorState) -> MonitorState:
        error: str | None = None
        records: list[RecordLike] = []
        try:
            records = await self.records()
        except trio.TooSlowError:
            error = f"listing records took longer than {self.options.poll_timeout:.0f}s"
        except Exception as exc:
            error = f"listing records failed: {exc}"
            log.debug("poll failed", exc_info=True)
        if error is not None:
            # Keep showing the last known workers rather than an empty swarm.
            records = list(_previous_records(state))
        # Only records the view will show are pinged: the monitor never dials a host that an
        # unlisted signer (or an impossible record) names.
        shown = [r for r in records if admissible(state, r, self.options.model_blocks)]
        boot, rtts = await self.bootstrap_reachable(), await self.rtts(shown)
        return update(
            state, records, now=time.time(), rtts_ms=rtts, bootstrap_ok=boot, error=error,
            model_blocks=self.options.model_blocks, flagged=self.flagged(),
        )

    def flagged(self) -> Mapping[str, str] | None:
        """The blocklist's current entries (None: no blocklist, or unreadable now: the
        previous ones stay shown)."""
        if self.options.flagged is None:
            return None
        try:
            return self.options.flagged()
        except Exception as exc:  # a file being rewritten or hand-edited: keep the last good list
            log.warning("monitor: blocklist not read: %s", exc)
            return None


def _previous_records(state: MonitorState) -> list[RecordLike]:
    return list(state.workers)  # WorkerView has the RecordLike fields (peer_id as text)


#: The worker's cheapest call (``pymesh.worker.wire.INFO``); its round trip is the RTT.
INFO_METHOD = "pm.info"


def make_rpc_pinger(rpc: "RpcNode") -> Pinger:
    """A pinger timing the worker's ``pm.info`` call over an open :class:`RpcNode`.

    The first call to a worker also dials it; that call is not timed, the second is.
    """

    async def ping(rec: RecordLike) -> float | None:
        rpc.learn_reach(rec.peer_id, getattr(rec, "reach", None))   # behind NAT: via its relays
        conn = await rpc.connect(rec.host, rec.port, rec.peer_id)
        await conn.call(INFO_METHOD, {}, timeout=2.0)
        t0 = time.perf_counter()
        await conn.call(INFO_METHOD, {}, timeout=2.0)
        return (time.perf_counter() - t0) * 1000.0

    return ping


async def monitor_loop(
    options: MonitorOptions,
    *,
    console: Console,
    once: bool = False,
    pinger_factory: Callable[[], Pinger | None] | None = None,
    node_factory: NodeFactory | None = None,
    max_polls: int | None = None,
    screen: bool = True,
) -> MonitorState:
    """Run the monitor; with ``once`` return after one snapshot is printed.

    ``node_factory(identity)`` returns the async context manager of the DHT node (tests
    pass a stand-in); ``max_polls`` bounds the live loop (None: until cancelled).
    """
    from pymesh.proto.identity import Identity

    ident = Identity.generate()
    allow = options.allow_peers
    state = MonitorState(
        bootstrap=", ".join(str(a) for a in options.bootstrap), model_filter=options.model,
        allow_peers=None if allow is None else frozenset(p.to_text() for p in allow),
    )
    if node_factory is None:
        from pymesh.net.dht import DHTNode

        def node_factory(identity: "Identity") -> AbstractAsyncContextManager[RecordSource]:
            # read-only (BEP 43): the monitor comes and goes; it must not linger in routing tables
            return DHTNode(identity, host=options.host, port=0, bootstrap=list(options.bootstrap),
                           config=options.settings.dht_config(), read_only=True)

    async with node_factory(ident) as node:
        async with _maybe_rpc(ident, pinger_factory, options.settings) as pinger:
            poller = SwarmPoller(node, options, pinger)
            if once:
                state = await poll_until_records(poller, state, options.poll_timeout)
                console.print(render(state))
                return state
            from rich.live import Live

            polls = 0
            with Live(render(state), console=console, auto_refresh=False, screen=screen,
                      redirect_stderr=False) as live:
                while max_polls is None or polls < max_polls:
                    state = await poller.poll(state)
                    polls += 1
                    live.update(render(state), refresh=True)
                    if max_polls is None or polls < max_polls:
                        await trio.sleep(options.interval)
    return state


async def poll_until_records(poller: SwarmPoller, state: MonitorState, budget: float) -> MonitorState:
    """One snapshot; a fresh DHT node may need a moment, so retry briefly while empty."""
    deadline = trio.current_time() + budget
    state = await poller.poll(state)
    while not state.workers and trio.current_time() + 0.5 < deadline:
        await trio.sleep(0.5)
        state = await poller.poll(state)
    return state


class _maybe_rpc:
    """``async with``: a pinger over one RpcNode per transport, or None without a transport."""

    def __init__(self, ident: "Identity", factory: Callable[[], Pinger | None] | None, settings: Settings) -> None:
        self.ident = ident
        self.factory = factory
        self.settings = settings
        self.nodes: dict[Transport, "RpcNode"] = {}

    async def __aenter__(self) -> Pinger | None:
        if self.factory is not None:
            return self.factory()
        try:
            from pymesh.net.rpc import RpcNode
        except ImportError:
            log.info("pymesh.net.rpc is not available: RTT column stays blank")
            return None
        for transport in Transport:
            node = RpcNode(self.ident, transport=transport.value, config=self.settings.transport_config())
            await node.__aenter__()
            self.nodes[transport] = node
        by_transport: dict[str, Pinger] = {t.value: make_rpc_pinger(node) for t, node in self.nodes.items()}

        async def ping(rec: RecordLike) -> float | None:
            # The worker's first listed transport that this monitor speaks.
            for name in rec.transports:
                if name in by_transport:
                    return await by_transport[name](rec)
            return None

        return ping

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        for node in reversed(list(self.nodes.values())):
            await node.__aexit__(exc_type, exc, tb)
