"""RPC over one TCP connection (TLS by default): frames multiplexed by request id.

One reader task per connection reads frames (tensor bytes straight into buffers that
grow as they arrive, charged to the connection's and the node's in-flight budgets until
the frame is handed over) and dispatches them; writers take a lock per frame so frames
never interleave.
"""

from __future__ import annotations

import logging
import socket
import struct
from typing import Awaitable, Callable
from dataclasses import dataclass

import trio

from pymesh.errors import IdentityError, PeerUnavailable, RemoteProtocolError
from pymesh.net import handshake
from pymesh.net.config import TransportConfig
from pymesh.net.conn import Connection, ConnectionHost, host_of, port_of
from pymesh.net.inflight import FrameCharge
from pymesh.proto.frames import (
    HANDSHAKE_LIMITS, Frame, FrameError, FrameType, encode_frame_head, read_frame_untrusted,
)
from pymesh.net.streams import AnyStream, BufferedReader, PlainStream, Raw, TlsStream
from pymesh.net.tls import check_peer_certificate_der, client_ssl_context
from pymesh.proto.identity import PeerID

log = logging.getLogger(__name__)
_RID = struct.Struct("<Q")
_COALESCE = 64 * 1024


@dataclass
class _Pending:
    event: trio.Event
    frame: Frame | None = None
    error: BaseException | None = None


