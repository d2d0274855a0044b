"""Other architectures through a real swarm: tiny random Qwen2 (q/k/v bias), Mistral with a
sliding window shorter than the sequence, Phi-3 (fused projections) and a Llama with llama3
rope scaling, each split over 2-3 worker processes under one bootstrap. The client's ids
must equal ``pymesh generate --json`` and transformers' greedy choice (near ties excepted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.e2e.helpers import assert_ids_match, generate_json, hf_gaps, prompt_token_ids
from tests.swarm.conftest import LocalProcs, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPT = "The old map showed a narrow path through the mountains towards"
N = 20
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

#: name -> (arch, config overrides, worker spans inclusive)
ARCHS: dict[str, tuple[str, dict[str, object], list[tuple[int, int]]]] = {
    "qwen2": ("qwen2", {"num_hidden_layers": 4}, [(0, 0), (1, 1), (2, 3)]),
    "mistral-window": ("mistral", {"num_hidden_layers": 4, "sliding_window": 6}, [(0, 1), (2, 3)]),
    "phi3": ("phi3", {"num_hidden_layers": 3}, [(0, 1), (2, 2)]),
    "llama3-rope": ("llama", {"num_hidden_layers": 4, "rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0},
                    [(0, 2), (3, 3)]),
}


@pytest.fixture(scope="module")
def arch_swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalProcs, dict[str, Path]]]:
    from tests.model.tiny import make_tiny_model

    models = {name: make_tiny_model(tmp_path_factory.mktemp(f"e2e-{name}"), arch, name=f"e2e-{name}", seed=3, **kw)
              for name, (arch, kw, _) in ARCHS.items()}
    procs = LocalProcs(tmp_path_factory.mktemp("e2e-archs"))
    try:
        procs.start_bootstrap()
        workers = [procs.start_worker("--layers", f"{a}-{b}", "--model-path", str(models[name]),
                                      name=f"{name}-{a}{b}")
                   for name, (_, _, spans) in ARCHS.items() for a, b in spans]
        wait_ready(workers, timeout=180)
        yield procs, models
    finally:
        procs.stop_all()


@pytest.mark.parametrize("name", list(ARCHS))
def test_arch_through_swarm(arch_swarm: tuple[LocalProcs, dict[str, Path]], name: str) -> None:
    procs, models = arch_swarm
    folder = models[name]
    spans = ARCHS[name][2]
    out = procs.client_json("--model-path", str(folder), "--prompt", PROMPT, "--max-tokens", str(N), timeout=150)
    ref = generate_json(folder, PROMPT, N)
    ids = prompt_token_ids(folder, PROMPT, False)
    if name == "mistral-window":
        assert len(ids) + len(ref["tokens"]) > 2 * ARCHS[name][1]["sliding_window"]  # type: ignore[operator]
    assert_ids_match(out["tokens"], ref["tokens"], folder, ids, f"{name}: swarm vs pymesh generate")
    assert [(h["start"], h["stop"]) for h in out["route"]] == [(a, b + 1) for a, b in spans]
    # and pymesh generate against transformers itself (teacher-forced on pymesh's ids)
    hf_ids, gaps = hf_gaps(folder, ids, ref["tokens"])
    for i, (a, b) in enumerate(zip(ref["tokens"], hf_ids)):
        assert a == b or gaps[i] < 1e-3, f"{name} step {i}: pymesh {a}, transformers {b} (gap {gaps[i]:.3g})"


def _stop_text(folder: Path, tokens: list[int]) -> str:
    """A stop string completed by some token after the second, not seen before it."""
    from pymesh.model.tokenizer import load_tokenizer

    tok = load_tokenizer(folder)
    for k in range(2, len(tokens)):
        before, upto = tok.decode(tokens[:k]), tok.decode(tokens[: k + 1])
        piece = upto[len(before):].strip()
        if len(piece) >= 3 and piece not in before and upto.startswith(before):
            return piece
    pytest.skip("no usable stop string in this model's output")


def test_stop_string_like_generate(arch_swarm: tuple[LocalProcs, dict[str, Path]]) -> None:
    procs, models = arch_swarm
    folder = models["qwen2"]
    stop = _stop_text(folder, generate_json(folder, PROMPT, N)["tokens"])
    out = procs.client_json("--model-path", str(folder), "--prompt", PROMPT, "--max-tokens", str(N), "--stop", stop,
                            timeout=150)
    from tests.e2e.helpers import last_json, pymesh_run

    ref = last_json(pymesh_run("generate", "--model-path", str(folder), "--prompt", PROMPT, "--max-tokens", str(N),
                               "--json", "--stop", stop))
    assert out["tokens"] == ref["tokens"]
    assert stop not in ref["text"]
    assert out["text"] == ref["text"], (out["text"], ref["text"], stop)
