"""Joining the DHT through bootstrap addresses, and re-checking them while running.

:class:`Bootstrapper` is a component of :class:`pymesh.net.dht.DHTNode` (``node.bootstrapper``):
the first join (ask every bootstrap address, look up our own ID, then fill sparse buckets)
and the periodic re-query of bootstrap addresses that went silent, each on its own
:class:`~pymesh.proto.backoff.Backoff`, so a restarted bootstrap re-learns the swarm.
"""

from __future__ import annotations

import logging
import socket as _socket

import trio

from pymesh.errors import PeerUnavailable
from pymesh.net.clock import Clock
from pymesh.net.dht_config import DHTRemoteError
from pymesh.net.dht_ops import DHTOps
from pymesh.proto.addr import PeerAddr
from pymesh.proto.backoff import Backoff
from pymesh.proto.krpc import Addr

log = logging.getLogger(__name__)


class Bootstrapper:
    def __init__(self, net: DHTOps, clock: Clock, addrs: list[PeerAddr]) -> None:
        self.net = net
        self.clock = clock
        self.addrs = addrs
        self.backoff: Backoff[PeerAddr] = Backoff()  # bootstrap addresses that stopped answering

    async def bootstrap(self) -> int:
        """Ask the bootstrap addresses, look up our own ID, then IDs in sparse buckets.
        Returns the routing table size."""
        if not self.addrs:
            return len(self.net.core.routing)
        with trio.move_on_after(self.net.config.bootstrap_timeout):
            async with trio.open_nursery() as nursery:
                for pa in self.addrs:
                    nursery.start_soon(self._ping_bootstrap, pa)
            await self.net.lookup(self.net.node_id)
            # Kademlia's join: fill the far buckets that are still sparse.
            async with trio.open_nursery() as nursery:
                for target in self.net.core.routing.sparse_targets()[:8]:
                    nursery.start_soon(self.net.lookup, target)
        size = len(self.net.core.routing)
        if size == 0:
            log.warning("bootstrap: none of %s answered; will retry",
                        ", ".join(str(a) for a in self.addrs))
        else:
            log.info("bootstrap: routing table holds %d nodes", size)
        return size

    async def _ping_bootstrap(self, pa: PeerAddr, quiet: bool = False, fresh: float = 0.0) -> bool:
        """find_node(own ID) to one bootstrap address (skipped if it answered within ``fresh``
        seconds and has missed no query since); True when it answered."""
        try:
            infos = await trio.socket.getaddrinfo(pa.host, pa.port, _socket.AF_INET, _socket.SOCK_DGRAM)
        except OSError as exc:
            log.warning("bootstrap address %s does not resolve: %s", pa, exc)
            return False
        for info in infos[:1]:
            addr = (str(info[4][0]), int(info[4][1]))
            if fresh > 0 and self._answered_within(addr, fresh):
                return True
            try:
                reply = await self.net.query(addr, b"find_node", {b"target": self.net.node_id})
            except (PeerUnavailable, DHTRemoteError) as exc:
                (log.debug if quiet else log.warning)("bootstrap node %s: %s", pa, exc)
                continue
            if pa.peer_id is not None and reply.sender_id != pa.peer_id.node_id:
                # The address named a peer (/p2p/<id>) and someone else answers there.
                self.net.core.routing.remove(reply.sender_id)
                log.error("bootstrap %s: the node answering there is not peer %s (its node ID is %s); "
                          "not using it — check the address printed by `pymesh bootstrap`",
                          pa.hostport(), pa.peer_id.short(), reply.sender_id.hex()[:12])
                continue
            return True
        return False

    def _answered_within(self, addr: Addr, seconds: float) -> bool:
        """Whether a routing-table node at ``addr`` answered within ``seconds`` and has missed
        no query since."""
        now = self.clock.wall()
        return any(e.addr == addr and e.fail_count == 0 and e.last_response is not None
                   and now - e.last_response < seconds for e in self.net.core.routing.all_nodes())

    async def recheck(self, period: float) -> None:
        """Query each bootstrap address that no routing-table node at it answered within
        ``4 * period`` (a restarted bootstrap may have kept its address and even its ID), each
        with its own backoff (``period`` doubling up to 8x) while it stays silent: a bootstrap
        restarted on the same address hears from us, learns the swarm, and receives records
        at the next heartbeat. Only the first 8 addresses are checked."""
        async def one(pa: PeerAddr) -> None:
            if await self._ping_bootstrap(pa, quiet=True, fresh=4 * period):
                self.backoff.succeeded(pa)
            else:
                self.backoff.failed(pa, self.clock.monotonic(), period)

        now = self.clock.monotonic()
        async with trio.open_nursery() as nursery:
            for pa in self.addrs[:8]:
                if self.backoff.due(pa, now):
                    nursery.start_soon(one, pa)
