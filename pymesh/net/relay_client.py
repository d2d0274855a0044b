"""The peers' side of relaying: opening a circuit, and holding reservations at relays.

A dialer opens a circuit with :func:`open_circuit` on a fresh TCP connection to the relay
(``RpcNode.connect_relayed`` does that and then TLS). A peer behind NAT runs a
:class:`RelayKeeper`: it keeps reservations at up to ``want`` relays (an authenticated RPC
connection to each, ``relay.reserve`` renewed before it lapses, replacements found through
``find`` when a relay goes away) and, when a relay pushes ``relay.incoming`` with a circuit
id, opens its own TCP connection to that relay, accepts the circuit and serves the dialer
over it (``RpcNode.serve_relayed``). Pushes from anything but a relay it reserved at, and
more than ``max_accepting`` circuits being taken at once, are ignored.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable, Protocol

import trio

from pymesh.errors import PeerUnavailable, PymeshError
from pymesh.proto import reach as rp
from pymesh.proto.frames import Meta, TensorBlob
from pymesh.proto.identity import PeerID
from pymesh.proto.reach import Reach, RelayAddr
from pymesh.proto.vocab import Transport

if TYPE_CHECKING:
    from pymesh.net.conn import Connection
    from pymesh.net.rpc import RpcNode

log = logging.getLogger(__name__)

RESERVE = "relay.reserve"
INCOMING = "relay.incoming"
#: relays tried per maintenance round
MAX_TRIES = 6


class PunchHook(Protocol):
    """Hole punching as ``RpcNode.connect`` uses it (``pymesh.net.punch.Puncher``)."""

    async def punch(self, relayed: "Connection", relay: RelayAddr, peer: PeerID) -> "Connection | None": ...


async def read_exact(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    """Exactly ``n`` bytes (``n`` is capped by the caller), never more: what follows is TLS."""
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise PeerUnavailable(f"the relay closed the connection after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def open_circuit(stream: trio.SocketStream, request: rp.CircuitRequest, relay: RelayAddr) -> None:
    """Send a circuit request and read the relay's answer; PeerUnavailable unless it is OK."""
    try:
        await stream.send_all(rp.encode_request(request))
        status, n = rp.parse_status_head_untrusted(await read_exact(stream, 3))
        message = (await read_exact(stream, n)).decode("utf-8", "replace") if n else ""
    except rp.ReachError as exc:
        raise PeerUnavailable(f"relay at {relay.host}:{relay.port} answered garbage: {exc}") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise PeerUnavailable(f"relay at {relay.host}:{relay.port} dropped the circuit request: {exc}") from None
    if status != rp.STATUS_OK:
        raise PeerUnavailable(f"relay at {relay.host}:{relay.port} refused the circuit: {message}")


@dataclass
class Reservation:
    relay: RelayAddr                   # the relay's key and circuit (TCP) address
    conn: "Connection"                 # the authenticated connection the reservation lives on
    observed: tuple[str, int] | None   # this node's address as the relay saw it
    renew_at: float


#: finds candidate relays: (key, host, port) of each, port serving both RPC and circuits
FindRelays = Callable[[], Awaitable[list[tuple[PeerID, str, int]]]]


