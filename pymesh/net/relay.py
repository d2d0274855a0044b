"""A relay: carries byte circuits to peers that cannot be dialed (behind NAT), within quotas.

A peer behind NAT keeps an authenticated RPC connection to the relay and calls
``relay.reserve`` on it (:mod:`pymesh.net.relay_client`). A dialer then opens a plain TCP
connection to the relay's port and names the reserved peer (:mod:`pymesh.proto.reach`
header); the relay pushes ``relay.incoming`` with a fresh random circuit id over the
reservation's connection, the reserved peer opens its own TCP connection to the relay with
that id, and the relay copies bytes between the two. Both ends then run TLS 1.3 and the
identity handshake through the circuit, end to end, exactly as over a direct TCP
connection: the relay sees ciphertext only, and cannot pose as either side (the dialer pins
the reserved peer's key in its certificate; the reserved peer checks the dialer's
signature over its nonce).

Limits (:class:`RelayLimits`): reservations held (in all and per address), circuits in all, circuits per reserved
peer and per dialing IP address, header reads in progress, bytes and seconds per circuit,
and bandwidth (a token bucket for all circuits and one per reserved peer). Whatever is over
a limit is refused with a status that says which limit, and counted in ``counters``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable, Iterable

import trio

from pymesh.errors import PymeshError
from pymesh.net.conn import CallContext, Connection, RemoteError, host_of
from pymesh.net.relay_client import INCOMING, RESERVE, read_exact
from pymesh.net.streams import raw_socket
from pymesh.proto import reach as rp
from pymesh.proto.frames import Meta, TensorBlob
from pymesh.proto.identity import PeerID
from pymesh.proto.vocab import Transport

if TYPE_CHECKING:
    from pymesh.net.rpc import RpcNode

log = logging.getLogger(__name__)

OBSERVE = "relay.observe"
CHUNK = 64 * 1024


@dataclass
class RelayLimits:
    max_reservations: int = 128
    max_reservations_per_ip: int = 8         # peers behind one address (one NAT) reserving here
    max_circuits: int = 256
    max_circuits_per_peer: int = 16          # circuits to one reserved peer
    max_circuits_per_ip: int = 16            # circuits opened from one dialing address
    max_pending_headers: int = 256           # TCP connections whose header is being read
    bandwidth: float = 256e6                 # bytes/s, all circuits together
    peer_bandwidth: float = 64e6             # bytes/s, the circuits of one reserved peer
    circuit_bytes: int = 4 << 30             # bytes per circuit (both directions)
    circuit_seconds: float = 6 * 3600.0
    reservation_ttl: float = 120.0
    header_timeout: float = 5.0
    accept_timeout: float = 5.0


class TokenBucket:
    """``rate`` bytes per second with a burst of a quarter second (at least one chunk)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(rate * 0.25, 4 * CHUNK)
        self.level = self.burst
        self.at = trio.current_time()

    async def take(self, n: int) -> None:
        now = trio.current_time()
        self.level = min(self.burst, self.level + (now - self.at) * self.rate)
        self.at = now
        self.level -= n
        if self.level < 0:
            await trio.sleep(-self.level / self.rate)


@dataclass
class _Reservation:
    peer: PeerID
    conn: Connection
    expires: float
    bucket: TokenBucket
    circuits: int = 0


@dataclass
class _Pending:
    arrived: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)
    stream: trio.SocketStream | None = None


