"""A tiny random model over TCP and over QUIC, and recovery from a worker killed mid-generation.

Workers serve both transports: blocks 0-1, 2-3 (twice: an active one and a spare) and 4-5.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Iterator

import pytest

from tests.swarm.conftest import LocalProcs, assert_same_tokens, generate_killing, reference_run, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def tiny_swarm(tmp_path_factory: pytest.TempPathFactory, tiny6_dir: Path) -> Iterator[LocalProcs]:
    procs = LocalProcs(tmp_path_factory.mktemp("tiny-swarm"), PYMESH_STEP_TIMEOUT="30")
    try:
        procs.start_bootstrap()
        spans = [(0, 1), (2, 3), (2, 3), (4, 5)]
        workers = [procs.start_worker("--layers", f"{a}-{b}", "--model-path", str(tiny6_dir), "--transport", "both",
                                      name=f"tiny{a}{b}-{i}") for i, (a, b) in enumerate(spans)]
        wait_ready(workers, timeout=120)
        procs.workers = workers  # type: ignore[attr-defined]
        yield procs
    finally:
        procs.stop_all()


@pytest.mark.parametrize("transport", ["tcp", "quic"])
def test_tiny_model_over_each_transport(tiny_swarm: LocalProcs, tiny6_dir: Path, transport: str) -> None:
    n = 32
    ref, gaps = reference_run(tiny6_dir, PROMPT, n)
    out = tiny_swarm.client_json("--model-path", str(tiny6_dir), "--prompt", PROMPT, "--max-tokens", str(n),
                                 "--transport", transport)
    assert_same_tokens(out["tokens"], ref, gaps, f"tiny model over {transport}")
    assert [(h["start"], h["stop"]) for h in out["route"]] == [(0, 2), (2, 4), (4, 6)]


def test_chain_naming_missing_layers_fails_at_once(tiny_swarm: LocalProcs, tiny6_dir: Path) -> None:
    """The seed's example chain lists layers 0-23; this model has 6: an immediate, named error."""
    import time

    chain = ",".join(str(i) for i in range(24))
    t0 = time.monotonic()
    res = tiny_swarm.client("--model-path", str(tiny6_dir), "--prompt", "hi", "--chain", chain)
    assert res.returncode == 1
    assert "layers that do not exist: 6-23" in res.stderr and "0-5" in res.stderr
    assert "Client: resolved chain" not in res.stderr  # refused before any network work
    assert time.monotonic() - t0 < 60
    ok = tiny_swarm.client_json("--model-path", str(tiny6_dir), "--prompt", "hi", "--chain", "0-1,2-5",
                                "--max-tokens", "3")
    assert len(ok["tokens"]) >= 1


def test_killed_worker_is_replaced_and_output_is_identical(tiny_swarm: LocalProcs, tiny6_dir: Path) -> None:
    n = 40
    ref, gaps = reference_run(tiny6_dir, PROMPT, n)
    assert len(ref) > 12
    workers = tiny_swarm.workers  # type: ignore[attr-defined]
    got, stats, active = generate_killing(tiny_swarm, tiny6_dir, PROMPT, n, after=6, start=2, workers=workers)
    assert_same_tokens(got, ref, gaps, "generation across a killed worker")
    assert len(stats.recoveries) >= 1, "the kill should have forced a recovery"
    new_mid = next(h["peer"] for h in stats.route if h["start"] == 2)
    assert new_mid != active, "the dead worker is still in the route"
    spare = next(w for w in workers if w.peer_id == new_mid)
    assert spare.alive()


def test_stalled_worker_is_routed_around(tiny_swarm: LocalProcs, tiny6_dir: Path) -> None:
    """A worker that stops answering (SIGSTOP) mid-generation: the client's liveness probe
    finds it, bans it and replays onto a spare; the ids do not change."""
    from pymesh.client.api import SwarmClient
    from pymesh.model.sampling import SamplingParams

    n = 24
    ref, gaps = reference_run(tiny6_dir, PROMPT, n)
    spare = tiny_swarm.start_worker("--layers", "4-5", "--model-path", str(tiny6_dir), "--transport", "both",
                                    name="tiny45-spare")
    wait_ready([spare], timeout=120)
    workers = [*tiny_swarm.workers, spare]  # type: ignore[attr-defined]
    got: list[int] = []
    stalled = None
    try:
        with SwarmClient([tiny_swarm.bootstrap_addr], tiny6_dir, settings=tiny_swarm.settings) as client:
            for token in client.generate(PROMPT, SamplingParams(max_new_tokens=n)):
                got.append(token)
                if len(got) == 4:
                    stats = client.last_stats
                    assert stats is not None
                    active = next(h["peer"] for h in stats.route if h["start"] == 4)
                    stalled = next(w for w in workers if w.peer_id == active)
                    stalled.signal(signal.SIGSTOP)
            stats = client.last_stats
    finally:
        if stalled is not None:
            stalled.signal(signal.SIGCONT)
    assert stats is not None and stalled is not None
    assert_same_tokens(got, ref, gaps, "generation across a stalled worker")
    # Found by the liveness probe (a step slower than PYMESH_PROBE_AFTER), long before the
    # module's 30 s step timeout.
    assert any(r["blamed"] == stalled.peer_id and "stopped answering" in r["why"] for r in stats.recoveries), \
        stats.recoveries
    assert next(h["peer"] for h in stats.route if h["start"] == 4) != stalled.peer_id


