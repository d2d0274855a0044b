"""A TCP push made after the peer's FIN reached this host, but before this node's reader ran,
fails instead of being accepted by the kernel and lost (the peer would answer with a reset)."""

from __future__ import annotations

import socket
import time

import pytest
import trio

from pymesh.errors import PeerUnavailable
from pymesh.net.tcp import TcpConnection
from tests.net.helpers import node_pair

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("transport", ["tcp", "tcp-plain"])
def test_push_after_the_peers_fin_fails(transport: str) -> None:
    async def main() -> None:
        got: list[str] = []

        async def on_push(conn: object, meta: dict[str, object], tensors: list[object]) -> None:
            got.append(str(meta.get("n")))

        async with node_pair(transport) as (server, client, conn):
            server.on_push("t", on_push)  # type: ignore[arg-type]
            await conn.push("t", {"n": 1})
            for _ in range(100):
                if got and server.connections():
                    break
                await trio.sleep(0.01)
            assert got == ["1"]
            (theirs,) = server.connections()
            assert isinstance(theirs, TcpConnection) and isinstance(conn, TcpConnection)
            theirs._raw.sock.shutdown(socket.SHUT_WR)   # type: ignore[union-attr]  # the peer's FIN, now
            time.sleep(0.05)                           # it arrives; no trio checkpoint: our reader has not run
            assert not conn.closed
            with pytest.raises(PeerUnavailable, match="closed"):
                await conn.push("t", {"n": 2})

    trio.run(main)
