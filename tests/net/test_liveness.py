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
