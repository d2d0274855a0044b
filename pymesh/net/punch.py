"""UDP hole punching for QUIC, coordinated through a relayed connection (as libp2p's DCUtR).

The dialer holds an authenticated, end-to-end encrypted connection to a peer behind NAT
through a relay. It learns its own QUIC mapping by asking a relay where it sees this node's
QUIC socket (``relay.observe``), then calls ``pm.punch`` on the relayed connection with
that address. The peer answers with its own mapping (as its relays saw its QUIC socket) and
at once sends a few one-byte datagrams to the dialer's address from its QUIC socket: that
opens its NAT for the dialer. The dialer, on the answer, sends its own and dials QUIC to
the peer's address; its Initial, arriving after the peer's first datagram left, is let
through, and QUIC retransmits cover the race. The TLS handshake pins the peer's key, so
dialing an address learned this way is as safe as dialing a record's. Where a NAT maps
each destination to its own port (symmetric), no datagram matches and the dial times out:
the connection stays relayed.

The addresses are exchanged only over the authenticated connection, so each is vouched for
by the peer it belongs to. A peer sends punch datagrams only for calls that came through a
relay, at most once per ``interval`` seconds per caller and ``global_rate`` times a second in all.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

import trio

from pymesh.errors import PymeshError
from pymesh.net.conn import CallContext, RemoteError
from pymesh.net.relay import OBSERVE
from pymesh.proto import reach as rp
from pymesh.proto.frames import Meta, TensorBlob
from pymesh.proto.identity import PeerID
from pymesh.proto.dialback import DialbackLimiter
from pymesh.proto.reach import RelayAddr

if TYPE_CHECKING:
    from pymesh.net.conn import Connection
    from pymesh.net.rpc import RpcNode

log = logging.getLogger(__name__)

PUNCH = "pm.punch"
#: datagrams each side sends, and the gap between them
PUNCHES = 10
PUNCH_GAP = 0.05


class Puncher:
    def __init__(self, node: "RpcNode", own: Callable[[], tuple[str, int] | None] = lambda: None, *,
                 can_dial: Callable[[], bool] = lambda: True, timeout: float = 3.0, interval: float = 10.0,
                 global_rate: float = 10.0) -> None:
        self.node = node
        self.own = own
        #: False where this node knows its own NAT maps each destination apart (symmetric): its
        #: dials could never match the mapping it announced, so it does not try
        self.can_dial = can_dial
        self.timeout = timeout
        self.interval = interval
        self.global_rate = global_rate
        #: one attempt per caller per ``interval`` and ``global_rate`` a second in all, the
        #: table of callers bounded (the dial-back check's limiter, keyed by peer)
        self.limiter = DialbackLimiter(interval=interval, rate=global_rate, burst=global_rate, max_ips=4096)
        self._observed: dict[bytes, tuple[float, tuple[str, int]]] = {}
        #: how each attempt went, for logs, the monitor and ``pymesh bench nat``
        self.attempts: list[dict[str, object]] = []
        node.register(PUNCH, self._handle)
        node.punch = self

    # -- the side behind NAT -----------------------------------------------------------------
    async def _handle(self, ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> tuple[Meta, list[TensorBlob]]:
        mine = self.own()
        if mine is None:
            raise RemoteError("no_mapping", "this node knows no stable QUIC mapping of its own; stay relayed")
        if ctx.connection.path != "relayed":
            raise RemoteError("not_relayed", "hole punching is coordinated over a relayed connection only")
        try:
            theirs = rp.addr_untrusted(meta.get("a"))
        except rp.ReachError as exc:
            raise RemoteError("bad_request", f"pm.punch: {exc}") from None
        if not self.limiter.allow(ctx.peer.to_text(), trio.current_time()):
            raise RemoteError("rate_limited", f"one hole-punching attempt per {self.interval:.0f} s per peer and "
                                              f"{self.global_rate:.0f} per second in all; try again later")
        self._spawn_punches(theirs)
        return {"a": [mine[0], mine[1]]}, []

    def _spawn_punches(self, addr: tuple[str, int]) -> None:
        nursery = self.node.nursery
        if nursery is not None:
            nursery.start_soon(self._send_punches, addr)

    async def _send_punches(self, addr: tuple[str, int]) -> None:
        for _ in range(PUNCHES):
            self.node.send_datagram(addr, b"\x00")
            await trio.sleep(PUNCH_GAP)

    # -- the dialer --------------------------------------------------------------------------
    async def observe(self, relay: RelayAddr) -> tuple[str, int]:
        """This node's QUIC mapping as ``relay`` sees it (cached a minute)."""
        now = trio.current_time()
        cached = self._observed.get(relay.peer_key)
        if cached is not None and now - cached[0] < 60.0:
            return cached[1]
        conn = await self.node.connect(relay.host, relay.port, PeerID(relay.peer_key))
        reply, _ = await conn.call(OBSERVE, {}, timeout=self.timeout)
        try:
            addr = rp.addr_untrusted([reply.get("host"), reply.get("port")])
        except rp.ReachError as exc:
            raise RemoteError("bad_reply", f"relay.observe: {exc}") from None
        if len(self._observed) >= 256:    # relays come from records strangers sign: keep it bounded
            self._observed = {k: v for k, v in self._observed.items() if now - v[0] < 60.0}
            while len(self._observed) >= 256:
                del self._observed[next(iter(self._observed))]
        self._observed[relay.peer_key] = (now, addr)
        return addr

    async def punch(self, relayed: "Connection", relay: RelayAddr, peer: PeerID) -> "Connection | None":
        """A direct QUIC connection to ``peer`` opened by hole punching, or None (stay relayed)."""
        if not self.can_dial():
            return None
        t0 = trio.current_time()
        outcome: dict[str, object] = {"peer": peer.short(), "ok": False}
        self.attempts = self.attempts[-63:] + [outcome]
        try:
            with trio.fail_after(self.timeout * 2):
                mine = await self.observe(relay)
                t1 = trio.current_time()
                reply, _ = await relayed.call(PUNCH, {"a": [mine[0], mine[1]]}, timeout=self.timeout)
                outcome["relayed_rtt_s"] = trio.current_time() - t1
                theirs = rp.addr_untrusted(reply.get("a"))
                self._spawn_punches(theirs)
                with trio.fail_after(self.timeout):
                    conn = await self.node.dial_quic(theirs[0], theirs[1], peer)
        except (PymeshError, trio.TooSlowError) as exc:
            outcome["error"] = str(exc) or "timed out"
            log.info("hole punching to %s failed (%s); the connection stays relayed via %s:%d", peer.short(),
                     outcome["error"], relay.host, relay.port)
            return None
        conn.path = "punched"
        outcome.update(ok=True, seconds=trio.current_time() - t0, addr=f"{theirs[0]}:{theirs[1]}")
        log.info("hole punching to %s opened a direct QUIC path to %s:%d in %.2f s", peer.short(), theirs[0],
                 theirs[1], outcome["seconds"])
        return conn


__all__ = ["Puncher", "PUNCH"]
