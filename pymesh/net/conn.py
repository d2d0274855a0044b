"""What TCP and QUIC connections share: the public ``Connection`` surface, typed remote
errors, and how an incoming call or push is dispatched to the registered handler."""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
import ssl
from typing import Awaitable, Callable, Protocol, Sequence

import trio

from pymesh.errors import ConnectionClosed, PeerUnavailable, PymeshError
from pymesh.net.clock import Clock
from pymesh.net.config import TransportConfig
from pymesh.net.inflight import ByteBudget, FrameCharge
from pymesh.proto.frames import Allocator, Frame, FrameType, Meta, TensorBlob, encode_frame_head
from pymesh.proto.identity import Identity, PeerID
from pymesh.proto.vocab import RpcErrorCode

log = logging.getLogger(__name__)


class RemoteError(PymeshError):
    """Raised by a handler to answer a call with an error; re-raised at the caller with
    the same ``code`` and ``message``. The RPC layer's own codes are :class:`RpcErrorCode`
    (no such method, handler crashed); handlers use their protocol's (str-enum) codes.
    ``code`` is a ``str``: a str-enum member or, at the caller, the wire string, which
    compares equal to the member."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code: str = code
        self.message = message


@dataclass
class CallContext:
    peer: PeerID                 # the authenticated caller
    connection: "Connection"     # the connection the call came on (push back to the caller)
    method: str = ""


Handler = Callable[[CallContext, Meta, list[TensorBlob]], Awaitable[tuple[Meta, list[TensorBlob]]]]
PushHandler = Callable[["Connection", Meta, list[TensorBlob]], Awaitable[None]]

#: QUIC application error codes used when resetting streams and closing connections.
ERR_CANCELLED = 0x10
ERR_PROTOCOL = 0x11
ERR_CLOSING = 0x0


class ConnectionHost(Protocol):
    """What a connection needs from the node that owns it (``RpcNode`` is one): its
    identity and settings for handshakes, the handlers to dispatch to, where received
    tensor bytes go and the node's in-flight budget, and to be told when the connection
    opens and ends."""

    @property
    def identity(self) -> Identity: ...

    @property
    def config(self) -> TransportConfig: ...

    @property
    def protocol_version(self) -> int: ...

    @property
    def allocator(self) -> Allocator | None: ...

    @property
    def inflight(self) -> ByteBudget: ...

    @property
    def clock(self) -> Clock: ...

    def handler_for(self, method: str) -> Handler | None: ...

    def push_handler_for(self, topic: str) -> PushHandler | None: ...

    def server_ssl(self) -> ssl.SSLContext: ...

    def adopt(self, conn: "Connection") -> None: ...

    def forget(self, conn: "Connection") -> None: ...


def host_of(addr: object) -> str | None:
    """The IP address in a socket address tuple (``(host, port, ...)``) as text, an
    IPv4-mapped IPv6 address as plain IPv4; None if ``addr`` holds none."""
    if not isinstance(addr, tuple) or not addr or not isinstance(addr[0], str):
        return None
    try:
        ip = ipaddress.ip_address(addr[0].split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def port_of(addr: object) -> int | None:
    """The port in a socket address tuple; None if it holds none."""
    if not isinstance(addr, tuple) or len(addr) < 2 or not isinstance(addr[1], int):
        return None
    return addr[1]


def is_loopback(addr: object) -> bool:
    """Whether a socket address tuple names a loopback address (127.0.0.0/8, ::1, or
    127.x mapped into IPv6)."""
    host = host_of(addr)
    return host is not None and ipaddress.ip_address(host).is_loopback


class Connection:
    """An authenticated connection to one peer; calls and pushes go both ways.

    ``remote_host`` is the peer's IP address as this side sees it (the TCP socket's peer
    address; on QUIC the source address of the peer's datagrams), None over a byte stream
    without one (``RpcNode.connect_stream``/``serve_stream``). It is not authenticated in
    any way beyond what the network gives: use it for per-address quotas, not identity."""

    peer: PeerID

    def __init__(self, node: ConnectionHost, peer: PeerID, config: TransportConfig, *,
                 remote_host: str | None = None, remote_port: int | None = None) -> None:
        self.node = node
        self.peer = peer
        self.remote_host = remote_host
        #: the peer's port as this side sees it (with ``remote_host``: a relay tells a peer
        #: behind NAT its mapping this way); None where ``remote_host`` is None
        self.remote_port = remote_port if remote_host is not None else None
        #: how the connection reaches the peer: "direct", "relayed" (a circuit through a
        #: relay) or "punched" (a QUIC path opened by hole punching)
        self.path = "direct"
        self.config = config
        self.closed = False
        self.close_reason = ""
        self.closed_locally = False      # aclose() on this side ended it (not the peer or the network)
        self.clock = node.clock          # keep-alive and frame watchdogs read it
        self._handler_slots = trio.Semaphore(config.max_concurrent_handlers)
        #: Received payload held on this connection (pymesh.net.inflight).
        self.inflight = ByteBudget(config.max_inflight_per_connection, "max_inflight_per_connection")
        self._log = logging.LoggerAdapter(log, {"peer": peer.short()})

    def __repr__(self) -> str:
        return f"<{type(self).__name__} peer={self.peer.short()} closed={self.closed}>"

    async def call(self, method: str, meta: Meta | None = None, tensors: Sequence[TensorBlob] = (), *,
                   timeout: float | None = None) -> tuple[Meta, list[TensorBlob]]:
        """Call ``method`` on the peer. Raises RemoteError (the handler's), PeerUnavailable
        (lost connection or ``timeout`` seconds elapsed)."""
        self._check_open()
        head, payloads = encode_frame_head(FrameType.CALL, 0, name=method, meta=meta or {}, tensors=tensors,
                                           limits=self.config.limits)
        if timeout is None:
            frame = await self._call(head, payloads)
        else:
            with trio.move_on_after(timeout) as scope:
                frame = await self._call(head, payloads)
            if scope.cancelled_caught:
                raise PeerUnavailable(f"call {method!r} to {self.peer.short()} timed out after {timeout:.3g} s")
        if frame.type == FrameType.ERROR:
            raise RemoteError(frame.envelope.code or RpcErrorCode.INTERNAL.value, frame.envelope.message)
        return frame.envelope.meta, frame.tensors

    async def push(self, topic: str, meta: Meta | None = None, tensors: Sequence[TensorBlob] = ()) -> None:
        """Send a one-way message; the peer's ``on_push(topic)`` handler receives it.

        Returns once the message is delivered as far as the transport can tell, not when it
        is handled: on QUIC once the peer has acknowledged the whole stream (one round trip),
        on TCP once the kernel took the bytes. Raises PeerUnavailable (or ConnectionClosed,
        if this node closed the connection) when the connection is or becomes closed before
        that: on QUIC also when the peer resets it (a stateless reset from a restarted node)
        or stops the push's stream. On TCP a push whose bytes the kernel took can still be
        lost if the peer closes at that instant (its FIN already queued here is noticed
        before sending; one arriving later is not): the peer's reset then ends the
        connection, and callers that must know watch for that (the worker's link watch)."""
        self._check_open()
        head, payloads = encode_frame_head(FrameType.PUSH, 0, name=topic, meta=meta or {}, tensors=tensors,
                                           limits=self.config.limits)
        await self._push(head, payloads)

    async def aclose(self) -> None:
        raise NotImplementedError

    # ---- implemented by the transports
    async def _call(self, head: bytes, payloads: list[memoryview]) -> Frame:
        raise NotImplementedError

    async def _push(self, head: bytes, payloads: list[memoryview]) -> None:
        raise NotImplementedError

    def _charge(self) -> FrameCharge:
        """The in-flight account of the next frame read on this connection."""
        return FrameCharge(self.inflight, self.node.inflight, self.clock)

    def _check_open(self) -> None:
        if self.closed:
            raise self._closed_error()

    def _closed_error(self, reason: str = "") -> PymeshError:
        """The error for using this connection, or waiting on it, once it has ended:
        ConnectionClosed when this node closed it, PeerUnavailable otherwise."""
        reason = reason or self.close_reason or "closed"
        if self.closed_locally:
            return ConnectionClosed(f"connection to {self.peer.short()} was closed by this node ({reason})")
        return PeerUnavailable(f"connection to {self.peer.short()} is closed ({reason})")

    # ---- shared server-side dispatch (callers hold one of ``_handler_slots``: at most
    # max_concurrent_handlers calls and pushes are in progress per connection)
    async def _serve_call(self, frame: Frame) -> tuple[bytes, list[memoryview]]:
        """Run the handler for a CALL frame; returns the encoded REPLY or ERROR frame."""
        method = frame.envelope.name
        rid = frame.request_id
        handler = self.node.handler_for(method)
        if handler is None:
            return encode_frame_head(FrameType.ERROR, rid, code=RpcErrorCode.NOT_FOUND.value,
                                     message=f"no method {method!r} on this node")
        ctx = CallContext(self.peer, self, method)
        try:
            meta, tensors = await handler(ctx, frame.envelope.meta, frame.tensors)
            return encode_frame_head(FrameType.REPLY, rid, meta=meta, tensors=tensors, limits=self.config.limits)
        except RemoteError as exc:
            return encode_frame_head(FrameType.ERROR, rid, code=exc.code, message=exc.message)
        except Exception as exc:
            self._log.exception("handler for %r from %s failed", method, self.peer.short())
            return encode_frame_head(FrameType.ERROR, rid, code=RpcErrorCode.INTERNAL.value,
                                     message=f"{type(exc).__name__} in handler {method!r}: {exc}")

    async def _serve_push(self, frame: Frame) -> None:
        topic = frame.envelope.name
        handler = self.node.push_handler_for(topic)
        if handler is None:
            self._log.warning("push on topic %r from %s has no handler; dropped", topic, self.peer.short())
            return
        try:
            await handler(self, frame.envelope.meta, frame.tensors)
        except Exception:
            self._log.exception("push handler for %r from %s failed", topic, self.peer.short())
