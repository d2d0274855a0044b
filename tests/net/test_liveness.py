"""A peer that disappears (stopped or killed process) is detected within idle_timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from pymesh.errors import PeerUnavailable
from pymesh.net.rpc import RpcNode, TransportConfig
from pymesh.proto.identity import Identity, PeerID

ROOT = Path(__file__).resolve().parents[2]
IDLE = 2.0


def start_server(transport: str) -> tuple[subprocess.Popen[str], int, PeerID]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.net.echo_server", "--transport", transport, "--idle", str(IDLE)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert line and line[0] == "READY", f"server did not start: {line}"
    return proc, int(line[1]), PeerID.from_text(line[2])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["stop", "kill"])
def test_vanished_peer_fails_pending_call_within_idle_timeout(transport: str, how: str) -> None:
    proc, port, peer = start_server(transport)
    try:
        async def main() -> None:
            cfg = TransportConfig(idle_timeout=IDLE, connect_timeout=10)
            async with RpcNode(Identity.generate(), transport=transport, config=cfg) as node:
                conn = await node.connect("127.0.0.1", port, peer)
                meta, _ = await conn.call("echo", {"a": 1}, timeout=10)
                assert meta == {"a": 1}
                os.kill(proc.pid, signal.SIGSTOP if how == "stop" else signal.SIGKILL)
                start = time.monotonic()
                with pytest.raises(PeerUnavailable):
                    await conn.call("echo", {"b": 2}, timeout=IDLE * 5)
                elapsed = time.monotonic() - start
                # Detected by the transport (not the call's own 10 s timeout), within idle_timeout
                # plus scheduling slack on a loaded machine.
                assert elapsed < IDLE + 1.0, f"took {elapsed:.2f}s to notice the peer was gone"
                assert conn.closed
        trio.run(main)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.timeout(30)
def test_quiet_connection_survives_mismatched_idle_timeouts(transport: str) -> None:
    """A client with a short idle_timeout keeps an idle connection to a server configured
    with a long one: keep-alives flow both ways at the faster side's pace."""
    from tests.net.helpers import fast_config, node_pair

    async def main() -> None:
        async with node_pair(transport, server_config=fast_config(idle_timeout=30.0),
                             client_config=fast_config(idle_timeout=1.0)) as (server, client, conn):
            async def echo(ctx, meta, tensors):  # type: ignore[no-untyped-def]
                return meta, tensors
            server.register("echo", echo)
            await trio.sleep(3.0)  # three client idle timeouts with no application traffic
            assert not conn.closed, conn.close_reason
            meta, _ = await conn.call("echo", {"alive": 1}, timeout=5)
            assert meta == {"alive": 1}
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))  # virtual time: no real waits
