"""A worker's (or relay's) standing on the internet: reachable, hole-punchable or relayed,
and relaying for others.

**Reachability** (``--reachability auto``, the default): a swarm whose bootstrap nodes are all
on loopback is local and every worker is direct. Otherwise the worker asks up to three DHT
nodes on distinct addresses for a dial-back (:mod:`pymesh.net.dht_dialback`: the probe comes
from a fresh port of the asked node, to the address *it* observed). A probe that arrives
means the worker is directly reachable; checks that were answered but whose probe never came
mean it sits behind NAT; no answer at all leaves it direct (with a warning).
``--announce-addr`` or ``--reachability public`` skips the check; ``--reachability nat``
assumes NAT.

**Behind NAT** the worker keeps reservations at up to two relays found through the DHT
(:class:`~pymesh.net.relay_client.RelayKeeper`) and its record's ``rc`` field names them;
where the relays saw its QUIC socket at one and the same address (and the DHT's observed
mapping does not vary per destination) the record offers hole punching at that address. Its
DHT node turns read-only (BEP 43): it keeps looking up and publishing, but stays out of
other nodes' routing tables, where it could only be a dead contact.
When the relays or the mapping change, the worker announces again.

**Relaying** (``--relay`` on a worker, or ``pymesh relay``): a :class:`~pymesh.net.relay.
RelayService` on the transport port (circuits on TCP N: sharing the TCP RPC listener where
there is one), and a relay record (model id :data:`RELAY_MODEL`) in the DHT.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable

import trio

from pymesh.errors import PymeshError
from pymesh.net.punch import Puncher
from pymesh.net.relay import RelayLimits, RelayService
from pymesh.net.relay_client import RelayKeeper
from pymesh.proto.identity import PeerID
from pymesh.proto.reach import Reach
from pymesh.proto.records import WorkerRecord
from pymesh.proto.vocab import Transport, WorkerState

if TYPE_CHECKING:
    from pymesh.net.dht import DHTNode
    from pymesh.net.rpc import RpcNode
    from pymesh.proto.identity import Identity

log = logging.getLogger(__name__)

#: the model id of relay records (stored at their own DHT target)
RELAY_MODEL = "pymesh-relay"


@dataclass
class NatOptions:
    reachability: str = "auto"                # one of pymesh.proto.reach.REACHABILITY
    relay: bool = False                    # offer relaying to others
    relay_limits: RelayLimits = field(default_factory=RelayLimits)
    check_timeout: float = 2.0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class NatStanding:
    """Decides and keeps the node's reachability; ``reach()`` is what its record says."""

    def __init__(self, nodes: dict[Transport, "RpcNode"], dht: "DHTNode", opts: NatOptions, *,
                 announce: Callable[[], Awaitable[None]] | None = None) -> None:
        self.nodes = nodes
        self.dht = dht
        self.opts = opts
        self.announce = announce
        #: the address a dial-back checker saw this node at (one that probed it, if any did):
        #: what a worker bound to a wildcard address announces before the DHT's belief forms
        self.public_ip: str | None = None
        self.keeper: RelayKeeper | None = None
        self.relay: RelayService | None = None
        self._nursery: trio.Nursery | None = None
        quic = nodes.get(Transport.QUIC)
        self.puncher = Puncher(quic, self._own_mapping, can_dial=self._can_punch) if quic is not None else None

    def _own_mapping(self) -> tuple[str, int] | None:
        if self.keeper is None or self.dht.core.observed.mapping == "varies":
            return None
        return self.keeper.observed()

    def _can_punch(self) -> bool:
        """Whether dials from here can hole-punch: not from behind a NAT whose mapping varies."""
        return self.keeper is None or self._own_mapping() is not None

    def reach(self) -> Reach | None:
        if self.keeper is None:
            return None
        return self.keeper.reach(punch=self.puncher is not None and self._own_mapping() is not None)

    # -- start -------------------------------------------------------------------------------
    async def start(self, nursery: trio.Nursery, host: str, port: int, *, announced: bool) -> None:
        """Offer relaying (``opts.relay``), then decide reachability (``announced``: the
        operator gave the address) and, behind NAT, take reservations at relays."""
        self._nursery = nursery
        if self.opts.relay:
            await self._start_relay(nursery, host, port)
        behind = await self._behind_nat(announced)
        if not behind:
            return
        # BEP 43: nobody can query a DHT node behind NAT, so it should not sit in routing tables
        self.dht.read_only = self.dht.core.read_only = True
        node = self.nodes.get(Transport.QUIC) or next(iter(self.nodes.values()))
        self.keeper = RelayKeeper(node, self.find_relays, on_change=self._changed)
        await nursery.start(self.keeper.run)
        reach = self.reach()
        if reach is None:
            log.warning("this node is behind NAT and no relay took a reservation yet: nobody can dial it until one "
                        "does (start a relay: `pymesh relay --port N --bootstrap ...`, or a worker with --relay)")
        else:
            log.info("behind NAT: reachable via %s%s", ", ".join(f"{r.host}:{r.port}" for r in reach.relays),
                     f", hole punching at {reach.punch_addr[0]}:{reach.punch_addr[1]}" if reach.punch_addr else "")

    async def _behind_nat(self, announced: bool) -> bool:
        choice = self.opts.reachability
        if choice == "nat":
            return True
        if choice == "public" or announced:
            return False
        boots = list(self.dht.bootstrap_addrs)
        if boots and all(_is_loopback(b.host) for b in boots):
            return False           # a swarm on this machine
        verdict = await self.check_reachable()
        if verdict is None:
            log.warning("could not check whether this node is reachable (no DHT node answered a dial-back); "
                        "assuming it is: set --reachability nat if it sits behind NAT")
            return False
        log.info("reachability: %s", "directly reachable" if verdict else "behind NAT (no dial-back probe arrived)")
        return not verdict

    async def check_reachable(self) -> bool | None:
        """True: a dial-back probe arrived; False: nodes answered but no probe came; None: unchecked."""
        addrs: list[tuple[str, int]] = []
        for b in self.dht.bootstrap_addrs:
            addrs.append((b.host, b.port))
        for c in self.dht.core.routing.closest(self.dht.node_id, 16):
            addrs.append(c.addr)
        chosen: dict[str, tuple[str, int]] = {}
        for addr in addrs:
            if len(chosen) < 3:
                chosen.setdefault(addr[0], addr)
        verdicts: list[bool] = []

        async def one(addr: tuple[str, int]) -> None:
            try:
                result = await self.dht.dialback_check(addr, timeout=self.opts.check_timeout)
            except PymeshError as exc:     # refused (rate limit) or no answer: not checked
                log.debug("dial-back check via %s:%d: %s", addr[0], addr[1], exc)
                return
            verdicts.append(result.reachable)
            if result.observed is not None and (self.public_ip is None or result.reachable):
                self.public_ip = result.observed[0]

        async with trio.open_nursery() as nursery:
            for addr in chosen.values():
                nursery.start_soon(one, addr)
        return any(verdicts) if verdicts else None

    # -- relays ------------------------------------------------------------------------------
    async def find_relays(self) -> list[tuple[PeerID, str, int]]:
        recs = await self.dht.find_model_records(RELAY_MODEL)
        return [(r.peer_id, r.host, r.port) for r in recs
                if r.model_id == RELAY_MODEL and r.reach is None and r.state == WorkerState.ONLINE]

    def _changed(self) -> None:
        reach = self.reach()
        log.info("reachability changed: %s", "no relay holds a reservation" if reach is None else
                 f"{reach.mode} via " + ", ".join(f"{r.host}:{r.port}" for r in reach.relays))
        if self.announce is not None and self._nursery is not None:
            self._nursery.start_soon(self.announce)

    async def _start_relay(self, nursery: trio.Nursery, host: str, port: int) -> None:
        service = self.relay = RelayService(self.opts.relay_limits)
        await service.attach(self.nodes.values(), nursery, host, port)
        log.info("relaying for peers behind NAT on TCP %d (at most %d reservations, %d circuits, %.0f MB/s)",
                 service.tcp_port, service.limits.max_reservations, service.limits.max_circuits,
                 service.limits.bandwidth / 1e6)

    def relay_record(self, identity: "Identity", host: str, port: int) -> WorkerRecord:
        """This node's relay record (only for a node that relays)."""
        assert self.relay is not None
        return WorkerRecord(peer_id=identity.peer_id, model_id=RELAY_MODEL, start=0, stop=1, host=host, port=port,
                            transports=tuple(t.value for t in self.nodes), state=WorkerState.ONLINE,
                            sessions=min(self.relay.circuits, 1 << 20)).signed(identity)


__all__ = ["NatOptions", "NatStanding", "RELAY_MODEL"]
