"""One UDP socket shared by every QUIC connection of a node, inbound and outbound.

A single receive loop drains up to ``RECV_BATCH`` datagrams per wake-up, routes each
by destination connection ID (creating a server connection for a valid Initial), then
lets every touched connection process events and transmit once, so ACKs coalesce.
Sends go straight to the non-blocking socket; runs of equal-size datagrams to one
address leave in one ``sendmsg`` with UDP generic segmentation offload (``UDP_SEGMENT``)
where the kernel supports it. Only when the kernel buffer is full does a sender task
wait for writability.

Hostile input: a new Initial passes :class:`~pymesh.net.quic_admission.InitialGate`
(per-source budget, decrypt check, per-source and total pending caps, Retry under load)
before any connection exists. A short-header packet for no known connection is either a
peer's Stateless Reset for one of ours (that connection ends at once) or one for a
connection this node no longer has, answered with a Stateless Reset whose token derives
from the node's identity (:mod:`pymesh.proto.reset_tokens`), so a restarted node ends its
predecessor's connections at their first packet.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import socket
import struct
from typing import Any, Callable, Iterable

import trio
from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicPacketType, pull_quic_header
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pymesh.net.conn import is_loopback
from pymesh.net.dht_ratelimit import RateLimiter
from pymesh.net.quic_admission import InitialGate, Verdict
from pymesh.net.quic_driver import QuicDriver
from pymesh.proto.reset_tokens import ResetTokens, build_reset, reset_secret, reset_token_untrusted

log = logging.getLogger(__name__)

RECV_BATCH = 512
CID_LENGTH = 8
#: Stateless Resets sent per second at most (burst as many): a spoofed flood of short
#: packets cannot turn the endpoint into a reflector, and each reset is smaller than
#: the packet that triggered it
RESETS_PER_SECOND = 100
TOKEN_TABLE_AGE = 0.05
SOCKET_BUFFER = 8 * 1024 * 1024
UDP_SEGMENT = 103          # linux/udp.h
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000


class QuicEndpoint:
    """One UDP socket shared by every QUIC connection of a node (inbound and outbound)."""

    def __init__(self, sock: socket.socket, server_config: QuicConfiguration | None,
                 on_new_connection: Callable[[QuicDriver], None] | None, send_buffer: int,
                 gso: bool = True, connection_send_buffer: int | None = None,
                 max_unread: int | None = None, gate: InitialGate | None = None,
                 loopback_config: QuicConfiguration | None = None) -> None:
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
        #: the server settings for a client on a loopback address (larger datagrams), if they differ
        self.loopback_config = loopback_config
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
        self.gate = gate or InitialGate()
        #: Reset tokens of this node's connection IDs: from its identity key when it serves
        #: (a restart with the same key resets its predecessor's connections), else random.
        key = getattr(server_config, "private_key", None)
        secret = reset_secret(_raw_private(key)) if isinstance(key, Ed25519PrivateKey) else os.urandom(32)
        self.reset_tokens = ResetTokens(secret)
        self._reset_limit = RateLimiter(RESETS_PER_SECOND, RESETS_PER_SECOND, max_ips=1)
        self._peer_tokens: dict[bytes, QuicDriver] = {}
        self._peer_tokens_stale = True
        self._peer_tokens_at = -math.inf
        #: resets_sent, resets_limited, resets_received
        self.counters = self.gate.counters

    def register_cid(self, cid: bytes, driver: QuicDriver) -> None:
        """Route datagrams addressed to connection ID ``cid`` to ``driver``."""
        self.by_cid[cid] = driver

    def forget_cid(self, cid: bytes, driver: QuicDriver) -> None:
        """Stop routing ``cid`` to ``driver`` (a no-op if another driver took the ID since)."""
        if self.by_cid.get(cid) is driver:
            del self.by_cid[cid]
            self._peer_tokens_stale = True

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
        if n == 1:  # the common case (an ACK, a small message)
            self._send_one(datagrams[0][0], datagrams[0][1], 0)
            return
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
                if driver.fed_first:  # a new connection: its first datagram went in already
                    driver.fed_first = False
                else:
                    try:
                        # the clock per datagram: a long batch must not skew RTT samples
                        driver.receive(data, addr, trio.current_time())
                    except Exception:  # aioquic should never raise on peer input; never let it kill the loop
                        log.exception("aioquic failed on a datagram from %s; dropped", addr)
                touched[id(driver)] = driver
            _each(touched.values(), QuicDriver.after_receive)
            # Let the tasks just woken answer first: their sends transmit (ACKs included);
            # only connections that stayed silent transmit here. trio runs a batch of ready
            # tasks in either order, so this loop may come back before them: a second pass
            # then, where a call or reply came in (half of all round trips paid a transmit
            # that found nothing due, ~30 us of aioquic's datagrams_to_send, before the
            # answer's own). ACKs and pushes expect no answer: no second pass.
            await trio.lowlevel.cancel_shielded_checkpoint()
            if any(d.dirty and d.answer_expected for d in touched.values()):
                await trio.lowlevel.cancel_shielded_checkpoint()
            _each(touched.values(), QuicDriver.flush)

    def _route_untrusted(self, data: bytes, addr: Any) -> QuicDriver | None:
        if data and not data[0] & 0x80:
            # Short header (every packet after the handshake): the destination connection
            # ID is the CID_LENGTH bytes after the first; no need for a full header parse.
            driver = self.by_cid.get(data[1:1 + CID_LENGTH])
            if driver is None:
                self._unknown_short_untrusted(data, addr)
            else:
                self._peer_tokens_stale = True  # it may carry new connection IDs and tokens
            return driver
        # Long header: version (4 bytes) after the first byte, then the destination CID's
        # length and bytes (RFC 9000 section 17.2); routed before any full parse.
        driver = self.by_cid.get(data[6:6 + data[5]]) if len(data) > 6 else None
        if driver is not None:
            self._peer_tokens_stale = True
            return driver
        cfg = self.server_config
        if cfg is None or len(data) < 1200 or self.nursery is None:
            return None
        now = trio.current_time()
        if not self.gate.within_budget(addr, now):
            return None
        buf = Buffer(data=data)
        try:
            header = pull_quic_header(buf, host_cid_length=CID_LENGTH)
        except Exception:  # garbage: aioquic raises ValueError / BufferReadError
            return None
        if header.packet_type != QuicPacketType.INITIAL or header.version not in cfg.supported_versions:
            return None
        decision = self.gate.decide_untrusted(data, header, buf.tell(), addr, now)
        if decision.verdict == Verdict.RETRY:
            self._send_one(decision.reply, addr, 0)
            return None
        if decision.verdict == Verdict.DROP:
            if self.gate.counters["full"] % 1000 == 1 and self.gate.pending >= self.gate.max_pending:
                log.warning("dropping new QUIC connections: %d handshakes already pending", self.gate.pending)
            return None
        if self.loopback_config is not None and is_loopback(addr):
            cfg = self.loopback_config
        quic = QuicConnection(configuration=cfg, original_destination_connection_id=decision.original_dcid,
                              retry_source_connection_id=decision.retry_scid)
        driver = QuicDriver(self, quic, is_client=False, send_buffer=self.send_buffer,
                            connection_send_buffer=self.connection_send_buffer, max_unread=self.max_unread)
        try:
            driver.receive(data, addr, now)
        except Exception:
            log.exception("aioquic failed on an Initial from %s; dropped", addr)
            return None
        if not driver.started_handshake():  # belt and braces: the gate saw it decrypt
            self.gate.counters["undecryptable"] += 1
            return None
        driver.fed_first = True
        self.gate.add(driver, addr)
        driver.add_cid(header.destination_cid)
        driver.add_cid(quic.host_cid)
        if self.on_new_connection is not None:
            self.on_new_connection(driver)
        return driver

    def handshake_ended(self, driver: QuicDriver) -> None:
        """``driver``'s handshake completed or failed: it no longer holds a pending slot."""
        self.gate.done(driver)

    # ---------------------------------------------------------------- stateless reset
    def _unknown_short_untrusted(self, data: bytes, addr: Any) -> None:
        """A short-header packet for no connection here: a peer's Stateless Reset for one of
        ours (tear that connection down), or a packet for a connection this node no longer
        has, say from before a restart (answer with a Stateless Reset, rate-limited)."""
        token = reset_token_untrusted(data)
        if token is None:
            return
        driver = self._driver_for_reset(token)
        if driver is not None:
            self.counters["resets_received"] += 1
            driver.peer_reset()
            return  # never answer a reset
        reply = build_reset(self.reset_tokens.token(data[1:1 + CID_LENGTH]), len(data))
        if reply is None:
            return
        if not self._reset_limit.allow("", trio.current_time()):
            self.counters["resets_limited"] += 1
            return
        self.counters["resets_sent"] += 1
        self._send_one(reply, addr, 0)

    def _driver_for_reset(self, token: bytes) -> QuicDriver | None:
        # Peers announce tokens during the handshake and in NEW_CONNECTION_ID frames (no
        # aioquic event for those), so the table is rebuilt after traffic, but at most every
        # TOKEN_TABLE_AGE seconds: a flood of unroutable packets costs a lookup each, not a
        # walk over every connection.
        now = trio.current_time()
        if self._peer_tokens_stale and now - self._peer_tokens_at >= TOKEN_TABLE_AGE:
            self._peer_tokens = {t: d for d in set(self.by_cid.values()) for t in d.peer_reset_tokens()}
            self._peer_tokens_stale = False
            self._peer_tokens_at = now
        return self._peer_tokens.get(token)


def _raw_private(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def _each(drivers: Iterable[QuicDriver], step: Callable[[QuicDriver], None]) -> None:
    """Run one processing step on each driver; a failure closes that connection only."""
    for driver in drivers:
        try:
            step(driver)
        except Exception:
            log.exception("QUIC connection failed in %s; closed", step.__name__)
            driver._terminate("internal error")
