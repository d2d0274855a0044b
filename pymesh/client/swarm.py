"""The client's view of the swarm: its transport node, its DHT node, discovery and bans.

:class:`Swarm` is what an inference session talks through. It reads worker records
from the DHT, measures round-trip times (``pm.info``), bans workers that failed for a
while, and routes the pushes workers send back (``pm.out``, ``pm.err``) to the
session they belong to.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Protocol, Sequence

import trio

from pymesh.errors import ConfigError, PeerUnavailable, PymeshError
from pymesh.client.routing import NoRouteError, SpanOption, choose_route
from pymesh.proto.addr import parse_addr
from pymesh.proto.identity import Identity, PeerID
from pymesh.worker import wire

log = logging.getLogger(__name__)


def env_float(name: str, default: float) -> float:
    text = os.environ.get(name, "")
    try:
        return float(text) if text else default
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} is not a number") from None


class PushSink(Protocol):
    def on_push(self, peer: PeerID, topic: str, meta: dict[str, Any], tensors: list[Any]) -> None: ...


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
    ) -> None:
        if transport not in ("quic", "tcp"):
            raise ConfigError(f"--transport {transport!r}: choose quic or tcp")
        if not bootstrap:
            raise ConfigError("give at least one --bootstrap address (HOST:PORT of a bootstrap node)")
        self.bootstrap = [parse_addr(b) for b in bootstrap]
        self.model_id = model_id
        self.transport = transport
        self.identity = identity or Identity.generate()
        self.dht_port = dht_port
        self.ban_seconds = env_float("PYMESH_BAN_SECONDS", 60.0)
        self.discovery_timeout = env_float("PYMESH_DISCOVERY_TIMEOUT", 20.0)
        self.rpc_timeout = env_float("PYMESH_CLIENT_RPC_TIMEOUT", 10.0)
        self.banned: dict[PeerID, float] = {}
        self.rtt_ms: dict[PeerID, float] = {}
        self.sinks: dict[bytes, PushSink] = {}
        self.node: Any = None
        self.dht: Any = None
        self._stack: Any = None

    async def __aenter__(self) -> "Swarm":
        from contextlib import AsyncExitStack

        from pymesh.net.dht import DHTNode
        from pymesh.net.rpc import RpcNode

        self._stack = AsyncExitStack()
        await self._stack.__aenter__()
        try:
            self.node = RpcNode(self.identity, transport=self.transport)
            await self._stack.enter_async_context(self.node)
            self.node.on_push(wire.OUT, self._on_push(wire.OUT))
            self.node.on_push(wire.ERR, self._on_push(wire.ERR))
            self.dht = DHTNode(self.identity, host="0.0.0.0", port=self.dht_port, bootstrap=self.bootstrap,
                               read_only=True)  # BEP 43: a client leaves no dead contact behind
            await self._stack.enter_async_context(self.dht)
        except BaseException:
            await self._stack.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self._stack.__aexit__(*exc)
        except BaseExceptionGroup as group:
            # The nodes' nurseries wrap whatever left the `async with` body in a group;
            # hand the caller the error it raised, not the wrapping.
            original = exc[1] if len(exc) > 1 else None
            if original is not None and _leaves(group) == [original]:
                raise original from None
            raise

    def _on_push(self, topic: str) -> Any:
        async def handler(conn: Any, meta: dict[str, Any], tensors: list[Any]) -> None:
            sid = meta.get("sid")
            sink = self.sinks.get(sid) if isinstance(sid, bytes) else None
            if sink is None:
                log.debug("push %s for an unknown session from %s dropped", topic, conn.peer.short())
                return
            sink.on_push(conn.peer, topic, meta, tensors)

        return handler

    # -- bans ------------------------------------------------------------------------------
    def ban(self, peer: PeerID, why: str) -> None:
        log.warning("Client: banning worker %s for %.0f s: %s", peer.short(), self.ban_seconds, why)
        self.banned[peer] = time.monotonic() + self.ban_seconds

    def current_bans(self) -> set[PeerID]:
        now = time.monotonic()
        for p in [p for p, until in self.banned.items() if until <= now]:
            del self.banned[p]
        return set(self.banned)

    # -- discovery -------------------------------------------------------------------------
    async def records(self) -> list[Any]:
        with trio.move_on_after(max(self.rpc_timeout, 5.0)):
            return list(await self.dht.find_model_records(self.model_id))
        log.warning("Client: DHT lookup for %s timed out", self.model_id)
        return []

    def options_from(self, records: Sequence[Any]) -> list[SpanOption]:
        out = []
        for r in records:
            if r.state != "online" or self.transport not in r.transports:
                continue
            out.append(SpanOption(r.peer_id, r.start, r.stop, r.host, r.port, tuple(r.transports),
                                  r.block_ms, r.cache_tokens_free))
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
        ``PYMESH_DISCOVERY_TIMEOUT`` seconds, then raises :class:`NoRouteError`
        naming the first layer nobody serves.
        """
        deadline = trio.current_time() + self.discovery_timeout
        delay = 0.2
        while True:
            records = await self.records()
            options = self.options_from(records)
            await self.measure_rtts([o for o in options if o.peer not in self.rtt_ms])
            banned = self.current_bans() | set(exclude)
            try:
                return choose_route(options, start, stop, rtt_ms=self.rtt_ms, banned=banned,
                                    min_cache_tokens=min_cache_tokens, prefer=prefer)
            except NoRouteError as exc:
                if trio.current_time() + delay > deadline:
                    raise await self._explain(exc, records, options) from None
                log.info("Client: %s; retrying", exc)
            await trio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _explain(self, exc: NoRouteError, records: Sequence[Any], options: Sequence[SpanOption]) -> NoRouteError:
        """The most useful reason discovery failed: bootstrap unreachable, another model,
        another transport, or a layer nobody serves."""
        waited = f"(gave up after {self.discovery_timeout:.0f} s)"
        block = exc.missing_block
        routing = getattr(getattr(self.dht, "core", None), "routing", None)
        if not records and routing is not None and len(routing) == 0:
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
            others = sorted({t for r in records if r.state == "online" and r.covers(block)
                             for t in r.transports if t != self.transport})
            if others and not any(o.start <= block < o.stop for o in options):
                return NoRouteError(f"no worker serves layer {block} over {self.transport}: its workers speak only "
                                    f"{', '.join(others)}; run the client with --transport {others[0]} {waited}",
                                    block)
        return NoRouteError(f"{exc} {waited}", block)

    async def measure_rtts(self, options: Sequence[SpanOption]) -> None:
        async def one(o: SpanOption) -> None:
            try:
                with trio.fail_after(self.rpc_timeout):
                    conn = await self.connect(o)  # the handshake is not part of the RTT
                    t0 = time.perf_counter()
                    await conn.call(wire.INFO, {})
                self.rtt_ms[o.peer] = (time.perf_counter() - t0) * 1000.0
            except (PymeshError, trio.TooSlowError, OSError) as exc:
                why = str(exc) or f"no answer within {self.rpc_timeout:.0f} s"
                self.ban(o.peer, f"unreachable at {o.host}:{o.port} over {self.transport}: {why}")

        seen: set[PeerID] = set()
        async with trio.open_nursery() as nursery:
            for o in options:
                if o.peer not in seen:
                    seen.add(o.peer)
                    nursery.start_soon(one, o)

    async def connect(self, option: SpanOption) -> Any:
        return await self.node.connect(option.host, option.port, option.peer)

    async def call(self, option: SpanOption, method: str, meta: dict[str, Any], tensors: Sequence[Any] = (),
                   *, timeout: float | None = None) -> tuple[dict[str, Any], list[Any]]:
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
