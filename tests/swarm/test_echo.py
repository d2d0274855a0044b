"""Echo-mode swarm (no weights): the network test, routing errors, sessions, discovery.

One bootstrap and three echo workers (layers 0-9, 10-19, 20-29) serve the module.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import trio

from tests.swarm.conftest import LocalProcs, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def echo_swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalProcs]:
    # Announced speed 10 tokens/s per span (100 ms per hop): the refusal test's "fast" worker
    # then wins the route by a margin no RTT jitter can undo.
    procs = LocalProcs(tmp_path_factory.mktemp("echo-swarm"), PYMESH_SESSION_IDLE="6", PYMESH_THROUGHPUT="10")
    try:
        procs.start_bootstrap()
        workers = [procs.start_worker("--layers", f"{a}-{a + 9}", name=f"echo{a}") for a in (0, 10, 20)]
        wait_ready(workers)
        procs.workers = workers  # type: ignore[attr-defined]
        yield procs
    finally:
        procs.stop_all()


def _with_swarm(procs: LocalProcs, fn: Any, model: str = "echo") -> Any:
    """Run ``await fn(swarm)`` with a client-side Swarm joined to the test swarm."""
    from pymesh.client.swarm import Swarm

    async def main() -> Any:
        async with Swarm([procs.bootstrap_addr], model, settings=procs.settings) as swarm:
            return await fn(swarm)

    return trio.run(main)


def test_echo_chain_end_to_end(echo_swarm: LocalProcs) -> None:
    chain = ",".join(str(i) for i in range(30))
    out = echo_swarm.client_json("--chain", chain, "--rounds", "5", "--hidden-size", "1024")
    assert [(h["start"], h["stop"]) for h in out["route"]] == [(0, 10), (10, 20), (20, 30)]
    peers = {w.peer_id for w in echo_swarm.workers}  # type: ignore[attr-defined]
    assert {h["peer"] for h in out["route"]} == peers
    assert len(out["hop_ms"]) == 3 and all(ms > 0 for ms in out["hop_ms"])
    assert out["megabytes_per_s"] > 0
    # The human-readable report, with the seed's log lines.
    res = echo_swarm.client("--chain", "0-29", "--rounds", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "round trip" in res.stdout and "layers 10-19" in res.stdout
    assert "Client: found provider for layer 0:" in res.stderr
    assert "Client: resolved chain: [" in res.stderr
    assert "Client: sending forward pass to" in res.stderr
    assert "Client: received response for request_id 1" in res.stderr


def test_layer_without_provider_is_a_clear_error(echo_swarm: LocalProcs) -> None:
    t0 = time.monotonic()
    res = echo_swarm.client("--chain", "0-39", "--rounds", "1", PYMESH_DISCOVERY_TIMEOUT="3", timeout=60)
    elapsed = time.monotonic() - t0
    assert res.returncode == 1
    assert "no worker serves layer 30" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert elapsed < 45  # bounded: discovery gives up after its timeout, never hangs


def test_decode_inputs_come_from_the_previous_worker(echo_swarm: LocalProcs) -> None:
    """The client sends each step to the first worker only; the others get it from their predecessor."""
    import torch

    from pymesh.client.session import InferenceSession
    from pymesh.proto import session_wire as wire

    steps = 6

    async def run(swarm: Any) -> list[dict[str, Any]]:
        async with InferenceSession(swarm, 0, 30, max_tokens=32) as s:
            for i in range(steps):
                x = torch.full((1, 1 if i else 4, 64), float(i))
                assert torch.equal(await s.step(x), x)
            stats = []
            for hop in s.route:
                meta, _ = await swarm.call(hop, wire.STATS, {"sid": s.sid})
                stats.append(meta)
            return stats

    stats = _with_swarm(echo_swarm, run)
    assert [st["s_steps"] for st in stats] == [steps] * 3
    assert stats[0]["s_from_client"] == steps and stats[0]["s_from_peer"] == 0
    for st in stats[1:]:
        assert st["s_from_client"] == 0, "a worker after the first got its input from the client"
        assert st["s_from_peer"] == steps


def test_idle_session_expires_and_frees_its_cache(echo_swarm: LocalProcs) -> None:
    import torch

    from pymesh.client.session import InferenceSession
    from pymesh.proto import session_wire as wire

    async def run(swarm: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        s = InferenceSession(swarm, 0, 30, max_tokens=100)
        await s.__aenter__()
        await s.step(torch.zeros(1, 2, 8))
        hop = s.route[1]
        during, _ = await swarm.call(hop, wire.STATS, {"sid": s.sid})
        await trio.sleep(8.5)  # idle timeout of the module's workers is 6 s
        after, _ = await swarm.call(hop, wire.STATS, {"sid": s.sid})
        swarm.sinks.pop(s.sid, None)
        return during, after

    during, after = _with_swarm(echo_swarm, run)
    assert during["s_steps"] == 1 and during["free"] <= during["total"] - 100
    assert "s_steps" not in after, "the idle session is still there"
    assert after["free"] == after["total"] and after["expired"] >= 1


def test_refused_session_routes_through_another_worker(echo_swarm: LocalProcs) -> None:
    """A worker that looks fastest but has no room refuses; the client goes elsewhere."""
    import torch

    from pymesh.client.session import InferenceSession
    from pymesh.proto import session_wire as wire

    small = echo_swarm.start_worker("--layers", "0-9", "--cache-tokens", "64", name="small",
                                    PYMESH_THROUGHPUT="100000")
    wait_ready([small])

    async def run(swarm: Any) -> tuple[list[str], list[str], dict[str, Any]]:
        # Wait until discovery sees the small worker.
        for _ in range(50):
            recs = await swarm.records()
            if any(str(r.peer_id) == small.peer_id for r in recs):
                break
            await trio.sleep(0.2)
        async with InferenceSession(swarm, 0, 30, max_tokens=50, trust_record_cache=False) as a:
            await a.step(torch.zeros(1, 1, 8))
            async with InferenceSession(swarm, 0, 30, max_tokens=50, trust_record_cache=False) as b:
                await b.step(torch.zeros(1, 1, 8))
                route_a = [str(o.peer) for o in a.route]
                route_b = [str(o.peer) for o in b.route]
                meta, _ = await swarm.call(a.route[0], wire.STATS, {})
        return route_a, route_b, meta

    try:
        route_a, route_b, stats = _with_swarm(echo_swarm, run)
    finally:
        small.stop()
    assert route_a[0] == small.peer_id, "the fastest-announced worker should take the first session"
    assert route_b[0] != small.peer_id and route_b[0] == echo_swarm.workers[0].peer_id  # type: ignore[attr-defined]
    assert stats["refused"] >= 1


def _providers(procs: LocalProcs, block: int) -> set[str]:
    async def run(swarm: Any) -> set[str]:
        return {str(r.peer_id) for r in await swarm.dht.find_block_providers("echo", block)}

    return _with_swarm(procs, run)


def _wait_providers(procs: LocalProcs, block: int, want: bool, peer: str, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if (peer in _providers(procs, block)) == want:
            return time.monotonic() - t0
        time.sleep(0.5)
    raise AssertionError(f"worker {peer[:10]} {'never appeared' if want else 'still listed'} after {timeout} s")


def test_worker_leaves_and_comes_back(echo_swarm: LocalProcs, tmp_path: Path) -> None:
    ident = str(tmp_path / "extra.key")
    w = echo_swarm.start_worker("--layers", "30-31", name="extra", identity=ident)
    wait_ready([w])
    _wait_providers(echo_swarm, 30, True, w.peer_id or "", 15)
    # Clean exit: announces offline, exit status 0, gone from discovery at once.
    assert w.stop() == 0
    assert "announcing offline" in w.text()
    _wait_providers(echo_swarm, 30, False, w.peer_id or "", 10)
    # Restarted with the same identity: the same peer ID comes back.
    w2 = echo_swarm.start_worker("--layers", "30-31", name="extra2", identity=ident)
    wait_ready([w2])
    assert w2.peer_id == w.peer_id
    _wait_providers(echo_swarm, 30, True, w.peer_id or "", 15)
    # Killed without a goodbye: gone once its record expires (TTL 5 s in these tests).
    w2.signal(signal.SIGKILL)
    gone_after = _wait_providers(echo_swarm, 30, False, w.peer_id or "", 20)
    assert gone_after <= 20
