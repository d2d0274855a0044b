"""Quantized and float workers in one swarm (issue 15): two worker processes serve every
block of the tiny model, one with ``--quantize q8_0``. A float client routes only through
the float worker; a ``--quantize q8_0`` client only through the q8_0 worker, and its greedy
tokens equal single-process generation with q8_0 weights; a q4_0 client is told which
quantizations serve the model and what to pass."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.swarm.conftest import LocalProcs, assert_same_tokens, reference_run, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPT = "Once upon a time"


def _start(tmp: Path, tiny6_dir: Path, specs: list[tuple[str, str, list[str]]]) -> Iterator[LocalProcs]:
    """A bootstrap and one worker per (name, inclusive layers, extra flags) on the tiny model."""
    procs = LocalProcs(tmp)
    try:
        procs.start_bootstrap()
        workers = [procs.start_worker("--layers", layers, "--model-path", str(tiny6_dir), *flags, name=name)
                   for name, layers, flags in specs]
        wait_ready(workers, timeout=120)
        procs.workers = {name: w for (name, _, _), w in zip(specs, workers)}  # type: ignore[attr-defined]
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def quant_swarm(tmp_path_factory: pytest.TempPathFactory, tiny6_dir: Path) -> Iterator[LocalProcs]:
    yield from _start(tmp_path_factory.mktemp("quant-swarm"), tiny6_dir,
                      [("float", "0-5", []), ("q8_0", "0-5", ["--quantize", "q8_0"])])


def test_q8_worker_announces_the_suffix(quant_swarm: LocalProcs) -> None:
    workers = quant_swarm.workers  # type: ignore[attr-defined]
    assert ":q8_0 layers 0-5" in workers["q8_0"].text()
    assert ":q8_0" not in workers["float"].text()


def test_float_client_refuses_the_q8_worker(quant_swarm: LocalProcs, tiny6_dir: Path) -> None:
    n = 16
    ref, gaps = reference_run(tiny6_dir, PROMPT, n)
    out = quant_swarm.client_json("--model-path", str(tiny6_dir), "--prompt", PROMPT, "--max-tokens", str(n),
                                  "--verify", "off")
    assert [h["peer"] for h in out["route"]] == [quant_swarm.workers["float"].peer_id]  # type: ignore[attr-defined]
    assert_same_tokens(out["tokens"], ref, gaps, "float client")


def test_q8_client_uses_the_q8_worker_and_equals_single_process(quant_swarm: LocalProcs, tiny6_dir: Path) -> None:
    n = 16
    ref, gaps = reference_run(tiny6_dir, PROMPT, n, quantize="q8_0")
    out = quant_swarm.client_json("--model-path", str(tiny6_dir), "--prompt", PROMPT, "--max-tokens", str(n),
                                  "--quantize", "q8_0", "--verify", "off")
    assert [h["peer"] for h in out["route"]] == [quant_swarm.workers["q8_0"].peer_id]  # type: ignore[attr-defined]
    assert_same_tokens(out["tokens"], ref, gaps, "q8_0 client vs single-process q8_0")


def test_a_client_of_another_quantization_is_told_what_to_pass(quant_swarm: LocalProcs, tiny6_dir: Path) -> None:
    res = quant_swarm.client("--model-path", str(tiny6_dir), "--prompt", PROMPT, "--max-tokens", "2",
                             "--quantize", "q4_0", PYMESH_DISCOVERY_TIMEOUT="3")
    assert res.returncode != 0
    err = res.stderr
    assert "other quantizations" in err and "q8_0 (1 worker)" in err and "float (1 worker)" in err, err[-3000:]
    assert "--quantize q8_0" in err and "--allow-mixed" in err, err[-3000:]


@pytest.fixture(scope="module")
def split_swarm(tmp_path_factory: pytest.TempPathFactory, tiny6_dir: Path) -> Iterator[LocalProcs]:
    yield from _start(tmp_path_factory.mktemp("quant-split"), tiny6_dir,
                      [("float0", "0-2", []), ("q8-3", "3-5", ["--quantize", "q8_0"])])


def test_allow_mixed_chains_quantizations_and_verifies_receipts(split_swarm: LocalProcs, tiny6_dir: Path) -> None:
    """Blocks 0-2 only in float, 3-5 only in q8_0: without --allow-mixed no route (the error
    names q8_0); with it the route chains both, each hop opened, pushed to and receipted
    under its own id (--verify sample: receipts every step; no second worker to spot-check on)."""
    res = split_swarm.client("--model-path", str(tiny6_dir), "--prompt", PROMPT, "--max-tokens", "2",
                             PYMESH_DISCOVERY_TIMEOUT="3")
    assert res.returncode != 0 and "layer 3" in res.stderr and "q8_0 (1 worker)" in res.stderr, res.stderr[-3000:]
    out = split_swarm.client_json("--model-path", str(tiny6_dir), "--prompt", PROMPT, "--max-tokens", "12",
                                  "--allow-mixed", "--verify", "sample")
    workers = split_swarm.workers  # type: ignore[attr-defined]
    assert [(h["peer"], h["start"], h["stop"]) for h in out["route"]] == [
        (workers["float0"].peer_id, 0, 3), (workers["q8-3"].peer_id, 3, 6)]
    assert len(out["tokens"]) >= 1 and out["recoveries"] == []