class RelayKeeper:
    def __init__(self, node: "RpcNode", find: FindRelays, *, want: int = rp.MAX_RELAYS,
                 on_change: Callable[[], None] | None = None, max_accepting: int = 32,
                 period: float = 5.0) -> None:
        self.node = node
        self.find = find
        self.want = want
        self.on_change = on_change
        self.max_accepting = max_accepting
        self.period = period
        self.reservations: dict[PeerID, Reservation] = {}
        self.accepting = 0
        self.accepted = 0
        self._nursery: trio.Nursery | None = None
        self._avoid: dict[PeerID, float] = {}
        node.on_push(INCOMING, self._incoming)

    # -- what the record says ----------------------------------------------------------------
    def relays(self) -> tuple[RelayAddr, ...]:
        return tuple(r.relay for r in self.reservations.values() if not r.conn.closed)[:rp.MAX_RELAYS]

    def observed(self) -> tuple[str, int] | None:
        """This node's QUIC mapping, if every relay that saw it over QUIC saw the same one."""
        if self.node.transport != Transport.QUIC:   # reservations over TCP say nothing of the QUIC socket
            return None
        seen = {r.observed for r in self.reservations.values() if r.observed is not None and not r.conn.closed}
        return next(iter(seen)) if len(seen) == 1 else None

    def reach(self, *, punch: bool) -> Reach | None:
        relays = self.relays()
        if not relays:
            return None
        addr = self.observed() if punch else None
        return Reach("punch" if addr is not None else "relay", relays, addr)

    # -- reservations ------------------------------------------------------------------------
    async def reserve(self, peer: PeerID, host: str, port: int) -> Reservation:
        conn = await self.node.connect(host, port, peer)
        reply, _ = await conn.call(RESERVE, {}, timeout=5.0)
        ttl = reply.get("ttl")
        tcp = reply.get("tcp")
        if not isinstance(ttl, int) or not 10 <= ttl <= 86400 or not isinstance(tcp, int) or not 0 < tcp <= 65535:
            raise PeerUnavailable(f"relay {peer.short()} answered the reservation with a bad ttl or port")
        try:
            observed: tuple[str, int] | None = rp.addr_untrusted([reply.get("host"), reply.get("port")])
        except rp.ReachError:
            observed = None
        res = Reservation(RelayAddr(peer.key, host, tcp), conn, observed, trio.current_time() + ttl / 2)
        self.reservations[peer] = res
        return res

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep ``want`` reservations until cancelled; started once the first round is done."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self.maintain()
            task_status.started()
            while True:
                await trio.sleep(self.period)
                await self.maintain()

    async def maintain(self) -> None:
        before = self.relays(), self.observed()
        now = trio.current_time()
        for peer, res in list(self.reservations.items()):
            if res.conn.closed:
                log.info("relay %s at %s:%d went away; looking for another", peer.short(), res.relay.host,
                         res.relay.port)
                del self.reservations[peer]
                self._avoid[peer] = now + 60.0
            elif now >= res.renew_at:
                try:
                    await self.reserve(peer, res.relay.host, res.relay.port)
                except PymeshError as exc:
                    log.info("renewing the reservation at relay %s failed: %s", peer.short(), exc)
                    del self.reservations[peer]
        if len(self.reservations) < self.want:
            await self._add(now)
        if (self.relays(), self.observed()) != before and self.on_change is not None:
            self.on_change()

    async def _add(self, now: float) -> None:
        try:
            with trio.move_on_after(10):
                found = await self.find()
        except PymeshError as exc:
            log.info("finding relays failed: %s", exc)
            return
        self._avoid = {p: t for p, t in self._avoid.items() if t > now}
        candidates = [c for c in found if c[0] not in self.reservations and c[0] != self.node.peer_id
                      and now >= self._avoid.get(c[0], 0.0)]
        random.shuffle(candidates)
        for peer, host, port in candidates[:MAX_TRIES]:   # a DHT full of fake relays costs a bounded round
            if len(self.reservations) >= self.want:
                return
            try:
                with trio.fail_after(8):
                    res = await self.reserve(peer, host, port)
                log.info("reserved at relay %s (%s:%d); it sees this node at %s", peer.short(), host, port,
                         "%s:%d" % res.observed if res.observed else "?")
            except (PymeshError, trio.TooSlowError) as exc:
                log.info("relay %s at %s:%d refused or failed the reservation: %s", peer.short(), host, port,
                         exc or "timed out")
                self._avoid[peer] = now + 60.0

    # -- circuits ----------------------------------------------------------------------------
    async def _incoming(self, conn: "Connection", meta: Meta, tensors: list[TensorBlob]) -> None:
        res = self.reservations.get(conn.peer)
        cid = meta.get("c")
        if res is None or res.conn is not conn:
            log.debug("relay.incoming from %s, where this node holds no reservation; ignored", conn.peer.short())
            return
        if not isinstance(cid, bytes) or len(cid) != rp.CIRCUIT_ID_SIZE:
            log.info("relay %s pushed a malformed circuit id; ignored", conn.peer.short())
            return
        if self.accepting >= self.max_accepting or self._nursery is None:
            log.info("%d relayed circuits are being taken already; one from %s is left to time out",
                     self.accepting, conn.peer.short())
            return
        try:   # the dialer's address as the relay saw it: what the peer's address quotas count
            ip: str | None = rp.addr_untrusted([meta.get("ip"), 1])[0]
        except rp.ReachError:
            ip = None
        self.accepting += 1
        self._nursery.start_soon(self._take, res.relay, cid, ip)

    async def _take(self, relay: RelayAddr, cid: bytes, ip: str | None = None) -> None:
        try:
            try:
                with trio.fail_after(self.node.config.connect_timeout):
                    stream = await trio.open_tcp_stream(relay.host, relay.port)
                    try:
                        await open_circuit(stream, rp.CircuitRequest(rp.OP_ACCEPT, circuit=cid), relay)
                    except BaseException:
                        with trio.CancelScope(shield=True):
                            await stream.aclose()
                        raise
            except (PymeshError, OSError, trio.TooSlowError) as exc:
                log.info("taking a circuit at relay %s:%d failed: %s", relay.host, relay.port, exc or "timed out")
                return
        finally:
            self.accepting -= 1
        self.accepted += 1
        await self.node.serve_relayed(stream, remote_host=ip)


__all__ = ["RelayKeeper", "Reservation", "open_circuit", "read_exact", "PunchHook", "RESERVE", "INCOMING"]