class TcpConnection(Connection):
    def __init__(self, node: ConnectionHost, peer: PeerID, config: TransportConfig, raw: Raw,
                 reader: BufferedReader) -> None:
        host, port = _peer_addr(raw)
        super().__init__(node, peer, config, remote_host=host, remote_port=port)
        self._raw = raw
        self._reader = reader
        self._send_lock = trio.Lock()
        self._pending: dict[int, _Pending] = {}
        self._serving: dict[int, trio.CancelScope] = {}
        self._next_id = 1
        self._nursery: trio.Nursery | None = None
        self._rx_at = self.clock.monotonic()           # when the last complete frame arrived
        if isinstance(raw, TlsStream):
            raw.authenticated()
        self._frame_since: float | None = None      # when the frame being read began
        self._reading = self._charge()              # in-flight account of the frame being read

    # ---------------------------------------------------------------- lifecycle
    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._read_loop)
                nursery.start_soon(self._keepalive)
                task_status.started()
        except Exception as exc:  # a bug or an unexpected error ends this connection, not the node
            self._log.exception("connection to %s failed", self.peer.short())
            self._mark_closed(f"internal error: {exc!r}")
        finally:
            self._mark_closed(self.close_reason or "connection closed")
            with trio.CancelScope(shield=True):
                await self._raw.aclose()
            self.node.forget(self)

    def _mark_closed(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.close_reason = reason
            self._log.debug("connection to %s closed: %s", self.peer.short(), reason)
        for slot in self._pending.values():
            if not slot.event.is_set():
                slot.error = (self._closed_error(reason) if self.closed_locally
                              else PeerUnavailable(f"connection to {self.peer.short()} lost: {reason}"))
                slot.event.set()

    def _fail(self, reason: str) -> None:
        self._mark_closed(reason)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def aclose(self) -> None:
        if not self.closed:
            self.closed_locally = True
        self._fail("closed by this node")

    # ---------------------------------------------------------------- sending
    async def _send_frame(self, head: bytes, payloads: list[memoryview]) -> None:
        try:
            self._send_lock.acquire_nowait()  # the common case: no scheduler round trip
        except trio.WouldBlock:
            await self._send_lock.acquire()
        rest: memoryview | None = None
        try:
            self._check_open()
            total = len(head) + sum(len(p) for p in payloads)
            if total <= _COALESCE:
                # Small frame: one non-blocking send, no await at all when the kernel takes it.
                try:
                    rest = self._raw.send_nowait(b"".join([head, *payloads]))
                except PeerUnavailable as exc:
                    self._fail(str(exc))
                    raise
                if not rest:
                    return
            # A frame is never abandoned half-written (that would corrupt the stream); the
            # caller's cancellation waits for this frame, which frame_timeout bounds.
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + self.config.frame_timeout
                try:
                    if rest is not None:
                        await self._raw.send_encoded(rest)
                    else:
                        await self._raw.send_all(head)
                        for p in payloads:
                            await self._raw.send_all(p)
                except PeerUnavailable as exc:
                    self._fail(str(exc))
                    raise
        finally:
            self._send_lock.release()
        if scope.cancelled_caught:
            self._fail(f"sending one frame took longer than frame_timeout={self.config.frame_timeout}s")
            raise PeerUnavailable(f"send to {self.peer.short()} stalled; connection closed")

    async def _call(self, head: bytes, payloads: list[memoryview]) -> Frame:
        rid = self._next_id
        self._next_id += 1
        head = head[:8] + _RID.pack(rid) + head[16:]
        slot = _Pending(trio.Event())
        self._pending[rid] = slot
        try:
            await self._send_frame(head, payloads)
            await slot.event.wait()
        except BaseException:
            if not slot.event.is_set() and not self.closed and self._nursery is not None:
                self._nursery.start_soon(self._send_control, FrameType.CANCEL, rid)
            raise
        finally:
            self._pending.pop(rid, None)
        if slot.error is not None:
            raise slot.error
        assert slot.frame is not None
        return slot.frame

    async def _push(self, head: bytes, payloads: list[memoryview]) -> None:
        if _peer_closed(self._raw):
            # The peer's FIN is queued but this node's reader has not run yet: the kernel
            # would still accept the push and the peer would only answer with a reset.
            # (The reader closes the connection after the frames before the FIN.)
            raise PeerUnavailable(f"connection to {self.peer.short()} is closed (the peer closed it)")
        await self._send_frame(head, payloads)
        await trio.lowlevel.checkpoint()  # the fast path never yields; a push loop must not starve others

    async def _send_control(self, ftype: FrameType, rid: int) -> None:
        head, _ = encode_frame_head(ftype, rid)
        try:
            await self._send_frame(head, [])
        except PeerUnavailable:
            pass

    async def _keepalive(self) -> None:
        """Pings every idle_timeout / 3 and a watchdog for a silent peer and for a frame
        that does not complete (one task instead of two deadlines per frame read)."""
        cfg = self.config
        tick = min(cfg.idle_timeout, cfg.frame_timeout) / 10
        next_ping = self.clock.monotonic() + cfg.idle_timeout / 3
        while True:
            await trio.sleep(tick)
            now = self.clock.monotonic()
            if self._frame_since is not None:
                stalled = self._reading.stalled_for(now, self._frame_since)  # None: waiting for memory
                if stalled is not None and stalled >= cfg.frame_timeout - tick:
                    why = f"a frame from the peer did not complete within frame_timeout={cfg.frame_timeout}s"
                    self._log.info("closing connection to %s: %s", self.peer.short(), why)
                    self._fail(why)
                    return
            elif now - self._rx_at >= cfg.idle_timeout - tick:
                self._fail(f"no data from the peer for idle_timeout={cfg.idle_timeout}s")
                return
            if now >= next_ping:
                next_ping = now + cfg.idle_timeout / 3
                await self._send_control(FrameType.PING, 0)

    # ---------------------------------------------------------------- receiving
    async def _read_loop(self) -> None:
        cfg = self.config
        reader = self._reader
        try:
            while True:
                if await reader.at_eof():  # the watchdog in _keepalive bounds both waits
                    self._fail("the peer closed the connection")
                    return
                self._frame_since = self.clock.monotonic()
                charge = self._reading
                try:
                    frame = await read_frame_untrusted(reader, cfg.limits, alloc=self.node.allocator, budget=charge)
                except BaseException:
                    charge.release()
                    raise
                held: FrameCharge | None = None
                if charge.admitted or charge.grown:  # a frame without payload leaves it unused
                    held, self._reading = charge, self._charge()
                self._frame_since = None
                self._rx_at = self.clock.monotonic()
                try:
                    if frame.type in (FrameType.CALL, FrameType.PUSH):
                        # Backpressure: with every handler slot busy (or, above, no room in
                        # the in-flight budget), stop reading; TCP's window then stalls the
                        # peer. (Replies queued behind wait too, so handlers must not all
                        # wait on calls back over this same connection.)
                        try:
                            self._handler_slots.acquire_nowait()
                        except trio.WouldBlock:
                            await self._handler_slots.acquire()
                    held = self._dispatch(frame, held)
                finally:
                    if held is not None:  # not handed to a handler
                        held.release()
        except RemoteProtocolError as exc:
            self._log.warning("peer %s sent an invalid frame, closing: %s", self.peer.short(), exc)
            self._fail(f"protocol error: {exc}")
        except PeerUnavailable as exc:
            self._fail(str(exc))

    def _dispatch(self, frame: Frame, charge: FrameCharge | None) -> FrameCharge | None:
        """Hand ``frame`` over; returns ``charge`` unless a handler task took it (and
        releases it when done): a reply's bytes belong to its caller from now on."""
        assert self._nursery is not None
        t = frame.type
        if t == FrameType.REPLY or t == FrameType.ERROR:
            slot = self._pending.get(frame.request_id)
            if slot is not None and not slot.event.is_set():
                slot.frame = frame
                slot.event.set()
        elif t == FrameType.CALL:
            if frame.request_id in self._serving:
                raise RemoteProtocolError(f"request id {frame.request_id} reused while still in progress")
            scope = trio.CancelScope()
            self._serving[frame.request_id] = scope
            self._nursery.start_soon(self._handle_call, frame, scope, charge)
            return None
        elif t == FrameType.PUSH:
            self._nursery.start_soon(self._handle_push, frame, charge)
            return None
        elif t == FrameType.CANCEL:
            serving = self._serving.get(frame.request_id)
            if serving is not None:
                serving.cancel()
        elif t == FrameType.PING:
            # Answer, so a peer with a shorter idle_timeout than ours still hears from us in time.
            self._nursery.start_soon(self._send_control, FrameType.PONG, 0)
        elif t == FrameType.PONG:
            pass
        else:
            raise RemoteProtocolError(f"unexpected {t.name} frame after the handshake")
        return charge

    async def _handle_push(self, frame: Frame, charge: FrameCharge | None) -> None:
        try:
            await self._serve_push(frame)
        finally:
            self._handler_slots.release()
            if charge is not None:
                charge.release()

    async def _handle_call(self, frame: Frame, scope: trio.CancelScope, charge: FrameCharge | None) -> None:
        try:
            with scope:
                head, payloads = await self._serve_call(frame)
        finally:
            self._serving.pop(frame.request_id, None)
            self._handler_slots.release()
            if charge is not None:
                charge.release()
        if scope.cancelled_caught:
            return
        try:
            await self._send_frame(head, payloads)
        except PeerUnavailable:
            pass


# -------------------------------------------------------------------- dial / accept


def _wrap(stream: trio.SocketStream, node: ConnectionHost, server_side: bool, tls: bool = False) -> Raw:
    if not (node.config.tls or tls):
        return PlainStream(stream)
    ctx = node.server_ssl() if server_side else client_ssl_context()
    return TlsStream(stream, ctx, server_side)


async def dial(node: ConnectionHost, host: str, port: int, peer_id: PeerID,
               opened: Callable[[trio.SocketStream], Awaitable[None]] | None = None) -> TcpConnection:
    """TLS and the identity handshake to ``peer_id`` over a new TCP connection to
    ``host:port``; ``opened`` runs on the connection first (a relay's circuit request: the
    relay then joins it to the peer, and TLS is always on, end to end)."""
    cfg = node.config
    try:
        with trio.fail_after(cfg.connect_timeout):
            stream = await trio.open_tcp_stream(host, port)
            if opened is not None:
                try:
                    await opened(stream)
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await stream.aclose()
                    raise
            raw = _wrap(stream, node, server_side=False, tls=opened is not None)
            try:
                if isinstance(raw, TlsStream):
                    await raw.handshake()
                    check_peer_certificate_der(raw.peer_certificate(), peer_id)
                reader = await _client_handshake(node, raw, peer_id)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await raw.aclose()
                raise
    except trio.TooSlowError:
        raise PeerUnavailable(f"connecting to {peer_id.short()} at {host}:{port} over TCP timed out "
                              f"after {cfg.connect_timeout}s") from None
    except FrameError as exc:
        raise PeerUnavailable(f"{peer_id.short()} at {host}:{port} broke the TCP handshake: {exc}") from None
    except OSError as exc:
        raise PeerUnavailable(f"cannot connect to {peer_id.short()} at {host}:{port} over TCP: {exc}") from None
    return TcpConnection(node, peer_id, cfg, raw, reader)


async def _client_handshake(node: ConnectionHost, raw: Raw, peer_id: PeerID) -> BufferedReader:
    reader = BufferedReader(raw)
    await handshake.client_handshake(
        node.identity, node.protocol_version, peer_id,
        read=lambda: read_frame_untrusted(reader, HANDSHAKE_LIMITS), send=raw.send_all)
    return reader


async def dial_stream(node: ConnectionHost, stream: trio.abc.Stream, peer_id: PeerID) -> TcpConnection:
    """The client side of a connection over an open byte stream (see ``RpcNode.connect_stream``)."""
    raw = AnyStream(stream)
    try:
        with trio.fail_after(node.config.connect_timeout):
            reader = await _client_handshake(node, raw, peer_id)
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            await raw.aclose()
        if isinstance(exc, trio.TooSlowError):
            raise PeerUnavailable(f"handshake with {peer_id.short()} timed out after "
                                  f"{node.config.connect_timeout}s") from None
        if isinstance(exc, FrameError):
            raise PeerUnavailable(f"{peer_id.short()} broke the handshake: {exc}") from None
        raise
    return TcpConnection(node, peer_id, node.config, raw, reader)


async def accept(node: ConnectionHost, stream: trio.SocketStream, *, relayed: bool = False) -> TcpConnection | None:
    """Run TLS and the identity handshake on an inbound stream; None if it failed.
    ``relayed``: a circuit through a relay (TLS whatever the node's setting)."""
    where = f"a relay circuit via {_addr(stream)}" if relayed else _addr(stream)
    return await accept_raw(node, _wrap(stream, node, server_side=True, tls=relayed), where)


async def accept_raw(node: ConnectionHost, raw: Raw, where: str) -> TcpConnection | None:
    """The server side of TLS (if ``raw`` has it) and the identity handshake; None if it failed."""
    cfg = node.config
    try:
        with trio.fail_after(cfg.connect_timeout):
            if isinstance(raw, TlsStream):
                await raw.handshake()
            reader = BufferedReader(raw)
            peer = await handshake.server_handshake(
                node.identity, node.protocol_version,
                read=lambda: read_frame_untrusted(reader, HANDSHAKE_LIMITS), send=raw.send_all, limits=cfg.limits)
    except (trio.TooSlowError, PeerUnavailable, RemoteProtocolError, IdentityError) as exc:
        log.info("inbound connection from %s rejected: %s", where,
                 str(exc) or "handshake did not finish within connect_timeout")
        with trio.CancelScope(shield=True):
            await raw.aclose()
        return None
    return TcpConnection(node, peer, cfg, raw, reader)


def _peer_addr(raw: Raw) -> tuple[str | None, int | None]:
    """The peer's IP address and port on a socket stream; (None, None) on any other byte
    stream or once disconnected."""
    if isinstance(raw, AnyStream):
        return None, None
    try:
        addr = raw.sock.getpeername()
    except OSError:  # already disconnected
        return None, None
    return host_of(addr), port_of(addr)


def _peer_closed(raw: Raw) -> bool:
    """Whether the peer's FIN (or a reset) is waiting on the socket with no data before it:
    one non-blocking MSG_PEEK, no scheduler round trip. A FIN that arrives just after this
    still loses the push; the peer then answers with a reset, which the reader sees (and a
    worker reports pushes made shortly before a link ended)."""
    if isinstance(raw, AnyStream):
        return False
    try:
        return raw.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:            # reset, or the socket is gone
        return True


def _addr(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"TCP {host}:{port}"
    except OSError:
        return "?"
