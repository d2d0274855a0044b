"""A worker asked for any port (--port 0) whose transport port + 1 is taken still starts."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import trio

from pymesh.net import rpc
from pymesh.net.dht import DHTNode
from pymesh.proto.identity import Identity
from pymesh.settings import Settings, WorkerSettings
from pymesh.worker.server import Worker, WorkerOptions

pytestmark = pytest.mark.timeout(60)


def _free_pair() -> tuple[int, socket.socket]:
    """A port N free for TCP and UDP, and a UDP socket holding N + 1."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            n = probe.getsockname()[1]
        blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            blocker.bind(("127.0.0.1", n + 1))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.bind(("127.0.0.1", n))
            return n, blocker
        except OSError:
            blocker.close()
    raise RuntimeError("no free pair of ports found")


def test_dht_moves_when_port_plus_one_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    n, blocker = _free_pair()
    real = rpc.RpcNode.listen

    async def listen(self: Any, host: str, port: int) -> int:  # the "free" port the OS would pick
        return await real(self, host, n if port == 0 else port)

    monkeypatch.setattr(rpc.RpcNode, "listen", listen)
    settings = Settings(worker=WorkerSettings(skip_throughput=True, throughput=10.0), dht_timeout=0.5)

    got: list[int] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery, \
                DHTNode(Identity.generate(), host="127.0.0.1", port=0, config=settings.dht_config()) as boot:
            w = Worker(WorkerOptions([f"127.0.0.1:{boot.port}"], layers=(0, 2), host="127.0.0.1", transport="tcp",
                                     cache_tokens=64, settings=settings))
            worker = await nursery.start(w.serve)
            got.extend((worker.port, worker._dht.port))
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        blocker.close()
    port, dht_port = got
    assert port == n and dht_port not in (0, n + 1)
