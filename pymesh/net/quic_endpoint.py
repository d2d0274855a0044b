"""One UDP socket shared by every QUIC connection of a node, inbound and outbound.

A single receive loop drains up to ``RECV_BATCH`` datagrams per wake-up, routes each
by destination connection ID (creating a server connection for a valid Initial), then
lets every touched connection process events and transmit once, so ACKs coalesce.
Sends go straight to the non-blocking socket; runs of equal-size datagrams to one
address leave in one ``sendmsg`` with UDP generic segmentation offload (``UDP_SEGMENT``)
where the kernel supports it. Only when the kernel buffer is full does a sender task
wait for writability.
"""

from __future__ import annotations

import collections
import logging
import socket
import struct
from typing import Any, Callable, Iterable

import trio
from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from pymesh.net.quic_driver import QuicDriver

log = logging.getLogger(__name__)

RECV_BATCH = 512
CID_LENGTH = 8
MAX_PENDING_HANDSHAKES = 256
SOCKET_BUFFER = 8 * 1024 * 1024
UDP_SEGMENT = 103          # linux/udp.h
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000


class QuicEndpoint:
    """One UDP socket shared by every QUIC connection of a node (inbound and outbound)."""

    def __init__(self, sock: socket.socket, server_config: QuicConfiguration | None,
                 on_new_connection: Callable[[QuicDriver], None] | None, send_buffer: int,
                 gso: bool = True, connection_send_buffer: int | None = None,
                 max_unread: int | None = None) -> None:
        self.sock = sock
        sock.setblocking(False)
        for opt, force in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):  # SO_RCVBUFFORCE / SO_SNDBUFFORCE
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
            except OSError:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
                except OSError:
                    pass
        self.server_config = server_config
        self.on_new_connection = on_new_connection
        self.send_buffer = send_buffer
        self.connection_send_buffer = connection_send_buffer
        self.max_unread = max_unread
        self.by_cid: dict[bytes, QuicDriver] = {}
        self.nursery: trio.Nursery | None = None
        self._backlog: collections.deque[tuple[bytes, Any, int]] = collections.deque()
        self.gso = gso and hasattr(socket, "SOL_UDP")
        self._backlog_event = trio.Event()
        self.dropped = 0

    def register_cid(self, cid: bytes, driver: QuicDriver) -> None:
        """Route datagrams addressed to connection ID ``cid`` to ``driver``."""
        self.by_cid[cid] = driver

    def forget_cid(self, cid: bytes, driver: QuicDriver) -> None:
        """Stop routing ``cid`` to ``driver`` (a no-op if another driver took the ID since)."""
        if self.by_cid.get(cid) is driver:
            del self.by_cid[cid]

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._send_loop)
                task_status.started()
                await self._recv_loop()
        finally:
            self.sock.close()

    def send_many(self, datagrams: list[tuple[bytes, Any]]) -> None:
        """Send datagrams in order; equal-size runs to one address go out as one GSO write."""
        i, n = 0, len(datagrams)
        while i < n:
            data, addr = datagrams[i]
            size = len(data)
            j = i + 1
            if self.gso:
                total = size
                while (j < n and j - i < GSO_MAX_SEGMENTS and datagrams[j][1] == addr
                       and len(datagrams[j][0]) <= size and total + len(datagrams[j][0]) <= GSO_MAX_BYTES):
                    total += len(datagrams[j][0])
                    j += 1
                    if len(datagrams[j - 1][0]) < size:
                        break  # only the last segment may be shorter
            if j - i == 1:
                self._send_one(data, addr, 0)
            else:
                self._send_one(b"".join(d for d, _ in datagrams[i:j]), addr, size)
            i = j

    def _send_one(self, data: bytes, addr: Any, segment: int) -> None:
        if self._backlog:
            self._backlog.append((data, addr, segment))
            return
        try:
            self._write(data, addr, segment)
        except BlockingIOError:
            self._backlog.append((data, addr, segment))
            self._backlog_event.set()
        except OSError as exc:
            if segment and self.gso:
                log.info("UDP GSO unavailable (%s); sending datagrams one by one", exc)
                self.gso = False
                for off in range(0, len(data), segment):
                    self._send_one(data[off:off + segment], addr, 0)
                return
            log.debug("UDP send to %s failed: %s", addr, exc)

    def _write(self, data: bytes, addr: Any, segment: int) -> None:
        if segment:
            self.sock.sendmsg([data], [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", segment))], 0, addr)
        else:
            self.sock.sendto(data, addr)

    async def _send_loop(self) -> None:
        while True:
            await self._backlog_event.wait()
            self._backlog_event = trio.Event()
            while self._backlog:
                await trio.lowlevel.wait_writable(self.sock)
                while self._backlog:
                    data, addr, segment = self._backlog[0]
                    try:
                        self._write(data, addr, segment)
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        log.debug("UDP send to %s failed: %s", addr, exc)
                    self._backlog.popleft()

    async def _recv_loop(self) -> None:
        sock = self.sock
        while True:
            await trio.lowlevel.wait_readable(sock)
            touched: dict[int, QuicDriver] = {}
            for _ in range(RECV_BATCH):
                try:
                    data, addr = sock.recvfrom(65536)
                except BlockingIOError:
                    break
                except OSError as exc:  # ICMP errors surface here on Linux
                    log.debug("UDP receive error: %s", exc)
                    continue
                driver = self._route_untrusted(data, addr)
                if driver is None:
                    self.dropped += 1
                    continue
                try:
                    # the clock per datagram: a long batch must not skew RTT samples
                    driver.receive(data, addr, trio.current_time())
                except Exception:  # aioquic should never raise on peer input; never let it kill the loop
                    log.exception("aioquic failed on a datagram from %s; dropped", addr)
                touched[id(driver)] = driver
            _each(touched.values(), QuicDriver.after_receive)
            # Let the tasks just woken answer first: their sends transmit (ACKs included);
            # only connections that stayed silent transmit here.
            await trio.lowlevel.cancel_shielded_checkpoint()
            _each(touched.values(), QuicDriver.flush)

    def _route_untrusted(self, data: bytes, addr: Any) -> QuicDriver | None:
        if data and not data[0] & 0x80:
            # Short header (every packet after the handshake): the destination connection
            # ID is the CID_LENGTH bytes after the first; no need for a full header parse.
            return self.by_cid.get(data[1:1 + CID_LENGTH])
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
        except Exception:  # garbage: aioquic raises ValueError / BufferReadError
            return None
        driver = self.by_cid.get(header.destination_cid)
        if driver is not None:
            return driver
        cfg = self.server_config
        if (cfg is None or header.packet_type != QuicPacketType.INITIAL or len(data) < 1200
                or header.version not in cfg.supported_versions or self.nursery is None):
            return None
        pending = sum(1 for d in set(self.by_cid.values()) if not d.handshake_done.is_set())
        if pending >= MAX_PENDING_HANDSHAKES:
            log.warning("dropping a new QUIC connection from %s: %d handshakes already pending", addr, pending)
            return None
        quic = QuicConnection(configuration=cfg, original_destination_connection_id=header.destination_cid)
        driver = QuicDriver(self, quic, is_client=False, send_buffer=self.send_buffer,
                            connection_send_buffer=self.connection_send_buffer, max_unread=self.max_unread)
        driver.add_cid(header.destination_cid)
        driver.add_cid(quic.host_cid)
        if self.on_new_connection is not None:
            self.on_new_connection(driver)
        return driver


def _each(drivers: Iterable[QuicDriver], step: Callable[[QuicDriver], None]) -> None:
    """Run one processing step on each driver; a failure closes that connection only."""
    for driver in drivers:
        try:
            step(driver)
        except Exception:
            log.exception("QUIC connection failed in %s; closed", step.__name__)
            driver._terminate("internal error")
