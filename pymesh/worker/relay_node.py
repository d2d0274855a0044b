"""``pymesh relay``: a node that relays for peers behind NAT and serves no blocks.

Transport on port N (QUIC on UDP N for reservations and ``relay.observe``; TCP N for circuits
and TCP reservations), DHT on N+1, as for workers. It announces a relay record (model id
:data:`~pymesh.worker.nat.RELAY_MODEL`) that the DHT heartbeat keeps fresh, and an offline
one when it stops.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field

import trio

from pymesh.errors import ConfigError
from pymesh.net.relay import RelayLimits
from pymesh.proto.addr import parse_addr
from pymesh.proto.identity import Identity, default_identity_path
from pymesh.proto.vocab import Transport
from pymesh.settings import Settings
from pymesh.worker.nat import NatOptions, NatStanding
from pymesh.worker.server import run_node

log = logging.getLogger(__name__)


@dataclass
class RelayOptions:
    bootstrap: list[str]
    port: int
    host: str = "0.0.0.0"
    announce_addr: str | None = None
    identity: str | None = None
    limits: RelayLimits = field(default_factory=RelayLimits)
    settings: Settings = field(default_factory=Settings)


async def run_relay(opts: RelayOptions, *, task_status: trio.TaskStatus[NatStanding] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until SIGINT/SIGTERM (or cancellation)."""
    from pymesh.net.dht import DHTNode
    from pymesh.net.rpc import RpcNode

    if not 0 < opts.port < 65535:
        raise ConfigError(f"--port {opts.port} must be in 1..65534 (the DHT takes port + 1)")
    home = opts.settings.runtime.home
    identity = Identity.load_or_create(opts.identity or default_identity_path(f"relay-{opts.port}", home))
    boots = [parse_addr(b) for b in opts.bootstrap]
    async with trio.open_nursery() as nursery:
        nodes = {}
        for t in (Transport.QUIC, Transport.TCP):
            node = RpcNode(identity, transport=t, config=opts.settings.transport_config())
            await nursery.start(run_node, node)
            await node.listen(opts.host, opts.port)
            nodes[t] = node
        dht = DHTNode(identity, host=opts.host, port=opts.port + 1, bootstrap=boots,
                      config=opts.settings.dht_config())
        await nursery.start(run_node, dht)
        standing = NatStanding(nodes, dht, NatOptions("public", relay=True, relay_limits=opts.limits))
        await standing.start(nursery, opts.host, opts.port, announced=True)
        host = opts.announce_addr or (opts.host if opts.host not in ("0.0.0.0", "::", "") else None)
        if host is None:
            belief = dht.core.observed.belief()
            host = belief[0] if belief is not None else "127.0.0.1"
        record = standing.relay_record(identity, host, opts.port)
        await dht.publish_record(record)
        print(f"relay {identity.peer_id} on {host}:{opts.port} (QUIC+TCP), DHT on UDP {dht.port}", flush=True)
        task_status.started(standing)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("received %s; shutting down", signal.Signals(signum).name)
                break
        with trio.move_on_after(5):
            await dht.records.publish_offline()
        nursery.cancel_scope.cancel()
