"""The decode fast path (DecodePlan) gives the checked path's numbers, for every architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pymesh.model import decode_plan
from pymesh.model.decode_plan import DecodePlan
from pymesh.model.generate import LocalModel
from pymesh.model.switches import SWITCHES
from pymesh.model import ops
from tests.model.tiny import make_tiny_model

CASES = {
    "llama": ("llama", {}),
    "mistral-window": ("mistral", {"sliding_window": 5}),
    "qwen2-bias": ("qwen2", {}),
    "phi3": ("phi3", {}),
    "head-dim": ("llama", {"head_dim": 32}),
}
needs_c = pytest.mark.skipif(not ops.using_c(),
                             reason="pymesh._C is not built: the fast path needs the compiled kernels")


@pytest.fixture(scope="module", params=list(CASES))
def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    arch, overrides = CASES[request.param]
    return make_tiny_model(tmp_path_factory.mktemp(request.param), arch, **overrides)


def _decode(model: LocalModel, batch: int, steps: int) -> tuple[list[torch.Tensor], object]:
    prompt = torch.arange(3, 3 + 9 * batch).view(batch, 9) * 37 % 49152
    cache = model.span.new_cache(32, batch=batch)
    outs = [model.span.forward(model.head.embed(prompt), cache, 0)]
    for pos in range(9, 9 + steps):
        nxt = torch.tensor([[(pos * 101 + r) % 49152] for r in range(batch)])
        outs.append(model.span.forward(model.head.embed(nxt), cache, pos))
    return outs, cache.plan


@needs_c
@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype, batch", [(torch.float32, 1), (torch.float32, 3), (torch.bfloat16, 1)])
def test_fast_path_equals_checked_path(folder: Path, dtype: torch.dtype, batch: int,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    model = LocalModel.load(folder, dtype=dtype)
    fast, plan = _decode(model, batch, 8)
    assert isinstance(plan, DecodePlan)
    monkeypatch.setattr(SWITCHES, "fast_decode", False)   # what the CLI sets for PYMESH_FAST_DECODE=0
    assert not decode_plan.fast_decode_enabled()
    checked, plan = _decode(model, batch, 8)
    assert plan is False
    # bfloat16: a one-sequence plan attends with the decode-attention kernel (float32
    # accumulation, one rounding), the checked path with torch's bf16 SDPA: a few bf16 ulps apart
    # after 8 steps (hidden values of magnitude ~4, ulp 2^-6)
    atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else (4e-2, 2e-2)
    for a, b in zip(fast, checked):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@needs_c
def test_plan_replay_and_rebuild(folder: Path) -> None:
    model = LocalModel.load(folder)
    cache = model.span.new_cache(16)
    model.span.forward(model.head.embed(torch.tensor([[5, 6, 7]])), cache, 0)
    step = model.head.embed(torch.tensor([[9]]))
    a = model.span.forward(step, cache, 3)
    b = model.span.forward(step, cache, 3)  # replay of the same position overwrites the cache entry
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert a.data_ptr() != b.data_ptr()  # results are fresh tensors, not the plan's buffers


def test_caches_and_calls_mix_inference_mode(folder: Path) -> None:
    """A worker may make a cache in one grad mode and step it in another: both work."""
    model = LocalModel.load(folder)
    prompt = model.head.embed(torch.tensor([[5, 6, 7]]))
    step = model.head.embed(torch.tensor([[9]]))
    with torch.inference_mode():
        inside = model.span.new_cache(8)
    outside = model.span.new_cache(8)
    results = []
    for cache in (inside, outside):
        for mode in (torch.inference_mode, torch.no_grad, torch.enable_grad):
            with mode():
                model.span.forward(prompt, cache, 0)
                results.append(model.span.forward(step, cache, 3))
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], atol=0, rtol=0)


@needs_c
@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_span_kernel_equals_the_plans_python_loop_bit_for_bit(folder: Path, dtype: torch.dtype,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """csrc/decode_span.cpp runs the same kernels in the same order as DecodePlan._step's loop."""
    model = LocalModel.load(folder, dtype=dtype)
    one, plan = _decode(model, 1, 8)
    assert isinstance(plan, DecodePlan) and plan.table is not None
    monkeypatch.setattr(SWITCHES, "span_kernel", False)
    loop, plan = _decode(model, 1, 8)
    assert isinstance(plan, DecodePlan) and plan.table is None
    for a, b in zip(one, loop):
        assert torch.equal(a, b)
