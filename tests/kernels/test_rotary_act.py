"""rotary_embedding and silu_and_mul against the pure-torch reference."""

from __future__ import annotations

import pytest
import torch

from pymesh.model import ops
from pymesh.model.ops_ref import rotary_embedding_ref, silu_and_mul_ref
from tests.kernels.conftest import DTYPES, HIDDEN, TOKENS, assert_close, randn

pytestmark = pytest.mark.timeout(60)


def tables(max_pos: int, rot_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim)
    angles = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv[None, :]
    return angles.cos().contiguous(), angles.sin().contiguous()


def positions_for(tokens: int, max_pos: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, max_pos, (tokens,), generator=gen, dtype=torch.int64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (32, 8, 128), (5, 5, 80)])
@pytest.mark.parametrize("tokens", TOKENS)
def test_rotary_matches_reference(tokens: int, heads: int, kv_heads: int, head_dim: int,
                                  dtype: torch.dtype) -> None:
    cos, sin = tables(4096, head_dim)
    pos = positions_for(tokens, 4096, tokens + head_dim)
    q = randn(tokens, heads, head_dim, dtype=dtype, seed=1)
    k = randn(tokens, kv_heads, head_dim, dtype=dtype, seed=2)
    q_ref, k_ref = q.clone(), k.clone()
    rotary_embedding_ref(q_ref, k_ref, pos, cos, sin)
    ops.rotary_embedding(q, k, pos, cos, sin)
    assert_close(q, q_ref, dtype)
    assert_close(k, k_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_strided_views_of_fused_qkv(dtype: torch.dtype) -> None:
    """q and k as views into one [batch, seq, (h + 2 kv) * d] projection (Phi-3 style)."""
    batch, seq, heads, kv, d = 2, 7, 6, 2, 64
    qkv = randn(batch, seq, (heads + 2 * kv) * d, dtype=dtype, seed=3)
    q = qkv[..., : heads * d].view(batch, seq, heads, d)
    k = qkv[..., heads * d:(heads + kv) * d].view(batch, seq, kv, d)
    assert not q.is_contiguous() and not k.is_contiguous()
    cos, sin = tables(64, d)
    pos = torch.arange(3, 3 + seq).repeat(batch, 1)
    expected = qkv.clone()
    rotary_embedding_ref(expected[..., : heads * d].view(batch, seq, heads, d),
                         expected[..., heads * d:(heads + kv) * d].view(batch, seq, kv, d),
                         pos, cos, sin)
    ops.rotary_embedding(q, k, pos, cos, sin)
    assert_close(qkv, expected, dtype)  # v (the last part) must be untouched as well
    assert torch.equal(qkv[..., (heads + kv) * d:], expected[..., (heads + kv) * d:])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_partial_rot_dim_and_no_k(dtype: torch.dtype) -> None:
    q = randn(83, 4, 96, dtype=dtype, seed=4)
    cos, sin = tables(128, 32)  # rotates the first 32 of 96 dims
    pos = positions_for(83, 128, 5)
    q_ref = q.clone()
    rotary_embedding_ref(q_ref, None, pos, cos, sin)
    before = q[..., 32:].clone()
    ops.rotary_embedding(q, None, pos, cos, sin)
    assert_close(q, q_ref, dtype)
    assert torch.equal(q[..., 32:], before)


def test_rotary_position_out_of_table_is_an_error() -> None:
    cos, sin = tables(16, 64)
    q = randn(2, 1, 64)
    with pytest.raises(ValueError, match="position 16 .* outside the cos/sin tables"):
        ops.rotary_embedding(q, None, torch.tensor([0, 16]), cos, sin)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", HIDDEN)
@pytest.mark.parametrize("tokens", TOKENS)
def test_silu_and_mul_matches_reference(tokens: int, width: int, dtype: torch.dtype) -> None:
    gate = randn(tokens, width, dtype=dtype, seed=width) * 4
    up = randn(tokens, width, dtype=dtype, seed=tokens)
    assert_close(ops.silu_and_mul(gate, up), silu_and_mul_ref(gate, up), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_and_mul_halves_of_one_projection(dtype: torch.dtype) -> None:
    gate_up = randn(1, 7, 2 * 1536, dtype=dtype, seed=6) * 3
    gate, up = gate_up.chunk(2, dim=-1)
    out = torch.empty(1, 7, 1536, dtype=dtype)
    assert ops.silu_and_mul(gate, up, out=out) is out
    assert_close(out, silu_and_mul_ref(gate, up), dtype)


def test_silu_extreme_inputs() -> None:
    gate = torch.tensor([[-1000.0, -88.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 88.0, 1000.0] * 3])
    up = torch.ones_like(gate)
    assert_close(ops.silu_and_mul(gate, up), silu_and_mul_ref(gate, up), torch.float32)