class RelayService:
    """The relay's side: ``register`` it on the node's RPC nodes, and hand it every TCP
    connection that starts with the circuit magic (``handle_stream``)."""

    def __init__(self, limits: RelayLimits | None = None) -> None:
        self.limits = limits or RelayLimits()
        self.reservations: dict[PeerID, _Reservation] = {}
        self.pending: dict[bytes, _Pending] = {}
        self.circuits = 0
        self.by_ip: Counter[str] = Counter()
        self.headers = 0
        self.counters: Counter[str] = Counter()
        self._bucket: TokenBucket | None = None
        #: the TCP port circuits are opened on (told to reserving peers)
        self.tcp_port = 0

    @property
    def bucket(self) -> TokenBucket:
        if self._bucket is None:
            self._bucket = TokenBucket(self.limits.bandwidth)
        return self._bucket

    def register(self, node: "RpcNode") -> None:
        node.register(RESERVE, self._reserve)
        node.register(OBSERVE, self._observe)

    # -- reservations (RPC) ------------------------------------------------------------------
    def _live(self, peer: PeerID) -> _Reservation | None:
        res = self.reservations.get(peer)
        if res is None:
            return None
        if res.conn.closed or trio.current_time() > res.expires:
            if res.circuits == 0:
                del self.reservations[peer]
            return None
        return res

    async def _observe(self, ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> tuple[Meta, list[TensorBlob]]:
        """Where this relay sees the caller (its NAT's mapping, for hole punching)."""
        return _seen_as(ctx.connection), []

    async def _reserve(self, ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> tuple[Meta, list[TensorBlob]]:
        lim = self.limits
        if ctx.peer not in self.reservations:
            for peer in list(self.reservations):
                self._live(peer)
            if len(self.reservations) >= lim.max_reservations:
                self.counters["reserve_full"] += 1
                raise RemoteError("relay_full", f"this relay holds {lim.max_reservations} reservations already; "
                                                "reserve at another relay")
            ip = ctx.connection.remote_host
            if ip is not None and sum(r.conn.remote_host == ip for r in self.reservations.values()) \
                    >= lim.max_reservations_per_ip:
                self.counters["reserve_ip_full"] += 1
                raise RemoteError("relay_full", f"{lim.max_reservations_per_ip} peers at your address hold "
                                                "reservations here already; reserve at another relay")
        old = self.reservations.get(ctx.peer)
        self.reservations[ctx.peer] = _Reservation(
            ctx.peer, ctx.connection, trio.current_time() + lim.reservation_ttl,
            old.bucket if old is not None else TokenBucket(lim.peer_bandwidth), old.circuits if old else 0)
        self.counters["reservations"] += 1
        return {"ttl": int(lim.reservation_ttl), **_seen_as(ctx.connection), "tcp": self.tcp_port}, []

    # -- circuits (TCP) ---------------------------------------------------------------------
    async def attach(self, nodes: "Iterable[RpcNode]", nursery: trio.Nursery, host: str, port: int) -> None:
        """Serve reservations on ``nodes`` and circuits on TCP ``port``: through the listener of
        the TCP node among them (it hands over connections that start with the magic), else
        on a listener of this service's own."""
        tcp = None
        for node in nodes:
            self.register(node)
            if node.transport == Transport.TCP and node.config.tls:
                tcp = node
        if tcp is not None:
            tcp.stream_hook = (rp.MAGIC, self.handle_stream)
            self.tcp_port = port
        else:
            await nursery.start(self.serve_tcp, host, port)

    async def serve_tcp(self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen for circuit connections on TCP ``host:port`` (when no TCP RPC listener shares it)."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.tcp_port = int(listeners[0].socket.getsockname()[1])
        task_status.started(self.tcp_port)
        await trio.serve_listeners(self.handle_stream, listeners)

    async def handle_stream(self, stream: trio.SocketStream) -> None:
        """One inbound TCP connection: read its circuit header, then connect or accept."""
        ip = _peer_ip(stream)
        try:
            if self.headers >= self.limits.max_pending_headers:
                self.counters["headers_full"] += 1
                return
            self.headers += 1
            try:
                with trio.fail_after(self.limits.header_timeout):
                    n = rp.parse_request_length_untrusted(await read_exact(stream, 6))
                    req = rp.parse_request_untrusted(await read_exact(stream, n))
            finally:
                self.headers -= 1
            if req.op == rp.OP_CONNECT:
                await self._connect(stream, PeerID(req.target), ip)
            else:
                await self._accept(stream, req.circuit)
        except (rp.ReachError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError,
                PymeshError, OSError) as exc:
            self.counters["bad_headers" if isinstance(exc, (rp.ReachError, trio.TooSlowError)) else "errors"] += 1
            log.debug("relay connection from %s dropped: %s", ip, exc or type(exc).__name__)
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _refuse(self, stream: trio.SocketStream, status: int, why: str, counter: str) -> None:
        self.counters[counter] += 1
        with trio.move_on_after(1):
            await stream.send_all(rp.encode_status(status, why))

    async def _connect(self, stream: trio.SocketStream, target: PeerID, ip: str) -> None:
        lim = self.limits
        res = self._live(target)
        if res is None:
            await self._refuse(stream, rp.STATUS_NO_RESERVATION,
                               f"no reservation for {target.short()} at this relay; it may have moved to "
                               "another relay (read its record again)", "no_reservation")
            return
        if self.circuits >= lim.max_circuits:
            await self._refuse(stream, rp.STATUS_OVER_QUOTA, f"relay carries {lim.max_circuits} circuits already",
                               "over_circuits")
            return
        if self.by_ip[ip] >= lim.max_circuits_per_ip:
            await self._refuse(stream, rp.STATUS_OVER_QUOTA, f"{lim.max_circuits_per_ip} circuits from your "
                               "address already", "over_ip")
            return
        if res.circuits >= lim.max_circuits_per_peer:
            await self._refuse(stream, rp.STATUS_OVER_QUOTA, f"{target.short()} has {lim.max_circuits_per_peer} "
                               "circuits through this relay already", "over_peer")
            return
        cid = os.urandom(rp.CIRCUIT_ID_SIZE)
        pending = self.pending[cid] = _Pending()
        self.circuits += 1
        self.by_ip[ip] += 1
        res.circuits += 1
        try:
            try:
                with trio.fail_after(lim.accept_timeout):
                    await res.conn.push(INCOMING, {"c": cid, "ip": ip})
                    await pending.arrived.wait()
            except (trio.TooSlowError, PymeshError) as exc:
                await self._refuse(stream, rp.STATUS_REFUSED, f"{target.short()} did not take the circuit: "
                                   f"{exc or 'no answer'}", "not_accepted")
                return
            other = pending.stream
            assert other is not None
            ok = rp.encode_status(rp.STATUS_OK)
            await other.send_all(ok)
            await stream.send_all(ok)
            self.counters["circuits"] += 1
            log.info("relay: circuit from %s to %s open (%d carried now)", ip, target.short(), self.circuits)
            await self._splice(stream, other, res.bucket)
            log.info("relay: circuit from %s to %s closed", ip, target.short())
        finally:
            self.pending.pop(cid, None)
            pending.done.set()
            self.circuits -= 1
            self.by_ip[ip] -= 1
            if self.by_ip[ip] <= 0:
                del self.by_ip[ip]
            res.circuits -= 1

    async def _accept(self, stream: trio.SocketStream, cid: bytes) -> None:
        pending = self.pending.get(cid)
        if pending is None or pending.stream is not None:
            await self._refuse(stream, rp.STATUS_REFUSED, "no such circuit (it timed out or was taken)", "bad_accept")
            return
        pending.stream = stream
        pending.arrived.set()
        await pending.done.wait()   # the connecting side's task copies and then lets go

    async def _splice(self, a: trio.SocketStream, b: trio.SocketStream, peer_bucket: TokenBucket) -> None:
        """Copy both ways until either side ends, a circuit limit is hit or time runs out.
        Between two kernel sockets the bytes go socket -> pipe -> socket (``os.splice``: they
        never enter this process); otherwise (tests wrap the streams) through Python."""
        lim = self.limits
        moved = [0]

        async def charge(n: int) -> bool:
            moved[0] += n
            if moved[0] > lim.circuit_bytes:
                self.counters["circuit_bytes_cut"] += 1
                return False
            await self.bucket.take(n)
            await peer_bucket.take(n)
            return True

        async def pump(src: trio.SocketStream, dst: trio.SocketStream, scope: trio.CancelScope) -> None:
            try:
                if _SPLICE and isinstance(src, trio.SocketStream) and isinstance(dst, trio.SocketStream):
                    await _splice_pump(raw_socket(src), raw_socket(dst), charge)
                else:
                    while True:
                        data = await src.receive_some(CHUNK)
                        if not data or not await charge(len(data)):
                            break
                        await dst.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            scope.cancel()      # one side ended: end the circuit

        with trio.move_on_after(lim.circuit_seconds) as timer:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, a, b, nursery.cancel_scope)
                nursery.start_soon(pump, b, a, nursery.cancel_scope)
        if timer.cancelled_caught:
            self.counters["circuit_time_cut"] += 1
        self.counters["bytes"] += moved[0]


_SPLICE = hasattr(os, "splice") and hasattr(os, "pipe2")
#: bytes one splice moves at most (and the pipe's capacity, where the kernel allows it)
SPLICE_CHUNK = 1 << 20


async def _splice_pump(src: socket.socket, dst: socket.socket, charge: Callable[[int], Awaitable[bool]]) -> None:
    """Move bytes from ``src`` to ``dst`` through a pipe until ``src`` ends or ``charge``
    (called with each batch's size before it is passed on) says stop."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        try:
            fcntl.fcntl(w, 1031, SPLICE_CHUNK)   # F_SETPIPE_SZ; the default 64 KiB works too
        except OSError:
            pass
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        while True:
            try:
                n = os.splice(src.fileno(), w, SPLICE_CHUNK, flags=flags)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(src)
                continue
            if n == 0 or not await charge(n):
                return
            while n:
                try:
                    n -= os.splice(r, dst.fileno(), n, flags=flags)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(dst)
    finally:
        os.close(r)
        os.close(w)


def _seen_as(conn: Connection) -> dict[str, object]:
    """Where this relay sees a peer's connection come from (its NAT's mapping)."""
    return {"host": conn.remote_host or "", "port": conn.remote_port or 0}


def _peer_ip(stream: trio.SocketStream) -> str:
    try:
        return host_of(stream.socket.getpeername()) or "?"
    except OSError:
        return "?"


__all__ = ["RelayService", "RelayLimits", "TokenBucket", "RESERVE", "OBSERVE", "INCOMING"]
