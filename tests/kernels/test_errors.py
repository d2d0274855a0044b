"""Wrong dtype, device, shape or layout: clear errors, never silent garbage."""

from __future__ import annotations

import pytest
import torch

from pymesh.errors import PymeshError
from pymesh.model import ops
from pymesh.model.ops import KernelInputError

pytestmark = pytest.mark.timeout(30)


def test_error_type_is_both_value_error_and_pymesh_error() -> None:
    assert issubclass(KernelInputError, ValueError) and issubclass(KernelInputError, PymeshError)


def test_unsupported_dtype() -> None:
    x = torch.ones(2, 8, dtype=torch.int32)
    with pytest.raises(KernelInputError, match="int32 is not supported; use float32"):
        ops.rms_norm(x, torch.ones(8, dtype=torch.int32), 1e-6)


def test_weight_dtype_mismatch() -> None:
    with pytest.raises(KernelInputError, match=r"weight has dtype torch.float16 but x has torch.float32"):
        ops.rms_norm(torch.ones(2, 8), torch.ones(8, dtype=torch.float16), 1e-6)


def test_device_mismatch() -> None:
    with pytest.raises(KernelInputError, match="weight is on meta but x is on cpu"):
        ops.rms_norm(torch.ones(2, 8), torch.ones(8, device="meta"), 1e-6)


def test_weight_shape() -> None:
    with pytest.raises(KernelInputError, match=r"weight must have shape \(8,\)"):
        ops.fused_add_rms_norm(torch.ones(2, 8), torch.ones(2, 8), torch.ones(7), 1e-6)


def test_residual_shape() -> None:
    with pytest.raises(KernelInputError, match="residual shape"):
        ops.fused_add_rms_norm(torch.ones(2, 8), torch.ones(3, 8), torch.ones(8), 1e-6)


def test_last_dim_not_contiguous() -> None:
    x = torch.ones(8, 4).t()
    with pytest.raises(KernelInputError, match="contiguous in its last dim"):
        ops.rms_norm(x, torch.ones(8), 1e-6)


def test_leading_dims_that_do_not_flatten() -> None:
    q = torch.ones(2, 4, 3, 16).transpose(1, 2)  # [batch, seq, heads, dim] view of [b, h, s, d]
    cos = sin = torch.ones(8, 8)
    with pytest.raises(KernelInputError, match="do not flatten"):
        ops.rotary_embedding(q, None, torch.zeros(6, dtype=torch.int64), cos, sin)


def test_rotary_checks() -> None:
    q = torch.ones(3, 2, 16)
    k = torch.ones(3, 2, 16)
    cos = sin = torch.ones(8, 8)
    pos = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(KernelInputError, match="positions has 2"):
        ops.rotary_embedding(q, k, pos[:2], cos, sin)
    with pytest.raises(KernelInputError, match="positions must be int64"):
        ops.rotary_embedding(q, k, pos.int(), cos, sin)
    with pytest.raises(KernelInputError, match="float32 \\[max_pos, rot_dim // 2\\]"):
        ops.rotary_embedding(q, k, pos, cos.half(), sin)
    with pytest.raises(KernelInputError, match="rot_dim 32"):
        ops.rotary_embedding(q, k, pos, torch.ones(8, 16), torch.ones(8, 16))
    with pytest.raises(KernelInputError, match=r"k must be \[..., kv_heads, 16\]"):
        ops.rotary_embedding(q, torch.ones(3, 2, 8), pos, cos, sin)


def test_silu_shapes_and_out() -> None:
    with pytest.raises(KernelInputError, match="up shape"):
        ops.silu_and_mul(torch.ones(2, 8), torch.ones(2, 9))
    with pytest.raises(KernelInputError, match="out must be contiguous"):
        ops.silu_and_mul(torch.ones(2, 8), torch.ones(2, 8), out=torch.ones(2, 9))


def test_linear_shapes() -> None:
    with pytest.raises(KernelInputError, match="in_features == x.shape"):
        ops.linear(torch.ones(1, 8), torch.ones(4, 9))
    with pytest.raises(KernelInputError, match=r"bias must have shape \(4,\)"):
        ops.linear(torch.ones(1, 8), torch.ones(4, 8), torch.ones(5))


def test_c_level_checks_reach_python_as_value_error() -> None:
    c = ops._C
    assert c is not None
    with pytest.raises(ValueError, match="unknown dtype code 7"):
        c.rms_norm(0, 8, 0, 8, 0, 0, 8, 1e-6, 7)
    with pytest.raises(ValueError, match="1..32 rows"):
        c.linear(0, 0, 8, 0, 0, 33, 8, 8, 0)
