"""Fixtures for tests that need emulated NATs (tests/nat/netns.py).

- ``nat_topology``: a fresh, empty, open `Topology` per test (public bridge only); add hosts with
  ``nat_topology.add_public_host(name)`` / ``nat_topology.add_home(name, nat=...)``.
- ``standard_nat_topology``: one per module, shared by its tests: public hosts bootstrap, relay1,
  relay2 and homes alice (eim), bob (eim), carol (symmetric). Use ``topo.free_port()`` for each
  socket so one test's conntrack entries cannot match another's traffic.
- ``serve``: start tests/nat/udp_tool.py's address-echo server on a host (see `Server`).

Both topology fixtures skip, with the reason, where namespaces or nftables cannot be used
(not root, no `ip`, no `nft`: scripts/setup.sh installs nftables when run as root).
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.nat.netns import Host, Topology, netns_available, standard_topology

UDP_TOOL = str(Path(__file__).with_name("udp_tool.py"))


def require_netns() -> None:
    ok, why = netns_available()
    if not ok:
        pytest.skip(f"NAT topology tests need network namespaces and nftables: {why}")


@pytest.fixture
def nat_topology() -> Iterator[Topology]:
    require_netns()
    with Topology() as topo:
        yield topo


@pytest.fixture(scope="module")
def standard_nat_topology() -> Iterator[Topology]:
    require_netns()
    with standard_topology() as topo:
        yield topo


def read_json_line(proc: subprocess.Popen[str], timeout: float = 10.0) -> dict[str, Any]:
    """The next JSON line of `proc`'s stdout; AssertionError if none comes within `timeout`."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        _, err = proc.communicate(timeout=5)
        raise AssertionError(f"no output from {proc.args!r} within {timeout} s; stderr: {err!r}")
    obj: dict[str, Any] = json.loads(line)
    return obj


def tool(topo: Topology, host: Host | str, *args: str, timeout: float = 15.0) -> dict[str, Any]:
    """Run udp_tool.py in `host`'s namespace to completion; its last JSON line."""
    out = topo.run(host, [sys.executable, UDP_TOOL, *args], timeout=timeout).stdout
    obj: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return obj


def tool_popen(topo: Topology, host: Host | str, *args: str) -> subprocess.Popen[str]:
    return topo.popen(host, [sys.executable, UDP_TOOL, *args], stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@dataclass
class Server:
    """udp_tool.py serve on `host`: answers UDP `udp` and TCP `tcp` with the sender's address."""

    proc: subprocess.Popen[str]
    host: Host
    udp: int
    tcp: int

    def udp_addr(self) -> str:
        return f"{self.host.ip}:{self.udp}"

    def tcp_addr(self) -> str:
        return f"{self.host.ip}:{self.tcp}"

    def events(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Stop the server; the datagrams and connections it saw."""
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=timeout)
        return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(topo: Topology, host: Host | str, seconds: float = 20.0) -> Server:
        h = topo.host(host)
        udp, tcp = topo.free_port(), topo.free_port()
        proc = tool_popen(topo, h, "serve", "--udp", str(udp), "--tcp", str(tcp), "--seconds", str(seconds))
        assert read_json_line(proc) == {"ready": True}
        srv = Server(proc, h, udp, tcp)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.communicate(timeout=5)
