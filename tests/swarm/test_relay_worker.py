"""``pymesh worker --relay`` on loopback: a worker told it is behind NAT (``--reachability nat``)
finds the relaying worker through the DHT, reserves there, and clients reach it through it."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.swarm.conftest import LocalProcs, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def relay_swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalProcs]:
    procs = LocalProcs(tmp_path_factory.mktemp("relay-swarm"))
    try:
        procs.start_bootstrap()
        relayer = procs.start_worker("--layers", "0-9", "--relay", name="relayer")
        wait_ready([relayer])
        natted = procs.start_worker("--layers", "10-19", "--reachability", "nat", name="natted")
        wait_ready([natted])
        procs.workers = [relayer, natted]  # type: ignore[attr-defined]
        yield procs
    finally:
        procs.stop_all()


def test_a_worker_relays_for_one_behind_nat(relay_swarm: LocalProcs) -> None:
    relayer, natted = relay_swarm.workers  # type: ignore[attr-defined]
    text = natted.text()
    assert f"behind NAT: reachable via 127.0.0.1:{relayer.port}" in text, text[-3000:]
    assert "relaying for peers behind NAT on TCP" in relayer.text()
    out = relay_swarm.client_json("--chain", "0-19", "--rounds", "3", "--hidden-size", "256")
    assert [(h["start"], h["stop"]) for h in out["route"]] == [(0, 10), (10, 20)]
    assert f"to {natted.peer_id[:10]} open" in relayer.text()     # the client's circuit went through it
