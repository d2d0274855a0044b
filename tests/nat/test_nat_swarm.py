"""A swarm across emulated NATs (network namespaces + nftables, tests/nat/netns.py).

Public segment: the bootstrap node, two relays (`pymesh relay`) and a public client host.
Homes: alice and bob behind endpoint-independent-mapping NATs, carol behind a symmetric NAT,
dave (a client) behind an EIM NAT. Workers serve a tiny 6-block model over QUIC with
``--reachability auto``: each learns by dial-back that it is behind NAT, reserves at both
relays and says so in its record. Cases (issue 16):

(a) EIM NATs: the client's hops and the worker-to-worker push are hole-punched, direct;
(b) a worker behind a symmetric NAT: its hop runs through a relay;
(c) the client itself behind NAT;
(d) the relay carrying a hop killed mid-generation: the session recovers through the other one;
and a public worker bound to 0.0.0.0 finds itself reachable, announces the address the
dial-back checkers saw and is dialed directly.

Each generates greedily and must equal the single-process run (tests/swarm's reference).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from pymesh.bench.nat_swarm import SwarmProcs
from tests.nat.conftest import require_netns
from tests.nat.netns import Topology
from tests.swarm.conftest import FAST_ENV, assert_same_tokens, reference_run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPT = "Once upon a time"
CLIENT = str(Path(__file__).with_name("nat_client.py"))
BOOT_PORT, RELAY_PORT, WORKER_PORT = 9000, 9100, 9200


class NatSwarm(SwarmProcs):
    """The bench's process set (start, wait_log, stop in the namespaces) with the tiny model."""

    def __init__(self, topo: Topology, root: Path, model: Path) -> None:
        super().__init__(topo, root)
        self.model = model
        self.peers: dict[str, str] = {}
        self.env = {**os.environ, **FAST_ENV, "PYMESH_HOME": str(root / "home"), "PYTHONUNBUFFERED": "1"}
        self.boot = f"{topo.ip('bootstrap')}:{BOOT_PORT}"

    def start_worker(self, name: str, host: str, layers: str, *, transport: str = "quic",
                     port: int = WORKER_PORT) -> str:
        self.start(name, host, "worker", "--bootstrap", self.boot, "--host", "0.0.0.0", "--port", str(port),
                   "--identity", str(self.root / f"{name}.key"), "--model-path", str(self.model), "--layers", layers,
                   "--transport", transport)
        text = self.wait_log(name, "Worker bootstrapped")
        m = re.search(r"worker ([a-z2-7]{52}): transport", text)
        assert m is not None
        return m.group(1)

    def generate(self, host: str, n: int, *extra: str) -> dict[str, Any]:
        p = self.topo.popen(host, [sys.executable, CLIENT, self.boot, str(self.model), PROMPT, str(n), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env)
        stdout, stderr = p.communicate(timeout=180)
        (self.root / f"client-{time.monotonic():.0f}.log").write_text(stderr)
        assert p.returncode == 0, f"client failed ({p.returncode}):\n{stderr[-6000:]}"
        out: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
        return out


@pytest.fixture(scope="module")
def tiny6_nat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny6nat"), num_hidden_layers=6, name="tiny6")


@pytest.fixture(scope="module")
def nat_swarm(tmp_path_factory: pytest.TempPathFactory, tiny6_nat: Path) -> Iterator[NatSwarm]:
    require_netns()
    with Topology() as topo:
        for name in ("bootstrap", "relay1", "relay2", "pubclient", "pubworker"):
            topo.add_public_host(name)
        topo.add_home("alice", nat="eim")
        topo.add_home("bob", nat="eim")
        topo.add_home("carol", nat="symmetric")
        topo.add_home("dave", nat="eim")
        swarm = NatSwarm(topo, tmp_path_factory.mktemp("nat-swarm"), tiny6_nat)
        try:
            swarm.start("bootstrap", "bootstrap", "bootstrap", "--host", topo.ip("bootstrap"), "--port", str(BOOT_PORT),
                        "--identity", str(swarm.root / "boot.key"))
            swarm.wait_log("bootstrap", "bootstrap address")
            for r in ("relay1", "relay2"):
                swarm.start(r, r, "relay", "--bootstrap", swarm.boot, "--host", topo.ip(r), "--port", str(RELAY_PORT),
                            "--identity", str(swarm.root / f"{r}.key"))
                swarm.wait_log(r, "relay ")
            yield swarm
        finally:
            for name in list(swarm.procs)[::-1]:
                swarm.stop(name)


def _hop_paths(out: dict[str, Any]) -> dict[tuple[int, int], str]:
    return {(h["start"], h["stop"]): h.get("path") for h in out["route"]}


def test_a_eim_nats_hole_punch_and_the_route_runs_direct(nat_swarm: NatSwarm, tiny6_nat: Path) -> None:
    a = nat_swarm.start_worker("A", "alice", "0-2")
    b = nat_swarm.start_worker("B", "bob", "3-5")
    for w in ("A", "B"):
        text = nat_swarm.wait_log(w, "behind NAT: reachable via")
        assert "hole punching at" in text, text[-3000:]
    n = 24
    ref, gaps = reference_run(tiny6_nat, PROMPT, n)
    out = nat_swarm.generate("pubclient", n)
    assert_same_tokens(out["tokens"], ref, gaps, "swarm across EIM NATs")
    assert _hop_paths(out) == {(0, 3): "punched", (3, 6): "punched"}, out["route"]
    # the worker-to-worker push from A to B was hole-punched too
    nat_swarm.wait_log("A", f"hole punching to {b[:8]}", timeout=10)
    assert "opened a direct QUIC path" in nat_swarm.log("A").read_text()
    assert a != b


def test_c_a_client_behind_nat(nat_swarm: NatSwarm, tiny6_nat: Path) -> None:
    if "A" not in nat_swarm.procs:
        nat_swarm.start_worker("A", "alice", "0-2")
    if "B" not in nat_swarm.procs:
        nat_swarm.start_worker("B", "bob", "3-5")
    n = 24
    ref, gaps = reference_run(tiny6_nat, PROMPT, n)
    out = nat_swarm.generate("dave", n)
    assert_same_tokens(out["tokens"], ref, gaps, "a client behind NAT")
    assert set(_hop_paths(out).values()) <= {"punched", "relayed"}


def test_b_symmetric_nat_runs_through_a_relay(nat_swarm: NatSwarm, tiny6_nat: Path) -> None:
    nat_swarm.stop("B")
    if "A" not in nat_swarm.procs:
        nat_swarm.start_worker("A", "alice", "0-2")
    nat_swarm.peers["C"] = nat_swarm.start_worker("C", "carol", "3-5")
    text = nat_swarm.wait_log("C", "behind NAT: reachable via")
    assert "hole punching at" not in text.split("behind NAT: reachable via", 1)[1].splitlines()[0]
    n = 24
    ref, gaps = reference_run(tiny6_nat, PROMPT, n)
    time.sleep(2)   # B's offline record reaches the DHT
    out = nat_swarm.generate("pubclient", n)
    assert_same_tokens(out["tokens"], ref, gaps, "a worker behind a symmetric NAT")
    assert _hop_paths(out)[(3, 6)] == "relayed", out["route"]


def test_d_relay_killed_mid_generation_recovers_with_identical_tokens(nat_swarm: NatSwarm, tiny6_nat: Path) -> None:
    if "C" not in nat_swarm.procs:
        nat_swarm.stop("B")
        nat_swarm.peers["C"] = nat_swarm.start_worker("C", "carol", "3-5")
    if "A" not in nat_swarm.procs:
        nat_swarm.start_worker("A", "alice", "0-2")
    for r in ("relay1", "relay2"):   # forget circuits earlier tests opened (the relays append)
        nat_swarm.log(r).write_text("")
    n = 40
    ref, gaps = reference_run(tiny6_nat, PROMPT, n)
    assert len(ref) > 10
    victims = ",".join(f"{nat_swarm.log(r)}:{nat_swarm.procs[r].pid}" for r in ("relay1", "relay2"))
    out = nat_swarm.generate("pubclient", n, "--kill-after", "6", "--kill", victims,
                             "--kill-target", nat_swarm.peers["C"][:10])
    assert out["killed"] is not None, "no relay carried a circuit when the kill was due"
    assert_same_tokens(out["tokens"], ref, gaps, "generation across a killed relay")
    assert out["recoveries"], "killing the relay in use should have forced a recovery"
    assert _hop_paths(out)[(3, 6)] == "relayed"


def test_a_public_worker_on_a_wildcard_address_is_dialed_directly(nat_swarm: NatSwarm, tiny6_nat: Path) -> None:
    nat_swarm.stop("A")
    if "C" not in nat_swarm.procs:
        nat_swarm.stop("B")
        nat_swarm.start_worker("C", "carol", "3-5")
    nat_swarm.start_worker("P", "pubworker", "0-2")
    assert "reachability: directly reachable" in nat_swarm.log("P").read_text()
    n = 24
    ref, gaps = reference_run(tiny6_nat, PROMPT, n)
    time.sleep(2)   # A's offline record reaches the DHT
    out = nat_swarm.generate("dave", n)
    assert_same_tokens(out["tokens"], ref, gaps, "a public worker and a relayed one, client behind NAT")
    assert _hop_paths(out) == {(0, 3): "direct", (3, 6): "relayed"}, out["route"]


def test_tcp_only_workers_behind_nat_are_relayed_end_to_end(nat_swarm: NatSwarm, tiny6_nat: Path) -> None:
    """No QUIC, no hole punching: every hop, the worker-to-worker push included, is a circuit."""
    for name, host, layers in (("TA", "alice", "0-2"), ("TB", "bob", "3-5")):
        nat_swarm.start_worker(name, host, layers, transport="tcp", port=WORKER_PORT + 100)
        line = nat_swarm.wait_log(name, "behind NAT: reachable via").split("behind NAT: reachable via", 1)[1]
        assert "hole punching" not in line.splitlines()[0]
    n = 24
    ref, gaps = reference_run(tiny6_nat, PROMPT, n)
    out = nat_swarm.generate("dave", n, "--transport", "tcp")
    assert_same_tokens(out["tokens"], ref, gaps, "TCP-only workers behind NAT")
    assert _hop_paths(out) == {(0, 3): "relayed", (3, 6): "relayed"}, out["route"]

