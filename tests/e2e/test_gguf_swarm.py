"""A GGUF file served as it is, through a swarm (issue 15): two worker processes each load
their half of a tiny Q4_1 file (token embedding / tied head in Q8_0, as the embedded
SmolLM2 file has it) with ``--model-path FILE.gguf``. A client on the same file gets the
single-process tokens of that file (the near-tie rule), also when the worker serving blocks
2-3 is killed mid-generation and a spare GGUF worker takes over; a client on the float32
folder converted from it shares the base id, so it finds the workers, and is told they serve
q4_1."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.swarm.conftest import LocalProcs, assert_same_tokens, generate_killing, reference_run, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPT = "the old map"


def _four_layer_weights() -> dict[str, object]:
    from tests.model.test_convert import LAYERS, random_weights

    first, second = random_weights(seed=1), random_weights(seed=2)
    out = dict(first)
    for name, value in second.items():
        if name.startswith("model.layers."):
            parts = name.split(".")
            parts[2] = str(int(parts[2]) + LAYERS)
            out[".".join(parts)] = value
    return out


@pytest.fixture(scope="module")
def gguf_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from pymesh.model.gguf_convert import convert_gguf
    from tests.model.test_convert import N_HEAD, N_KV
    from tests.model.tiny import write_tiny_gguf

    tmp = tmp_path_factory.mktemp("gguf-swarm")
    path = tmp / "tiny-swarm.Q4_1.gguf"
    write_tiny_gguf(path, _four_layer_weights(), n_head=N_HEAD, n_head_kv=N_KV, qtype="Q4_1",
                    qtypes={"token_embd.weight": "Q8_0"})
    folder = convert_gguf(path, tmp / "tiny-swarm", progress=False)
    return path, folder


@pytest.fixture(scope="module")
def gguf_swarm(tmp_path_factory: pytest.TempPathFactory, gguf_pair: tuple[Path, Path]) -> Iterator[LocalProcs]:
    path, _ = gguf_pair
    procs = LocalProcs(tmp_path_factory.mktemp("gguf-swarm-procs"), PYMESH_STEP_TIMEOUT="30")
    try:
        procs.start_bootstrap()
        workers = [procs.start_worker("--layers", layers, "--model-path", str(path), name=f"w{layers}")
                   for layers in ("0-1", "2-3")]
        wait_ready(workers, timeout=120)
        procs.gguf_workers = workers  # type: ignore[attr-defined]
        yield procs
    finally:
        procs.stop_all()


def test_gguf_workers_announce_the_file_quantization(gguf_swarm: LocalProcs) -> None:
    for w in gguf_swarm.gguf_workers:  # type: ignore[attr-defined]
        assert "tiny-swarm@" in w.text() and ":q4_1 layers" in w.text(), w.text()[-2000:]


def test_gguf_client_equals_single_process_on_the_file(gguf_swarm: LocalProcs, gguf_pair: tuple[Path, Path]) -> None:
    import torch

    from pymesh.model.gguf_store import GGUFStore
    from pymesh.model.quant import QTensor

    path, _ = gguf_pair
    with GGUFStore(path) as store:  # the file really holds blocks: the test runs the quantized kernels
        assert isinstance(store.get_weight("model.layers.0.mlp.up_proj.weight", (512, 256), torch.float32), QTensor)
    n = 16
    ref, gaps = reference_run(path, PROMPT, n)
    out = gguf_swarm.client_json("--model-path", str(path), "--prompt", PROMPT, "--max-tokens", str(n))
    assert [(h["start"], h["stop"]) for h in out["route"]] == [(0, 2), (2, 4)]
    assert_same_tokens(out["tokens"], ref, gaps, "swarm on the GGUF vs single process on the GGUF")


def test_float_folder_client_sees_the_gguf_workers_under_its_base_id(gguf_swarm: LocalProcs,
                                                                     gguf_pair: tuple[Path, Path]) -> None:
    _, folder = gguf_pair
    res = gguf_swarm.client("--model-path", str(folder), "--prompt", PROMPT, "--max-tokens", "2",
                            PYMESH_DISCOVERY_TIMEOUT="3")
    assert res.returncode != 0
    assert "q4_1 (1 worker)" in res.stderr and "--allow-mixed" in res.stderr, res.stderr[-3000:]


def test_a_killed_gguf_worker_is_replaced_with_identical_tokens(gguf_swarm: LocalProcs,
                                                                gguf_pair: tuple[Path, Path]) -> None:
    """Runs last in this module: it kills a worker of the shared swarm."""
    path, _ = gguf_pair
    spare = gguf_swarm.start_worker("--layers", "2-3", "--model-path", str(path), name="w2-3-spare")
    wait_ready([spare], timeout=120)
    workers = [*gguf_swarm.gguf_workers, spare]  # type: ignore[attr-defined]
    n = 24
    ref, gaps = reference_run(path, PROMPT, n)
    got, stats, active = generate_killing(gguf_swarm, path, PROMPT, n, after=5, start=2, workers=workers)
    assert_same_tokens(got, ref, gaps, "GGUF swarm across a killed worker vs single process on the file")
    assert len(stats.recoveries) >= 1, "the kill should have forced a recovery"
    new_mid = next(h["peer"] for h in stats.route if h["start"] == 2)
    assert new_mid != active and next(w for w in workers if w.peer_id == new_mid).alive()
