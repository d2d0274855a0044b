"""A bootstrap address that names its peer (``/p2p/<id>``) is used only if that peer answers."""

from __future__ import annotations

import pytest
import trio

from pymesh.net.dht import DHTConfig, DHTNode
from pymesh.proto.addr import PeerAddr
from pymesh.proto.identity import Identity


def cfg() -> DHTConfig:
    return DHTConfig(record_ttl=3.0, heartbeat=1.0, rpc_timeout=0.5, bootstrap_timeout=2.0)


@pytest.mark.timeout(60)
def test_bootstrap_peer_id_is_checked() -> None:
    boot_ident = Identity.generate()

    async def main() -> None:
        async with DHTNode(boot_ident, host="127.0.0.1", config=cfg()) as boot:
            right = PeerAddr("127.0.0.1", boot.port, "udp", boot_ident.peer_id)
            wrong = PeerAddr("127.0.0.1", boot.port, "udp", Identity.generate().peer_id)
            async with DHTNode(Identity.generate(), host="127.0.0.1", bootstrap=[right], config=cfg()) as good:
                assert good.core.routing.get(boot_ident.node_id) is not None
            async with DHTNode(Identity.generate(), host="127.0.0.1", bootstrap=[wrong], config=cfg()) as fooled:
                assert fooled.core.routing.get(boot_ident.node_id) is None
                assert len(fooled.core.routing) == 0
    trio.run(main)
