"""RPC over QUIC: one bidirectional stream per call, one unidirectional stream per push.

The identity handshake runs on the first server-initiated bidirectional stream right
after the TLS handshake, before either side accepts a call.
"""

from __future__ import annotations

import itertools
import logging
import socket
import ssl

import trio
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from pymesh.errors import IdentityError, PeerUnavailable, RemoteProtocolError
from pymesh.net import congestion as _congestion  # noqa: F401  (registers "pymesh-delay")
from pymesh.net import handshake
from pymesh.net.config import ALPN, TransportConfig
from pymesh.net.conn import (
    ERR_CANCELLED, ERR_CLOSING, ERR_PROTOCOL, Connection, ConnectionHost, host_of, is_loopback, port_of,
)
from pymesh.net.inflight import FrameCharge
from pymesh.proto.frames import HANDSHAKE_LIMITS, Frame, FrameError, FrameType, read_frame_untrusted
from pymesh.net.quic_driver import QStream, QuicDriver, StreamAborted
from pymesh.net.quic_endpoint import QuicEndpoint
from pymesh.net.tls import certificate_for, check_peer_certificate
from pymesh.proto.identity import Identity, PeerID

log = logging.getLogger(__name__)
_ping_ids = itertools.count(1)

#: Unread stream bytes a connection may queue before the peer proved its key (the driver's
#: ``max_unread`` until then): the handshake needs a few hundred; more closes the connection.
PREAUTH_MAX_UNREAD = 64 * 1024


def quic_configuration(config: TransportConfig, *, is_client: bool, identity: Identity | None,
                       loopback: bool = False) -> QuicConfiguration:
    """aioquic's settings from pymesh's; ``loopback``: for a peer on a loopback address
    (``config.loopback_packet_size``)."""
    qc = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[ALPN],
        max_datagram_size=config.packet_size_to(loopback),
        # aioquic restarts its idle timer on the first ack-eliciting packet after a receipt;
        # with pings every 0.2 x idle_timeout a silent peer is declared gone within idle_timeout.
        idle_timeout=config.idle_timeout * 0.7,
        max_stream_data=config.stream_window,
        max_data=config.connection_window,
        congestion_control_algorithm=config.congestion_control,
    )
    if is_client:
        qc.verify_mode = ssl.CERT_NONE  # the certificate key is pinned instead (check_peer_certificate)
    else:
        assert identity is not None
        qc.certificate = certificate_for(identity)
        qc.private_key = identity.private_key
    return qc


