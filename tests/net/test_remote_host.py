"""``Connection.remote_host``: the peer's IP address on both sides of a loopback connection
(TCP: the socket's peer address; QUIC: the source of the peer's datagrams), None over an
in-memory byte stream. Workers key their per-address cache quotas on it."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from pymesh.net.conn import host_of
from pymesh.net.rpc import RpcNode
from pymesh.proto.identity import Identity
from tests.net.helpers import fast_config, node_pair

pytestmark = pytest.mark.timeout(60)


async def _server_side(server: RpcNode) -> list[str | None]:
    for _ in range(100):  # the server adopts the connection just after the handshake
        if server.connections():
            break
        await trio.sleep(0.01)
    return [c.remote_host for c in server.connections()]


def test_remote_host_over_loopback(transport: str) -> None:
    async def main() -> None:
        async with node_pair(transport) as (server, client, conn):
            assert conn.remote_host == "127.0.0.1"
            assert await _server_side(server) == ["127.0.0.1"]

    trio.run(main)


def test_remote_host_of_a_second_loopback_address() -> None:
    """A QUIC node that listens on 127.0.0.2 dials from there too: the server sees that address."""
    async def main() -> None:
        async with node_pair("quic") as (server, _, _), \
                RpcNode(Identity.generate(), transport="quic", config=fast_config()) as other:
            await other.listen("127.0.0.2", 0)
            conn = await other.connect("127.0.0.1", server.test_port, server.peer_id)  # type: ignore[attr-defined]
            assert conn.remote_host == "127.0.0.1"
            for _ in range(100):
                hosts = sorted(c.remote_host or "" for c in server.connections())
                if len(hosts) == 2:
                    break
                await trio.sleep(0.01)
            assert hosts == ["127.0.0.1", "127.0.0.2"]

    trio.run(main)


def test_no_remote_host_over_a_memory_stream() -> None:
    async def main() -> None:
        a, b = trio.testing.memory_stream_pair()
        async with RpcNode(Identity.generate(), transport="tcp") as server, \
                RpcNode(Identity.generate(), transport="tcp") as client, trio.open_nursery() as nursery:
            nursery.start_soon(server.serve_stream, b)
            conn = await client.connect_stream(a, server.peer_id)
            assert conn.remote_host is None
            assert await _server_side(server) == [None]
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_host_of() -> None:
    assert host_of(("127.0.0.1", 5)) == "127.0.0.1"
    assert host_of(("::ffff:10.1.2.3", 5, 0, 0)) == "10.1.2.3"
    assert host_of(("fe80::1%eth0", 5, 0, 2)) == "fe80::1"
    assert host_of(("2001:db8::1", 5, 0, 0)) == "2001:db8::1"
    assert host_of("/tmp/sock") is None
    assert host_of(("not an address", 1)) is None
