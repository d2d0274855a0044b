"""``RpcNode``: one per process; listens and dials with one identity over QUIC or TCP.

    async with RpcNode(identity, transport="quic") as node:
        node.register("echo", echo_handler)
        port = await node.listen("127.0.0.1", 0)
        conn = await node.connect(host, port, peer_id)
        meta, tensors = await conn.call("echo", {"x": 1}, [blob], timeout=5)

Transports: "quic" (default), "tcp" (TLS 1.3) and "tcp-plain" (no encryption; the
server's identity is only asserted, for benchmarks and trusted networks); ``node.transport``
is the :class:`~pymesh.proto.vocab.Transport` it speaks (QUIC or TCP).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import ssl
from collections import OrderedDict
from types import TracebackType
from typing import Any, Awaitable, Callable

import trio

import pymesh
from pymesh.errors import ConfigError, LocalProtocolError, PeerUnavailable, PymeshError
from pymesh.net import quic as quic_mod
from pymesh.net import tcp as tcp_mod
from pymesh.net.clock import Clock, TrioClock
from pymesh.net.config import TransportConfig
from pymesh.net.conn import CallContext, Connection, Handler, PushHandler, RemoteError
from pymesh.net.inflight import ByteBudget
from pymesh.proto.frames import Allocator, Meta, TensorBlob
from pymesh.net.quic_endpoint import QuicEndpoint
from pymesh.net.streams import AnyStream, raw_socket
from pymesh.net.tls import server_ssl_context
from pymesh.net.relay_client import PunchHook, open_circuit
from pymesh.proto import reach as reach_mod
from pymesh.proto.identity import Identity, PeerID
from pymesh.proto.reach import Reach, RelayAddr
from pymesh.proto.vocab import Transport

__all__ = ["RpcNode", "Connection", "CallContext", "RemoteError", "TransportConfig", "Meta", "TensorBlob",
           "Handler", "PushHandler", "TRANSPORTS"]

log = logging.getLogger(__name__)
TRANSPORTS = ("quic", "tcp", "tcp-plain")
#: peers behind NAT whose way in a node remembers
MAX_REACH = 4096
#: seconds before hole punching to a peer is tried again after it failed
PUNCH_RETRY = 300.0
#: seconds a TCP connection may take to send its first bytes where a stream hook listens
HOOK_PEEK_TIMEOUT = 5.0


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


class RpcNode:
    def __init__(self, identity: Identity, *, transport: str = Transport.QUIC, config: TransportConfig | None = None,
                 clock: Clock | None = None) -> None:
        if transport not in TRANSPORTS:
            raise ConfigError(f"unknown transport {transport!r}; use one of {', '.join(TRANSPORTS)}")
        config = dataclasses.replace(config) if config is not None else TransportConfig()
        if transport == "tcp-plain":
            config.tls = False
        self.identity = identity
        #: Keep-alive and frame watchdogs measure time with it (trio's clock by default).
        self.clock: Clock = clock if clock is not None else TrioClock()
        self.peer_id: PeerID = identity.peer_id
        self.transport = Transport.TCP if transport.startswith("tcp") else Transport.QUIC
        self.config = config
        self.protocol_version: int = pymesh.PROTOCOL_VERSION
        #: Where received tensor bytes land: None (buffers that grow as the bytes arrive), or
        #: an allocator such as ``pymesh.model.blobs.pinned_allocator`` on a CUDA host.
        self.allocator: Allocator | None = None
        #: Received payload held by all connections (``config.max_inflight_per_node``).
        self.inflight = ByteBudget(config.max_inflight_per_node, "max_inflight_per_node")
        self._handlers: dict[str, Handler] = {}
        self._push_handlers: dict[str, PushHandler] = {}
        self._conns: dict[PeerID, list[Connection]] = {}
        self._dial_locks: dict[PeerID, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        self._nursery_cm: Any = None
        self._endpoint: QuicEndpoint | None = None
        self._listening_endpoint = False
        self._ssl: ssl.SSLContext | None = None
        self.port: int | None = None
        #: peers whose records say they sit behind NAT: dial them through their relays (and
        #: try hole punching first where ``punch`` is set); see :meth:`learn_reach`
        self.reach: OrderedDict[PeerID, Reach] = OrderedDict()
        #: hole punching for QUIC (``pymesh.net.punch.Puncher``), set by whoever enables it
        self.punch: PunchHook | None = None
        #: TCP connections that start with this magic go to this handler instead of TLS
        #: (a relay's circuits sharing the transport's TCP port)
        self.stream_hook: tuple[bytes, Callable[[trio.SocketStream], Awaitable[None]]] | None = None
        self._punch_failed: dict[PeerID, float] = {}

    # ------------------------------------------------------------------ registry
    def register(self, method: str, handler: Handler) -> None:
        self._handlers[method] = handler

    def on_push(self, topic: str, handler: PushHandler) -> None:
        self._push_handlers[topic] = handler

    def connections(self) -> list[Connection]:
        return [c for conns in self._conns.values() for c in conns if not c.closed]

    # ------------------------------------------------------------------ ConnectionHost
    def handler_for(self, method: str) -> Handler | None:
        return self._handlers.get(method)

    def push_handler_for(self, topic: str) -> PushHandler | None:
        return self._push_handlers.get(topic)

    def adopt(self, conn: Connection) -> None:
        self._conns.setdefault(conn.peer, []).append(conn)

    def forget(self, conn: Connection) -> None:
        conns = self._conns.get(conn.peer)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._conns[conn.peer]

    def server_ssl(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = server_ssl_context(self.identity)
        return self._ssl

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> "RpcNode":
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        assert self._nursery is not None
        for conn in self.connections():
            with trio.CancelScope(shield=True):
                await conn.aclose()
        self._nursery.cancel_scope.cancel()
        try:
            result: bool | None = await self._nursery_cm.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            # Hand the caller the exception its own block raised, not trio's wrapping of it.
            if exc is not None and _leaves(group) == [exc]:
                raise exc from None
            raise
        finally:
            self._nursery = None
        return result

    def _require_started(self) -> trio.Nursery:
        if self._nursery is None:
            raise LocalProtocolError("use RpcNode as an async context manager before listen()/connect()")
        return self._nursery

    async def listen(self, host: str, port: int) -> int:
        """Start serving; returns the bound port (pass 0 for any)."""
        nursery = self._require_started()
        if self.transport == Transport.QUIC:
            endpoint = quic_mod.new_endpoint(self, host, port, server=True)
            if self._endpoint is not None and not self._listening_endpoint:
                log.debug("dialing endpoint stays separate from the listening one")
            await nursery.start(endpoint.run)
            if self._endpoint is None or not self._listening_endpoint:
                self._endpoint = endpoint
                self._listening_endpoint = True
            self.port = endpoint.port
        else:
            listeners = await trio.open_tcp_listeners(port, host=host)
            self.port = int(listeners[0].socket.getsockname()[1])
            nursery.start_soon(self._accept_loop, listeners)
        log.info("listening on %s %s:%d as %s", self.transport, host, self.port, self.peer_id)
        return self.port

    async def _accept_loop(self, listeners: list[trio.SocketListener]) -> None:
        nursery = self._require_started()
        async with trio.open_nursery() as accept_nursery:
            for listener in listeners:
                accept_nursery.start_soon(trio.serve_listeners, self._accept_one, [listener])
        del nursery

    async def _accept_one(self, stream: trio.SocketStream) -> None:
        if self.stream_hook is not None and self.config.tls and await _starts_with(stream, self.stream_hook[0]):
            await self.stream_hook[1](stream)
            return
        conn = await tcp_mod.accept(self, stream)
        if conn is None:
            return
        self.adopt(conn)
        await conn.run()

    async def connect_stream(self, stream: trio.abc.Stream, peer_id: PeerID) -> Connection:
        """An authenticated connection to ``peer_id`` over an already open byte stream (one
        end of ``trio.testing.memory_stream_pair()``, say): the identity handshake and then
        frames exactly as over TCP, without TLS. The other end runs :meth:`serve_stream`."""
        nursery = self._require_started()
        conn = await tcp_mod.dial_stream(self, stream, peer_id)
        await nursery.start(conn.run)
        self.adopt(conn)
        return conn

    async def serve_stream(self, stream: trio.abc.Stream) -> None:
        """Serve the peer at the other end of ``stream`` (the handshake's server side) until
        the connection ends; a failed handshake closes the stream and returns."""
        self._require_started()
        conn = await tcp_mod.accept_raw(self, AnyStream(stream), "a byte stream")
        if conn is None:
            return
        self.adopt(conn)
        await conn.run()

    # ------------------------------------------------------------------ behind NAT
    def _best_open(self, peer: PeerID) -> Connection | None:
        """The open connection ``connect`` reuses for ``peer``: a direct or hole-punched one
        before a relayed one; None without one."""
        live = [c for c in self._conns.get(peer, []) if not c.closed]
        return next((c for c in live if c.path != "relayed"), live[0]) if live else None

    def path_to(self, peer: PeerID) -> str | None:
        """How the connection ``connect`` would use reaches ``peer`` (direct, punched,
        relayed); None without an open one."""
        conn = self._best_open(peer)
        return conn.path if conn is not None else None

    def learn_reach(self, peer: PeerID, reach: Reach | None) -> None:
        """Remember how ``peer``'s verified record says to reach it (None: directly)."""
        if reach is None:
            self.reach.pop(peer, None)
            return
        self.reach[peer] = reach
        self.reach.move_to_end(peer)
        while len(self.reach) > MAX_REACH:
            self.reach.popitem(last=False)

    async def serve_relayed(self, stream: trio.SocketStream, *, remote_host: str | None = None) -> None:
        """Serve a peer that dialed this node through a relay (``stream``: the circuit, past
        the relay's OK): TLS and the identity handshake end to end, then frames.
        ``remote_host``: the dialer's address as the relay reported it (what per-address
        quotas count; the socket's own peer is the relay, shared by all it carries)."""
        self._require_started()
        conn = await tcp_mod.accept(self, stream, relayed=True)
        if conn is None:
            return
        conn.path = "relayed"
        conn.remote_host, conn.remote_port = remote_host, None
        self.adopt(conn)
        await conn.run()

    async def connect_relayed(self, relay: RelayAddr, peer_id: PeerID) -> Connection:
        """A new connection to ``peer_id`` through a circuit at ``relay`` (not cached: see connect)."""
        nursery = self._require_started()
        request = reach_mod.CircuitRequest(reach_mod.OP_CONNECT, target=peer_id.key)
        conn = await tcp_mod.dial(self, relay.host, relay.port, peer_id,
                                  opened=lambda stream: open_circuit(stream, request, relay))
        conn.path = "relayed"
        await nursery.start(conn.run)
        return conn

    @property
    def nursery(self) -> trio.Nursery | None:
        """The node's nursery while it runs (background tasks of its services)."""
        return self._nursery

    def send_datagram(self, addr: tuple[str, int], data: bytes) -> None:
        """One UDP datagram from this node's QUIC socket (hole punching); no-op without one."""
        endpoint = self._endpoint
        if endpoint is None:
            return
        dst: tuple[Any, ...] = addr
        if endpoint.sock.family == socket.AF_INET6 and ":" not in addr[0]:
            dst = ("::ffff:" + addr[0], addr[1], 0, 0)
        endpoint.send_many([(data, dst)])

    async def dial_quic(self, host: str, port: int, peer_id: PeerID) -> Connection:
        """A new QUIC connection from this node's endpoint (not cached; hole punching)."""
        nursery = self._require_started()
        if self.transport != Transport.QUIC or self._endpoint is None:
            raise PeerUnavailable("hole punching needs a QUIC node that has dialed or listened already")
        qconn = await quic_mod.dial(self, self._endpoint, host, port, peer_id)
        nursery.start_soon(qconn.serve)
        return qconn

    async def _connect_behind_nat(self, reach: Reach, peer_id: PeerID) -> Connection:
        errors: list[str] = []
        for relay in reach.relays:
            try:
                conn = await self.connect_relayed(relay, peer_id)
                break
            except PymeshError as exc:
                errors.append(f"relay {relay.host}:{relay.port}: {exc}")
        else:
            raise PeerUnavailable(f"{peer_id.short()} is behind NAT and none of its relays carried a circuit: "
                                  + "; ".join(errors) + " (it may have moved: read its record again)")
        now = trio.current_time()
        if reach.mode == "punch" and self.punch is not None and now >= self._punch_failed.get(peer_id, 0.0):
            direct = await self.punch.punch(conn, relay, peer_id)
            if direct is not None:   # the circuit has done its job: free the relay's quota
                with trio.CancelScope(shield=True):
                    await conn.aclose()
                return direct
            if len(self._punch_failed) >= MAX_REACH:
                self._punch_failed = {p: t for p, t in self._punch_failed.items() if t > now}
            self._punch_failed[peer_id] = now + PUNCH_RETRY
        return conn

    async def connect(self, host: str, port: int, peer_id: PeerID) -> Connection:
        """An authenticated connection to ``peer_id`` (reused if one is open; a direct or
        hole-punched one before a relayed one). A peer whose record said it is behind NAT
        (:meth:`learn_reach`) is dialed through its relays, after a hole-punching attempt
        where both sides can.

        Raises PeerUnavailable (unreachable, timeout), IdentityError (the address holds
        another key) or VersionMismatch."""
        nursery = self._require_started()
        lock = self._dial_locks.setdefault(peer_id, trio.Lock())
        async with lock:
            best = self._best_open(peer_id)
            if best is not None:
                return best
            conn: Connection
            reach = self.reach.get(peer_id)
            if reach is not None:
                conn = await self._connect_behind_nat(reach, peer_id)
            elif self.transport == Transport.QUIC:
                if self._endpoint is None:
                    endpoint = quic_mod.new_endpoint(self, "::" if ":" in host else "0.0.0.0", 0, server=False)
                    await nursery.start(endpoint.run)
                    self._endpoint = endpoint
                qconn = await quic_mod.dial(self, self._endpoint, host, port, peer_id)
                nursery.start_soon(qconn.serve)
                conn = qconn
            else:
                tconn = await tcp_mod.dial(self, host, port, peer_id)
                await nursery.start(tconn.run)
                conn = tconn
            self.adopt(conn)
            log.debug("connected to %s at %s:%d over %s", peer_id.short(), host, port, self.transport)
            return conn


async def _starts_with(stream: trio.SocketStream, magic: bytes) -> bool:
    """Whether the first bytes the peer sent are ``magic`` (peeked: nothing is consumed).
    False when the peer sends something else first, or nothing within HOOK_PEEK_TIMEOUT
    (TLS then times out on its own)."""
    sock = raw_socket(stream)
    with trio.move_on_after(HOOK_PEEK_TIMEOUT):
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                head = sock.recv(len(magic), socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return False
            if len(head) == len(magic) or not head or head != magic[:len(head)]:
                return head == magic
            await trio.sleep(0.01)   # a prefix of the magic so far: wait for the rest
    return False
