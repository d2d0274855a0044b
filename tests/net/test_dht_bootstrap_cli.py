"""`pymesh bootstrap` as a real process: output, no torch, answers KRPC, clean SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pymesh.proto import krpc
from pymesh.proto.addr import parse_addr
from pymesh.proto.identity import Identity


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(60)
def test_bootstrap_process(tmp_path: Path) -> None:
    port = free_udp_port()
    key = tmp_path / "boot.key"
    env = dict(os.environ, PYMESH_REPORT_MODULES="1", PYMESH_HOME=str(tmp_path))
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pymesh", "bootstrap", "--port", str(port), "--host", "127.0.0.1",
         "--identity", str(key)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().strip() for _ in range(4)]
        ready = time.monotonic() - started
        print(f"\nbootstrap ready after {ready:.2f}s: {lines}")
        fields = dict(line.split(": ", 1) for line in lines)
        assert fields["torch imported"] == "False"
        ident = Identity.load(key)
        assert fields["peer id"] == ident.peer_id.to_text()
        assert fields["bootstrap address"] == f"127.0.0.1:{port}"
        addr = parse_addr(fields["bootstrap multiaddr"])
        assert (addr.host, addr.port, addr.peer_id) == ("127.0.0.1", port, ident.peer_id)
        # It answers KRPC with the node ID derived from its identity.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2.0)
            s.sendto(krpc.encode_query(b"aa", b"ping", {b"id": b"\x01" * 20}), ("127.0.0.1", port))
            msg = krpc.decode_message_untrusted(s.recv(2048))
        assert isinstance(msg, krpc.Response) and msg.sender_id == ident.node_id
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert "shutting down" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