def test_first_worker_killed_over_tcp(tiny_swarm: LocalProcs, tiny6_dir: Path) -> None:
    """The first hop (the one the client feeds) dies; over TCP the loss is seen at once."""
    from pymesh.client.api import SwarmClient
    from pymesh.model.sampling import SamplingParams

    n = 20
    ref, gaps = reference_run(tiny6_dir, PROMPT, n)
    spare = tiny_swarm.start_worker("--layers", "0-1", "--model-path", str(tiny6_dir), "--transport", "both",
                                    name="tiny01-spare")
    wait_ready([spare], timeout=120)
    workers = [*tiny_swarm.workers, spare]  # type: ignore[attr-defined]
    got: list[int] = []
    with SwarmClient([tiny_swarm.bootstrap_addr], tiny6_dir, transport="tcp", settings=tiny_swarm.settings) as client:
        for token in client.generate(PROMPT, SamplingParams(max_new_tokens=n)):
            got.append(token)
            if len(got) == 5:
                stats = client.last_stats
                assert stats is not None
                active = stats.route[0]["peer"]
                victim = next(w for w in workers if w.peer_id == active)
                victim.signal(signal.SIGKILL)
                victim.popen.wait(10)
        stats = client.last_stats
    assert stats is not None
    assert_same_tokens(got, ref, gaps, "generation across a killed first worker (TCP)")
    assert len(stats.recoveries) >= 1
    assert stats.route[0]["peer"] != active


def test_batched_sessions_survive_a_killed_worker(tiny_swarm: LocalProcs, tiny6_dir: Path) -> None:
    """Three sessions of one client process step together (the workers batch them); the worker
    serving blocks 4-5 dies mid-generation: every session recovers on the spare and each one's
    tokens equal its single-process run."""
    import trio

    from pymesh.client.generation import ClientModel, GenerationStats, generate_tokens
    from pymesh.client.swarm import Swarm
    from pymesh.model.sampling import SamplingParams

    prompts = [PROMPT, "The weather today", "In a small village"]
    n = 24
    spare = tiny_swarm.start_worker("--layers", "4-5", "--model-path", str(tiny6_dir), "--transport", "both",
                                    name="tiny45-batch-spare")
    wait_ready([spare], timeout=120)
    # every worker this module started (earlier tests add spares; the route may use any of them)
    workers = [p for p in tiny_swarm.procs if p.peer_id is not None]
    model = ClientModel(tiny6_dir)
    got: dict[str, list[int]] = {p: [] for p in prompts}
    stats = {p: GenerationStats() for p in prompts}
    killed: list[str] = []
    exposed: list[str] = []

    async def one(swarm: Swarm, prompt: str) -> None:
        params = SamplingParams(max_new_tokens=n)
        async for token in generate_tokens(swarm, model, model.prompt_ids(prompt, False), params,
                                           stats=stats[prompt], ignore_eos=True):
            got[prompt].append(token)
            if prompt == PROMPT and len(got[prompt]) == 8 and not killed:
                active = next(h["peer"] for h in stats[prompt].route if h["start"] == 4)
                victim = next(w for w in workers if w.peer_id == active)
                victim.signal(signal.SIGKILL)
                killed.append(active)
                # which sessions still had steps to run on the victim (one may be done already)
                exposed.extend(q for q in prompts if len(got[q]) < n and any(
                    h["start"] == 4 and h["peer"] == active for h in stats[q].route))

    async def main() -> None:
        async with Swarm([tiny_swarm.bootstrap_addr], model.model_id, settings=tiny_swarm.settings) as swarm:
            async with trio.open_nursery() as nursery:
                for p in prompts:
                    nursery.start_soon(one, swarm, p)

    trio.run(main)
    assert killed, "the kill should have happened"
    for p in prompts:
        ref, gaps = reference_run(tiny6_dir, p, n)
        assert_same_tokens(got[p][:len(ref)], ref, gaps, f"{p!r} across a killed worker, batched with others")
        if p in exposed:
            assert next(h["peer"] for h in stats[p].route if h["start"] == 4) != killed[0], p
            assert len(stats[p].recoveries) >= 1, p
    assert PROMPT in exposed
