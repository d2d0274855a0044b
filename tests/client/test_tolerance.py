"""pymesh.client.tolerance and pymesh.client.magnitude: bounds, comparisons, the magnitude guard."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pymesh.client.magnitude import MagnitudeGuard
from pymesh.client.tolerance import NOISE_RELATIVE_ERROR, compare, row_errors, tolerance
from pymesh.model.span import SpanModel, load_span
from tests.model.tiny import make_tiny_model

LENGTHS = (1, 2, 3, 4, 8, 15, 16, 30, 64)


def test_tolerance_orders_pairs_and_grows_with_span() -> None:
    for n in LENGTHS:
        fp32 = tolerance("float32", "float32", n)
        for a, b in (("bfloat16", "float32"), ("float32", "bf16"), ("bf16", "bf16"), ("float16", "fp32")):
            half = tolerance(a, b, n)
            assert fp32 * 50 < half < NOISE_RELATIVE_ERROR / 1.5
            assert half == tolerance(b, a, n)  # symmetric
        assert fp32 < tolerance("float32", "float32", n, "cuda", "cpu") < tolerance("bf16", "fp32", n)
    halves = [tolerance("bfloat16", "float32", n) for n in LENGTHS]
    assert halves == sorted(halves) and halves[0] < halves[-1]


def test_tolerance_rejects_unknown_dtype_and_empty_span() -> None:
    with pytest.raises(ValueError, match="int8"):
        tolerance("int8", "float32", 2)
    with pytest.raises(ValueError, match="at least one block"):
        tolerance("float32", "float32", 0)


def test_row_errors_zero_and_non_finite_rows() -> None:
    ref = torch.tensor([[[3.0, 4.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]])
    out = torch.tensor([[[3.0, 4.5], [0.0, 0.0], [0.0, 1e-3], [math.nan, 0.0], [1.0, 1.0]]])
    ref[0, 4, 1] = math.inf
    e = row_errors(out, ref)
    assert e.shape == (5,)
    assert e[0].item() == pytest.approx(0.1)
    assert e[1].item() == 0.0                      # zero against zero
    assert e[2].item() == math.inf                 # anything against a zero row
    assert e[3].item() == math.inf and e[4].item() == math.inf  # NaN / inf in either side
    c = compare(out, ref, "float32", "float32", 1)
    assert not c.ok and c.error == math.inf and c.worst_row in (2, 3, 4)
    assert compare(ref[:, :2], ref[:, :2], "float32", "float32", 1).ok
    assert not compare(torch.empty(1, 0, 2), torch.empty(1, 0, 2), "fp32", "fp32", 1).ok
    with pytest.raises(ValueError, match="different shapes"):
        row_errors(out[:, :2], ref)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tol"), num_hidden_layers=4, tokenizer_dir=smollm2_dir)


def _worker_run(span: SpanModel, x: torch.Tensor, prompt: int) -> list[torch.Tensor]:
    """Per step outputs as a worker computes them: prefill, then one decode step per position."""
    cache = span.new_cache(x.shape[1], 1)
    outs = [span.forward(x[:, :prompt], cache, 0).float()]
    outs += [span.forward(x[:, t:t + 1], cache, t).float() for t in range(prompt, x.shape[1])]
    return outs


def test_honest_fp32_and_bf16_spans_pass_and_noise_fails(tiny: Path) -> None:
    prompt, steps = 7, 12
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, prompt + steps, 64, generator=gen)
    blocks = 4
    fp32 = load_span(tiny, 0, blocks, dtype=torch.float32)
    bf16 = load_span(tiny, 0, blocks, dtype=torch.bfloat16)
    ref = fp32.forward(x, fp32.new_cache(x.shape[1], 1), 0).float()  # the checker: one chunk
    ref16 = bf16.forward(x, bf16.new_cache(x.shape[1], 1), 0).float()
    bounds = [0, prompt, *range(prompt + 1, prompt + steps + 1)]
    for name, dtype, outs, r, rd in (("fp32", "float32", _worker_run(fp32, x, prompt), ref, "float32"),
                                     ("bf16", "bfloat16", _worker_run(bf16, x, prompt), ref, "float32"),
                                     ("bf16-bf16", "bfloat16", _worker_run(bf16, x, prompt), ref16, "bfloat16")):
        for i, out in enumerate(outs):
            step_ref = r[:, bounds[i]:bounds[i + 1]]
            honest = compare(out, step_ref, dtype, rd, blocks)
            assert honest.ok, (name, i, honest)
            assert honest.error < honest.tolerance / 2, (name, i, honest)
            rms = out.pow(2).mean().sqrt()
            noisy = out + NOISE_RELATIVE_ERROR * rms * torch.randn(out.shape, generator=gen)
            bad = compare(noisy, step_ref, dtype, rd, blocks)
            assert not bad.ok and bad.error > 1.3 * bad.tolerance, (name, i, bad)
    fp32_err = compare(_worker_run(fp32, x, prompt)[0], ref[:, :prompt], "float32", "float32", blocks)
    assert fp32_err.error < 1e-4


def test_guard_learns_then_flags_scale_and_non_finite() -> None:
    gen = torch.Generator().manual_seed(1)
    g = MagnitudeGuard()
    steps = [torch.randn(1, 16, 32, generator=gen), torch.randn(1, 1, 32, generator=gen)]
    assert g.problem(3, steps[0] * 100) is None           # nothing learned yet
    g.learn(3, steps[0])
    assert g.band(3) is None and g.problem(3, steps[0] * 100) is None  # one step is not enough
    g.learn(3, steps[1])
    assert g.learned(3) == 2 and g.band(3) is not None
    fresh = torch.randn(1, 1, 32, generator=gen)
    assert g.problem(3, fresh) is None
    assert "outside the learned range" in (g.problem(3, fresh * 20) or "")
    assert "outside the learned range" in (g.problem(3, torch.zeros(1, 1, 32)) or "")
    assert g.problem(4, fresh * 20) is None                # another boundary learned nothing
    nan = fresh.clone()
    nan[0, 0, 5] = math.nan
    assert "non-finite" in (g.problem(4, nan) or "")       # always, learned or not
    g.learn(3, nan)                                        # a NaN row teaches nothing
    assert g.learned(3) == 2


def test_guard_position_zero_has_its_own_range_and_memory_is_bounded() -> None:
    gen = torch.Generator().manual_seed(2)
    g = MagnitudeGuard(min_rows=4)

    def prefill() -> torch.Tensor:
        t = torch.randn(1, 6, 16, generator=gen)
        t[:, 0] *= 50  # an attention-sink-like first row
        return t

    for _ in range(2):
        g.learn(0, prefill(), pos=0)
        g.learn(0, torch.randn(1, 1, 16, generator=gen), pos=9)
    assert g.problem(0, prefill(), pos=0) is None
    big = torch.randn(1, 1, 16, generator=gen) * 50
    assert g.problem(0, big, pos=10) is not None           # sink-sized row past position 0
    assert "position-0" in (g.problem(0, torch.randn(1, 3, 16, generator=gen), pos=0) or "")
    small = MagnitudeGuard(max_boundaries=2)
    for b in range(10):
        small.learn(b, torch.ones(1, 1, 4))
    assert [small.learned(b) for b in range(4)] == [1, 1, 0, 0]
    with pytest.raises(ValueError):
        MagnitudeGuard(factor=1.0)
