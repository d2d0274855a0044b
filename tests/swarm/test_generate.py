"""SmolLM2 split over three worker processes (0-9, 10-19, 20-29) equals single-process generation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import trio

from tests.swarm.conftest import LocalProcs, assert_same_tokens, reference_run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


@pytest.fixture(scope="module")
def smol_swarm(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[LocalProcs]:
    procs = LocalProcs(tmp_path_factory.mktemp("smol-swarm"))
    try:
        procs.start_bootstrap()
        spans = [(0, 9), (10, 19), (20, 29)]
        workers = procs.start_span_workers(spans, "--model-path", str(smollm2_dir), prefix="smol")
        procs.workers = workers  # type: ignore[attr-defined]
        procs.model_dir = smollm2_dir  # type: ignore[attr-defined]
        yield procs
    finally:
        procs.stop_all()


def _stats(procs: LocalProcs, model_dir: Path) -> list[dict[str, Any]]:
    from pymesh.client.routing import SpanOption
    from pymesh.client.swarm import Swarm
    from pymesh.model.fingerprint import model_id
    from pymesh.proto.identity import PeerID
    from pymesh.proto import session_wire as wire

    async def main() -> list[dict[str, Any]]:
        async with Swarm([procs.bootstrap_addr], model_id(model_dir), settings=procs.settings) as swarm:
            out = []
            for w in procs.workers:  # type: ignore[attr-defined]
                o = SpanOption(PeerID.from_text(w.peer_id), 0, 1, "127.0.0.1", w.port)
                meta, _ = await swarm.call(o, wire.STATS, {})
                out.append(meta)
            return out

    return trio.run(main)


def test_three_workers_equal_single_process(smol_swarm: LocalProcs, smollm2_dir: Path) -> None:
    n = 40
    ref, gaps = reference_run(smollm2_dir, PROMPT, n, chat=True)
    assert len(ref) >= 32, "the prompt should give 32+ tokens before EOS"
    before = _stats(smol_swarm, smollm2_dir)
    out = smol_swarm.client_json("--model-path", str(smollm2_dir), "--prompt", PROMPT, "--chat",
                                 "--max-tokens", str(n))
    assert_same_tokens(out["tokens"], ref, gaps, "3-worker swarm vs single process")
    assert [(h["start"], h["stop"]) for h in out["route"]] == [(0, 10), (10, 20), (20, 30)]
    assert out["prompt_tokens"] > 10 and out["recoveries"] == []
    assert set(out) >= {"tokens", "text", "prompt_tokens", "prefill_s", "decode_tokens_per_s", "route", "recoveries"}
    # Data path: the client fed only the first worker; the others got every step from
    # their predecessor (one prefill + one step per further token).
    after = _stats(smol_swarm, smollm2_dir)
    steps = len(out["tokens"])
    assert after[0]["from_client"] - before[0]["from_client"] == steps
    for b, a in zip(before[1:], after[1:]):
        assert a["from_client"] == b["from_client"], "a later worker received input from the client"
        assert a["from_peer"] - b["from_peer"] == steps


def test_python_api_sync_and_trio(smol_swarm: LocalProcs, smollm2_dir: Path) -> None:
    from pymesh.client.api import SwarmClient
    from pymesh.model.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=8)
    ref, gaps = reference_run(smollm2_dir, "The capital of France is", 8)
    with SwarmClient([smol_swarm.bootstrap_addr], smollm2_dir, settings=smol_swarm.settings) as client:
        got_sync = list(client.generate("The capital of France is", params))
        # Leaving the loop early cancels the generation cleanly.
        first = next(iter(client.generate("The capital of France is", params)))
    assert_same_tokens(got_sync, ref, gaps, "sync API")
    assert first == ref[0]

    async def main() -> list[int]:
        async with SwarmClient([smol_swarm.bootstrap_addr], smollm2_dir, settings=smol_swarm.settings) as client:
            return [t async for t in client.agenerate("The capital of France is", params)]

    assert_same_tokens(trio.run(main), ref, gaps, "trio API")


def test_four_clients_at_once(smol_swarm: LocalProcs, smollm2_dir: Path) -> None:
    """Four sessions from concurrent tasks of one client process: the workers batch their steps
    (fewer forwards than steps) and each session's tokens equal its single-process run (the
    near-tie rule: batched rows may round differently)."""
    from pymesh.client.generation import ClientModel, generate_tokens
    from pymesh.client.swarm import Swarm
    from pymesh.model.sampling import SamplingParams

    prompts = ["Tell me about cats.", "What is 2+2?", "Name three colors.", "Why is the sky blue?"]
    n = 16
    params = SamplingParams(max_new_tokens=n)
    model = ClientModel(smollm2_dir)

    async def one(swarm: Swarm, prompt: str, out: dict[str, list[int]]) -> None:
        out[prompt] = [t async for t in generate_tokens(swarm, model, model.prompt_ids(prompt, True), params)]

    async def main() -> dict[str, list[int]]:
        together: dict[str, list[int]] = {}
        async with Swarm([smol_swarm.bootstrap_addr], model.model_id, settings=smol_swarm.settings) as swarm:
            async with trio.open_nursery() as nursery:
                for p in prompts:
                    nursery.start_soon(one, swarm, p, together)
        return together

    before = _stats(smol_swarm, smollm2_dir)
    together = trio.run(main)
    after = _stats(smol_swarm, smollm2_dir)
    for p in prompts:
        ref, gaps = reference_run(smollm2_dir, p, n, chat=True)
        assert_same_tokens(together[p], ref, gaps, f"{p!r} run beside three others")
    steps = [a["steps"] - b["steps"] for a, b in zip(after, before)]
    forwards = [a["forwards"] - b["forwards"] for a, b in zip(after, before)]
    assert all(s >= sum(len(t) for t in together.values()) for s in steps), (steps, together)
    assert all(f < s for f, s in zip(forwards, steps)), f"no worker batched: forwards {forwards}, steps {steps}"