class QuicRpcConnection(Connection):
    def __init__(self, node: ConnectionHost, peer: PeerID, config: TransportConfig, driver: QuicDriver) -> None:
        paths = driver.quic._network_paths  # the validated path first (aioquic internal, see quic_driver)
        super().__init__(node, peer, config, remote_host=host_of(paths[0].addr) if paths else None,
                         remote_port=port_of(paths[0].addr) if paths else None)
        self.driver = driver
        driver.on_terminated = self._on_terminated
        # streams whose first frame is being read -> (since, its in-flight account)
        self._reading: dict[QStream, tuple[float, FrameCharge]] = {}

    def _on_terminated(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.close_reason = reason
            self.node.forget(self)

    async def serve(self) -> None:
        """Accept the peer's streams (calls and pushes) until the connection ends."""
        try:
            await self._serve()
        except Exception as exc:  # a bug or an unexpected error ends this connection, not the node
            self._log.exception("connection to %s failed", self.peer.short())
            self.driver.close(ERR_PROTOCOL, f"internal error: {type(exc).__name__}")

    async def _serve(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keepalive)
            # Streams opened before now wait in the channel; later ones are spawned straight
            # from the driver's event processing (one scheduler round trip fewer per call).
            while True:
                try:
                    stream = self.driver.incoming.receive_nowait()
                except trio.WouldBlock:
                    break
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    nursery.cancel_scope.cancel()
                    return
                nursery.start_soon(self._serve_stream, stream)
            self.driver.on_stream = lambda stream: nursery.start_soon(self._serve_stream, stream)
            await self.driver.terminated_event.wait()
            nursery.cancel_scope.cancel()

    async def _keepalive(self) -> None:
        """Pings every idle_timeout / 5 (aioquic's idle timer detects a silent peer) and a
        sweep that resets streams whose frame did not complete within frame_timeout (one
        task instead of a deadline per stream)."""
        cfg = self.config
        tick = min(cfg.idle_timeout / 5, cfg.frame_timeout / 10)
        next_ping = self.clock.monotonic() + cfg.idle_timeout / 5
        while not self.closed:
            await trio.sleep(tick)
            now = self.clock.monotonic()
            for stream, (since, charge) in list(self._reading.items()):
                stalled = charge.stalled_for(now, since)  # None: waiting for memory, not for the peer
                if stalled is not None and stalled >= cfg.frame_timeout - tick:
                    self._log.info("peer %s held stream %d open for over frame_timeout=%ss; reset",
                                   self.peer.short(), stream.sid, cfg.frame_timeout)
                    del self._reading[stream]
                    self.driver.abort(stream, ERR_PROTOCOL)
                    stream.fail("frame_timeout")
            if now >= next_ping:
                next_ping = now + cfg.idle_timeout / 5
                self.driver.ping(next(_ping_ids))

    async def _serve_stream(self, stream: QStream) -> None:
        try:
            self._handler_slots.acquire_nowait()
        except trio.WouldBlock:
            await self._handler_slots.acquire()
        try:
            await self._serve_stream_slot(stream)
        finally:
            self._handler_slots.release()

    async def _serve_stream_slot(self, stream: QStream) -> None:
        driver = self.driver
        charge = self._charge()
        try:
            self._reading[stream] = (self.clock.monotonic(), charge)
            try:
                frame = await read_frame_untrusted(stream, self.config.limits, alloc=self.node.allocator,
                                                   budget=charge)
            finally:
                self._reading.pop(stream, None)
            if frame.type == FrameType.PUSH:
                try:
                    await self._serve_push(frame)
                finally:
                    charge.release()
            elif frame.type == FrameType.CALL and stream.sid & 2 == 0:
                with trio.CancelScope() as call_scope:
                    stream.on_reset = call_scope.cancel
                    try:
                        head, payloads = await self._serve_call(frame)
                    finally:
                        charge.release()
                    await driver.send_frame(stream, head, payloads)
            else:
                raise RemoteProtocolError(f"unexpected {frame.type.name} frame opening stream {stream.sid}")
        except RemoteProtocolError as exc:
            self._log.warning("peer %s sent an invalid frame on stream %d: %s", self.peer.short(), stream.sid, exc)
            driver.abort(stream, ERR_PROTOCOL)
        except PeerUnavailable:
            pass
        finally:
            charge.release()
            driver.forget(stream)

    async def _call(self, head: bytes, payloads: list[memoryview]) -> Frame:
        driver = self.driver
        stream = driver.open_stream()
        charge = self._charge()
        try:
            await driver.send_frame(stream, head, payloads)
            # The reply's bytes are in flight until returned; then they are the caller's.
            return await read_frame_untrusted(stream, self.config.limits, alloc=self.node.allocator, budget=charge)
        except StreamAborted as exc:
            if self.closed_locally:
                raise self._closed_error() from None
            raise PeerUnavailable(f"call to {self.peer.short()} aborted: {exc}") from None
        except BaseException:
            driver.abort(stream, ERR_CANCELLED)
            raise
        finally:
            charge.release()
            driver.forget(stream)

    async def _push(self, head: bytes, payloads: list[memoryview]) -> None:
        driver = self.driver
        stream = driver.open_stream(unidirectional=True)
        try:
            waited = await driver.send_frame(stream, head, payloads)
        except BaseException:
            driver.abort(stream, ERR_CANCELLED)
            raise
        finally:
            driver.forget(stream)
        if not waited:  # a push loop must not starve others
            await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if not self.closed:
            self.closed_locally = True
        self.driver.close(ERR_CLOSING, "closed by the peer")
        self._on_terminated("closed by this node")


def _handshake_io(driver: QuicDriver, stream: QStream, config: TransportConfig
                  ) -> tuple[handshake.ReadFn, handshake.SendFn]:
    """Frame read/write functions over the handshake stream (handshake caps: no tensors)."""
    async def read() -> Frame:
        return await read_frame_untrusted(stream, HANDSHAKE_LIMITS)

    async def send(data: bytes) -> None:
        await driver.send(stream, data, end=False)

    return read, send


def new_endpoint(node: ConnectionHost, host: str, port: int, *, server: bool) -> QuicEndpoint:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PeerUnavailable(f"cannot bind UDP {host}:{port} for QUIC: {exc}") from None
    server_cfg = loopback_cfg = None
    if server:
        server_cfg = quic_configuration(node.config, is_client=False, identity=node.identity)
        if node.config.packet_size_to(loopback=True) != node.config.packet_size:
            loopback_cfg = quic_configuration(node.config, is_client=False, identity=node.identity, loopback=True)

    def on_new(driver: QuicDriver) -> None:
        assert endpoint.nursery is not None
        endpoint.nursery.start_soon(_serve_inbound, node, driver)

    endpoint = QuicEndpoint(sock, server_cfg, on_new if server else None, node.config.send_buffer,
                            connection_send_buffer=node.config.connection_send_buffer,
                            max_unread=2 * node.config.connection_window, loopback_config=loopback_cfg)
    return endpoint


async def _serve_inbound(node: ConnectionHost, driver: QuicDriver) -> None:
    try:
        await _serve_inbound_inner(node, driver)
    except Exception:  # never let one connection take the endpoint (and node) down
        log.exception("inbound QUIC connection failed")
        driver.close(ERR_PROTOCOL, "internal error")


async def _serve_inbound_inner(node: ConnectionHost, driver: QuicDriver) -> None:
    cfg = node.config
    driver.max_unread = PREAUTH_MAX_UNREAD  # until the peer proved its key
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        try:
            with trio.fail_after(cfg.connect_timeout):
                await driver.handshake_done.wait()
                if driver.terminated is not None:
                    return
                stream = driver.open_stream()
                read, send = _handshake_io(driver, stream, cfg)
                peer = await handshake.server_handshake(node.identity, node.protocol_version, read, send, cfg.limits)
                await driver.send(stream, b"", end=True)
                driver.forget(stream)
        except (trio.TooSlowError, PeerUnavailable, RemoteProtocolError, IdentityError) as exc:
            log.info("inbound QUIC connection rejected: %s", str(exc) or "no handshake within connect_timeout")
            driver.close(ERR_PROTOCOL, "handshake failed")
            return
        # Streams the client opened before authenticating would be a protocol violation;
        # the honest client opens none, so the queue is empty here.
        driver.max_unread = 2 * cfg.connection_window
        conn = QuicRpcConnection(node, peer, cfg, driver)
        node.adopt(conn)
        await conn.serve()
        driver.close(ERR_CLOSING, "connection closed")


async def dial(node: ConnectionHost, endpoint: QuicEndpoint, host: str, port: int, peer_id: PeerID) -> QuicRpcConnection:
    cfg = node.config
    family = endpoint.sock.family
    flags = socket.AI_V4MAPPED if family == socket.AF_INET6 else 0
    try:
        infos = await trio.socket.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM, flags=flags)
    except OSError as exc:
        raise PeerUnavailable(f"cannot resolve {host}:{port} for QUIC: {exc}") from None
    addr = infos[0][4]
    qc = quic_configuration(cfg, is_client=True, identity=None, loopback=is_loopback(addr))
    quic = QuicConnection(configuration=qc)
    driver = QuicDriver(endpoint, quic, is_client=True, send_buffer=cfg.send_buffer,
                        connection_send_buffer=cfg.connection_send_buffer, max_unread=PREAUTH_MAX_UNREAD)
    driver.add_cid(quic.host_cid)
    assert endpoint.nursery is not None
    await endpoint.nursery.start(driver.run)
    try:
        with trio.fail_after(cfg.connect_timeout):
            quic.connect(addr, now=trio.current_time())
            driver.after_io()
            await driver.handshake_done.wait()
            if driver.terminated is not None:
                raise PeerUnavailable(f"QUIC connection to {peer_id.short()} at {host}:{port} failed: {driver.terminated}")
            check_peer_certificate(quic.tls._peer_certificate, peer_id)
            stream = await driver.incoming.receive()
            read, send = _handshake_io(driver, stream, cfg)
            await handshake.client_handshake(node.identity, node.protocol_version, peer_id, read, send)
            await driver.send(stream, b"", end=True)
            driver.forget(stream)
            driver.max_unread = 2 * cfg.connection_window
    except trio.TooSlowError:
        driver.close(ERR_CLOSING, "connect timeout")
        raise PeerUnavailable(f"connecting to {peer_id.short()} at {host}:{port} over QUIC timed out after "
                              f"{cfg.connect_timeout}s (is the peer up and UDP reachable?)") from None
    except (trio.EndOfChannel, trio.ClosedResourceError):
        driver.close(ERR_CLOSING, "closed")
        raise PeerUnavailable(f"QUIC connection to {peer_id.short()} closed during the handshake: "
                              f"{driver.terminated}") from None
    except FrameError as exc:
        driver.close(ERR_PROTOCOL, "handshake failed")
        raise PeerUnavailable(f"{peer_id.short()} at {host}:{port} broke the QUIC handshake: {exc}") from None
    except BaseException:
        driver.close(ERR_PROTOCOL, "handshake failed")
        raise
    return QuicRpcConnection(node, peer_id, cfg, driver)
