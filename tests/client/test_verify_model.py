"""Verified inference with real model math, in one process: a tiny random Llama (6 blocks)
served by in-process workers, the client generating with ``generate_tokens``.

- a worker corrupting every step is caught at its first step, before its output is used,
  and the answer equals the single-process ``generate``;
- one corrupting only some steps passes its first check, is caught later by a background
  check, and the generation is recomputed from the first wrong step: the final answer still
  equals ``generate`` (greedy);
- honest fp32 workers are never flagged with every hop-step checked over many sessions, and
  neither is a bf16 worker checked against fp32 ones.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from pathlib import Path
from typing import Any

import pytest
import trio

from pymesh.client.generation import ClientModel, GenerationStats, generate_tokens
from pymesh.client.swarm import Swarm
from pymesh.model.generate import generate
from pymesh.model.sampling import SamplingParams
from pymesh.net.dht import DHTNode
from pymesh.proto.identity import Identity
from pymesh.settings import ClientSettings, Settings, WorkerSettings
from pymesh.worker.server import Worker, WorkerOptions
from tests.model.tiny import make_tiny_model

pytestmark = pytest.mark.timeout(300)

SETTINGS = Settings(
    worker=WorkerSettings(skip_throughput=True, throughput=10.0, next_hop_timeout=5.0, step_wait=5.0),
    client=ClientSettings(discovery_timeout=10.0, step_timeout=20.0, probe_after=5.0, probe_timeout=3.0,
                          rpc_timeout=5.0),
    record_ttl=30.0, heartbeat=1.0, dht_timeout=0.5, transport_timeout=10.0,
)
PROMPTS = [[1, 2, 3, 4, 5], [17, 400, 9, 3000], [42] * 7, [5, 6, 7, 8, 9, 10, 11, 12]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("verify"), "llama", num_hidden_layers=6, name="tiny6v")


def liar(p: float, seed: int = 0) -> Settings:
    return dataclasses.replace(SETTINGS, worker=dataclasses.replace(
        SETTINGS.worker, test_faults=True, test_corrupt=p, test_corrupt_mode="noise", test_corrupt_seed=seed,
        throughput=10_000.0))  # announced as the fastest: routes choose it


Spec = tuple[tuple[int, int], str, Settings]


async def run(model_dir: Path, specs: list[Spec], prompts: list[list[int]], *, new: int, verify: str, rate: float,
              rewind: bool = True) -> dict[str, Any]:
    client_settings = dataclasses.replace(SETTINGS, client=dataclasses.replace(SETTINGS.client, verify=verify,
                                                                                verify_rate=rate))
    model = ClientModel(model_dir)
    out: dict[str, Any] = {"answers": [], "stats": []}
    async with trio.open_nursery() as nursery, \
            DHTNode(Identity.generate(), host="127.0.0.1", port=0, config=SETTINGS.dht_config()) as boot:
        bootstrap = [f"127.0.0.1:{boot.port}"]
        workers = []
        for (start, stop), dtype, settings in specs:
            w = Worker(WorkerOptions(bootstrap, layers=(start, stop), model_path=str(model_dir), dtype=dtype,
                                     host="127.0.0.1", transport="tcp", cache_tokens=512, settings=settings))
            workers.append(await nursery.start(w.serve))
        out["workers"] = workers
        async with Swarm(bootstrap, model.model_id, transport="tcp", settings=client_settings) as swarm:
            for ids in prompts:
                seen: list[int] = []
                stats = GenerationStats()

                def cut(n: int) -> None:
                    del seen[n:]

                async for t in generate_tokens(swarm, model, ids, SamplingParams(max_new_tokens=new), stats=stats,
                                               ignore_eos=True, rewind=cut if rewind else None):
                    seen.append(t)
                out["answers"].append(seen)
                out["stats"].append(stats)
            out["convicted"] = dict(swarm.convicted)
        nursery.cancel_scope.cancel()
    return out


def reference(model_dir: Path, ids: list[int], new: int) -> list[int]:
    return list(generate(model_dir, ids, params=SamplingParams(max_new_tokens=new)))


def honest(span: tuple[int, int], dtype: str = "float32") -> Spec:
    return (span, dtype, SETTINGS)


def test_a_worker_corrupting_every_step_never_gets_a_token_through(tiny: Path) -> None:
    specs = [honest((0, 3)), honest((0, 3)), ((3, 6), "float32", liar(1.0)), honest((3, 6)), honest((3, 6))]
    r = trio.run(functools.partial(run, tiny, specs, PROMPTS[:1], new=8, verify="sample", rate=0.1))
    bad = r["workers"][2].peer_id
    assert bad in r["convicted"]
    report = r["stats"][0].verification
    assert report.convicted[0]["first_bad_step"] == 0 and not report.recomputed
    assert r["answers"][0] == reference(tiny, PROMPTS[0], 8)


def test_checkers_downstream_of_a_convicted_worker_restart_their_shadows(tiny: Path) -> None:
    """The liar is in the middle. At step 0 every hop is checked at once, the last one with
    the liar's output as its input (the liar is not convicted yet): the last hop's checker
    computed step 0 from a tensor the recovery then replaces. Its shadow must start over;
    kept, it disagrees with the honest route at every later check and (a third provider
    siding with the route) an honest checker is convicted."""
    specs = [honest((0, 2)), ((2, 4), "float32", liar(1.0)), honest((2, 4)), honest((2, 4)),
             honest((4, 6)), honest((4, 6)), honest((4, 6))]
    r = trio.run(functools.partial(run, tiny, specs, PROMPTS[:1], new=8, verify="all", rate=1.0))
    report = r["stats"][0].verification
    assert list(r["convicted"]) == [r["workers"][1].peer_id], r["convicted"]
    assert report.mismatches == 1 and report.disagreements == [], (report.mismatches, report.disagreements)
    assert r["answers"][0] == reference(tiny, PROMPTS[0], 8)


def test_a_late_conviction_recomputes_from_the_first_wrong_step(tiny: Path) -> None:
    p = 0.3
    seed = next(s for s in range(1000) if random.Random(s).random() >= p)   # its first step is honest
    specs = [honest((0, 3)), honest((0, 3)), ((3, 6), "float32", liar(p, seed)), honest((3, 6)), honest((3, 6))]
    r = trio.run(functools.partial(run, tiny, specs, PROMPTS[:1], new=12, verify="sample", rate=1.0))
    assert r["workers"][2].peer_id in r["convicted"]
    report = r["stats"][0].verification
    assert report.convicted and report.convicted[0]["first_bad_step"] > 0
    assert r["answers"][0] == reference(tiny, PROMPTS[0], 12)
    assert r["stats"][0].tokens == r["answers"][0]
    if report.recomputed:   # the conviction came after the bad step's token was emitted
        assert all(isinstance(x["changed"], bool) for x in report.recomputed)


def test_a_late_conviction_mid_route_blames_nobody_downstream(tiny: Path) -> None:
    """The liar (30% of steps) is mid-route and convicted after its output was used; the
    hops after it computed on its output, and the recovery rewrites the stored boundary
    tensors. Checks still in flight for the condemned session must not judge that mixture:
    only the liar is convicted, no disagreement, and the recomputed answer equals generate."""
    p = 0.3
    seeds = [s for s in range(1000) if random.Random(s).random() >= p][:3]   # first step honest
    for seed in seeds:
        specs = [honest((0, 2)), ((2, 4), "float32", liar(p, seed)), honest((2, 4)), honest((2, 4)),
                 honest((4, 6)), honest((4, 6)), honest((4, 6))]
        r = trio.run(functools.partial(run, tiny, specs, PROMPTS[1:2], new=16, verify="sample", rate=1.0))
        report = r["stats"][0].verification
        assert list(r["convicted"]) == [r["workers"][1].peer_id], (seed, r["convicted"])
        assert report.disagreements == [], (seed, report.disagreements)
        assert r["answers"][0] == reference(tiny, PROMPTS[1], 16), seed


def test_honest_fp32_workers_are_never_flagged_over_many_checked_sessions(tiny: Path) -> None:
    specs = [honest((0, 2)), honest((0, 2)), honest((2, 4)), honest((2, 4)), honest((4, 6)), honest((4, 6))]
    prompts = [PROMPTS[i % len(PROMPTS)] + [i + 100] for i in range(16)]
    r = trio.run(functools.partial(run, tiny, specs, prompts, new=10, verify="all", rate=1.0))
    checks = sum(s.verification.checks for s in r["stats"])
    assert checks == 16 * 10 * 3, checks
    assert sum(s.verification.mismatches for s in r["stats"]) == 0 and r["convicted"] == {}
    for ids, got in zip(prompts, r["answers"]):
        assert got == reference(tiny, ids, 10)


def test_a_bf16_worker_is_not_flagged_against_fp32_ones(tiny: Path) -> None:
    fast_bf16 = dataclasses.replace(SETTINGS, worker=dataclasses.replace(SETTINGS.worker, throughput=10_000.0))
    specs = [honest((0, 3)), honest((0, 3)), ((3, 6), "bfloat16", fast_bf16), honest((3, 6)), honest((3, 6))]
    r = trio.run(functools.partial(run, tiny, specs, PROMPTS, new=10, verify="all", rate=1.0))
    stats = r["stats"]
    assert sum(s.verification.checks for s in stats) == len(PROMPTS) * 10 * 2
    assert sum(s.verification.mismatches for s in stats) == 0 and r["convicted"] == {}
    assert any(h["peer"] == str(r["workers"][2].peer_id) for s in stats for h in s.route)
