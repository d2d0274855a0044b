"""Shared helpers for transport tests: a server/client RpcNode pair on loopback."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

from pymesh.net.rpc import Connection, RpcNode, TransportConfig
from pymesh.proto.identity import Identity

TRANSPORTS = ["quic", "tcp", "tcp-plain"]


def fast_config(**overrides: object) -> TransportConfig:
    base: dict[str, object] = dict(packet_size=16384, idle_timeout=10.0, connect_timeout=5.0, frame_timeout=10.0)
    base.update(overrides)
    return TransportConfig(**base)  # type: ignore[arg-type]


@asynccontextmanager
async def node_pair(transport: str, *, server_config: TransportConfig | None = None,
                    client_config: TransportConfig | None = None,
                    ) -> AsyncIterator[tuple[RpcNode, RpcNode, Connection]]:
    """(server, client, client's connection to server), both with fresh identities."""
    server_id, client_id = Identity.generate(), Identity.generate()
    async with RpcNode(server_id, transport=transport, config=server_config or fast_config()) as server, \
            RpcNode(client_id, transport=transport, config=client_config or fast_config()) as client:
        port = await server.listen("127.0.0.1", 0)
        server.test_port = port  # type: ignore[attr-defined]
        conn = await client.connect("127.0.0.1", port, server_id.peer_id)
        yield server, client, conn
