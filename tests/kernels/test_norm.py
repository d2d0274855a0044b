"""rms_norm and fused_add_rms_norm against the pure-torch reference."""

from __future__ import annotations

import pytest
import torch

from pymesh.model import ops
from pymesh.model.ops_ref import fused_add_rms_norm_ref, rms_norm_ref
from tests.kernels.conftest import DTYPES, HIDDEN, TOKENS, assert_close, randn

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("tokens", TOKENS)
def test_rms_norm_matches_reference(tokens: int, hidden: int, dtype: torch.dtype) -> None:
    x = randn(tokens, hidden, dtype=dtype, seed=tokens * 7 + hidden) * 3
    weight = randn(hidden, dtype=dtype, seed=1)
    out = ops.rms_norm(x, weight, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, rms_norm_ref(x, weight, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("tokens", TOKENS)
def test_fused_add_rms_norm_matches_reference(tokens: int, hidden: int, dtype: torch.dtype) -> None:
    x = randn(tokens, hidden, dtype=dtype, seed=hidden)
    residual = randn(tokens, hidden, dtype=dtype, seed=tokens)
    weight = randn(hidden, dtype=dtype, seed=2)
    x_ref, res_ref = x.clone(), residual.clone()
    fused_add_rms_norm_ref(x_ref, res_ref, weight, 1e-5)
    ops.fused_add_rms_norm(x, residual, weight, 1e-5)
    # residual + x is rounded the same way on both sides: it must match exactly.
    torch.testing.assert_close(residual, res_ref, rtol=0, atol=0)
    assert_close(x, x_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_strided_rows_and_3d(dtype: torch.dtype) -> None:
    big = randn(2, 9, 800, dtype=dtype, seed=3)
    x = big[..., 10:779]  # [2, 9, 769], row stride 800
    assert not x.is_contiguous()
    weight = randn(769, dtype=dtype, seed=4)
    out = torch.empty(2, 9, 769, dtype=dtype)
    result = ops.rms_norm(x, weight, 1e-6, out=out)
    assert result is out
    assert_close(out, rms_norm_ref(x, weight, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_add_rms_norm_strided(dtype: torch.dtype) -> None:
    xs = randn(83, 1200, dtype=dtype, seed=5)
    rs = randn(83, 1100, dtype=dtype, seed=6)
    x, residual = xs[:, 3:579], rs[:, :576]
    weight = randn(576, dtype=dtype, seed=7)
    x_ref, res_ref = x.clone(), residual.clone()
    untouched = xs[:, 579:].clone()
    fused_add_rms_norm_ref(x_ref, res_ref, weight, 1e-5)
    ops.fused_add_rms_norm(x, residual, weight, 1e-5)
    torch.testing.assert_close(residual, res_ref, rtol=0, atol=0)
    assert_close(x, x_ref, dtype)
    assert torch.equal(xs[:, 579:], untouched), "the kernel wrote outside the view"


def test_rms_norm_single_thread_equals_two_threads() -> None:
    x = randn(512, 4096, seed=8)
    weight = randn(4096, seed=9)
    two = ops.rms_norm(x, weight, 1e-6)
    torch.set_num_threads(1)
    one = ops.rms_norm(x, weight, 1e-6)
    assert torch.equal(one, two)


def test_rms_norm_empty_batch() -> None:
    x = torch.empty(0, 64)
    assert ops.rms_norm(x, torch.ones(64), 1e-6).shape == (0, 64)
