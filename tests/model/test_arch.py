"""Every supported architecture as a tiny random model, against transformers (float32).

Per case: prefill logits, 20 greedy tokens (prefill then one token per step),
the prompt fed token by token through the KV cache, a span split in two, a
replayed step, and two sessions batched in one cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pymesh.model.generate import LocalModel
from pymesh.model.sampling import SamplingParams
from pymesh.model.span import load_span
from tests.model._reference import assert_same_tokens, load_reference, reference_greedy, reference_logits
from tests.model.tiny import make_tiny_model

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama3-rope": ("llama", {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0}),
    "linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "mistral-window": ("mistral", {"sliding_window": 8}),  # shorter than the 21-token prompt
    "qwen2-bias": ("qwen2", {}),
    "phi3": ("phi3", {}),
    "head-dim": ("llama", {"head_dim": 32}),  # 4 heads x 32 != hidden 64
    "llama-attn-bias": ("llama", {"attention_bias": True}),  # q, k, v and o biases (randomised below)
}
PROMPT = [1, 450, 7031, 310, 3444, 338, 3681, 29889, 13, 512, 9, 40000, 77, 1234, 5, 49151, 3, 300, 301,
          302, 303]
TOL = 1e-4


@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, LocalModel]:
    arch, overrides = CASES[request.param]
    folder = make_tiny_model(tmp_path_factory.mktemp(request.param), arch, **overrides)
    if overrides.get("attention_bias"):
        randomise_biases(folder)
    return folder, load_reference(folder), LocalModel.load(folder)


def randomise_biases(folder: Path) -> None:
    """transformers initialises biases to zero, which would hide a bias bug: make them random."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    gen = torch.Generator().manual_seed(7)
    biases = [n for n in tensors if n.endswith(".bias")]
    assert any(".o_proj." in n for n in biases)
    for name in biases:
        tensors[name] = torch.randn(tensors[name].shape, generator=gen) * 0.1
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _prefill(model: LocalModel, ids: list[int]) -> torch.Tensor:
    cache = model.span.new_cache(len(ids))
    return model.head.logits(model.span.forward(model.head.embed(torch.tensor([ids])), cache, 0)[0])


@pytest.mark.timeout(120)
def test_prefill_logits_match(case: tuple[Path, Any, LocalModel]) -> None:
    _, ref, model = case
    expected = reference_logits(ref, PROMPT)
    got = _prefill(model, PROMPT)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=TOL, rtol=TOL)
    assert expected.std() > 0.1  # the random model is not degenerate


@pytest.mark.timeout(120)
def test_greedy_tokens_match(case: tuple[Path, Any, LocalModel]) -> None:
    _, ref, model = case
    ref_tokens, gaps = reference_greedy(ref, PROMPT, 20)
    ours = list(model.generate_ids(PROMPT, SamplingParams(max_new_tokens=20), eos_ids=[]))
    assert_same_tokens(ours, ref_tokens, gaps)


@pytest.mark.timeout(120)
def test_token_by_token_decode_matches_prefill(case: tuple[Path, Any, LocalModel]) -> None:
    _, ref, model = case
    expected = reference_logits(ref, PROMPT)
    cache = model.span.new_cache(len(PROMPT) + 4)
    for pos, token in enumerate(PROMPT):
        hidden = model.span.forward(model.head.embed(torch.tensor([[token]])), cache, pos)
        torch.testing.assert_close(model.head.logits(hidden[0, -1]), expected[pos], atol=TOL, rtol=TOL)


@pytest.mark.timeout(120)
def test_split_span_and_replay(case: tuple[Path, Any, LocalModel]) -> None:
    folder, _, model = case
    n = model.config.num_hidden_layers
    first, second = load_span(folder, 0, 1), load_span(folder, 1, n)
    c1, c2, whole = first.new_cache(32), second.new_cache(32), model.span.new_cache(32)
    hidden = model.head.embed(torch.tensor([PROMPT]))
    kept = hidden.clone()
    split = second.forward(first.forward(hidden, c1, 0), c2, 0)
    torch.testing.assert_close(hidden, kept, atol=0, rtol=0)  # the input is never modified
    one = model.span.forward(hidden, whole, 0)
    torch.testing.assert_close(split, one, atol=1e-5, rtol=1e-5)
    step = model.head.embed(torch.tensor([[77]]))
    a = second.forward(first.forward(step, c1, len(PROMPT)), c2, len(PROMPT))
    # replay of the same step (as after a fault) overwrites the cache entries: same result
    b = second.forward(first.forward(step, c1, len(PROMPT)), c2, len(PROMPT))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a, model.span.forward(step, whole, len(PROMPT)), atol=1e-5, rtol=1e-5)


@pytest.mark.timeout(120)
def test_batched_sessions_match_single(case: tuple[Path, Any, LocalModel]) -> None:
    _, _, model = case
    other = [(t * 7 + 11) % 49152 for t in PROMPT]
    batch = model.span.new_cache(32, batch=2)
    both = model.span.forward(model.head.embed(torch.tensor([PROMPT, other])), batch, 0)
    step = model.span.forward(model.head.embed(torch.tensor([[5], [6]])), batch, len(PROMPT))
    for row, (ids, nxt) in enumerate(((PROMPT, 5), (other, 6))):
        single = model.span.new_cache(32)
        alone = model.span.forward(model.head.embed(torch.tensor([ids])), single, 0)
        torch.testing.assert_close(both[row], alone[0], atol=1e-5, rtol=1e-5)
        alone_step = model.span.forward(model.head.embed(torch.tensor([[nxt]])), single, len(ids))
        torch.testing.assert_close(step[row], alone_step[0], atol=1e-5, rtol=1e-5)


@pytest.mark.timeout(120)
def test_chunked_prefill_matches_whole(case: tuple[Path, Any, LocalModel]) -> None:
    """A prompt prefilled in two chunks (the second attends to cached keys, with the window) = one prefill."""
    _, ref, model = case
    expected = reference_logits(ref, PROMPT)
    cache = model.span.new_cache(len(PROMPT))
    cut = 11
    first = model.span.forward(model.head.embed(torch.tensor([PROMPT[:cut]])), cache, 0)
    second = model.span.forward(model.head.embed(torch.tensor([PROMPT[cut:]])), cache, cut)
    got = model.head.logits(torch.cat([first, second], dim=1)[0])
    torch.testing.assert_close(got, expected, atol=TOL, rtol=TOL)
