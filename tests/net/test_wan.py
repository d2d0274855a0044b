"""QUIC and TCP across an emulated WAN: 20 ms RTT, 1% loss each way (shared/tools/wan_emu.py).

Needs root, /dev/net/tun and iproute2; skips with the reason otherwise. The emulator's
namespace names are fixed (qw_a, qw_b), so runs are serialised with a lock file.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]
WAN_EMU = Path(os.environ.get("PYMESH_WAN_EMU", ROOT.parent / "shared" / "tools" / "wan_emu.py"))
LOCK = Path("/tmp/pymesh-wan-emu.lock")
SERVER_IP = "10.77.0.2"


def _skip_reason() -> str | None:
    if not WAN_EMU.exists():
        return f"WAN emulator not found at {WAN_EMU} (set PYMESH_WAN_EMU)"
    if os.geteuid() != 0:
        return "the WAN emulator needs root to create network namespaces"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun on this machine"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    return None


@pytest.fixture(scope="module")
def wan() -> Iterator[None]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    with open(LOCK, "w") as lock:
        deadline = time.monotonic() + 60
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.skip(f"another test holds the WAN emulator ({LOCK}) for over 60 s")
                time.sleep(0.5)
        emu = None
        err = ""
        for attempt in range(3):  # namespace teardown of a previous run is asynchronous: retry
            emu = subprocess.Popen([sys.executable, str(WAN_EMU), "--delay-ms", "10", "--loss", "0.01",
                                    "--seconds", "150"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert emu.stdout is not None
            if "READY" in emu.stdout.readline():
                break
            emu.kill()
            _, err = emu.communicate(timeout=10)
            emu = None
            time.sleep(1.0 + attempt)
        if emu is None:
            pytest.skip(f"could not create the emulated WAN (namespaces/TUN): {err.strip()[-300:]}")
        try:
            yield
        finally:
            emu.terminate()
            try:
                emu.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                emu.kill()


def _netns(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, *args]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport,cc", [("quic", "reno"), ("quic", "pymesh-delay"), ("tcp", "-")])
def test_rpc_over_lossy_wan(wan: None, transport: str, cc: str) -> None:
    server = subprocess.Popen(_netns("qw_b", "-m", "tests.net.echo_server", "--transport", transport,
                                     "--host", SERVER_IP, "--packet-size", "1200", "--idle", "20",
                                     "--cc", cc if cc != "-" else "reno"),
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        ready = server.stdout.readline().split()
        assert ready and ready[0] == "READY", f"server in qw_b did not start: {ready}"
        out = subprocess.run(_netns("qw_a", "-m", "tests.net.wan_client", "--transport", transport,
                                    "--host", SERVER_IP, "--port", ready[1], "--peer", ready[2],
                                    "--cc", cc if cc != "-" else "reno",
                                    # Reno crawls at ~0.5 MB/s here: send it less to stay quick.
                                    "--bulk-calls", "1" if cc == "reno" else "4"),
                             cwd=ROOT, capture_output=True, text=True, timeout=90)
        assert out.returncode == 0, out.stderr[-3000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["echo_ok"] == [0, 1000, 8192, 65536, 262144]
        assert result["mb_per_s"] > 0
        print(f"{transport} ({cc}) over 20 ms RTT / 1% loss: {result['mb_per_s']:.2f} MB/s, {result['seconds']:.1f} s")
    finally:
        server.kill()
        server.wait()
