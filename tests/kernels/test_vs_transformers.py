"""The fused ops against transformers' own Llama modules (the project's correctness reference)."""

from __future__ import annotations

import pytest
import torch

from pymesh.model import ops
from tests.kernels.conftest import DTYPES, assert_close, randn

llama = pytest.importorskip("transformers.models.llama.modeling_llama",
                            reason="transformers (a test extra) is not installed")

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_equals_llama_rms_norm(dtype: torch.dtype) -> None:
    norm = llama.LlamaRMSNorm(769, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(randn(769, seed=1))
    x = randn(2, 7, 769, dtype=dtype, seed=2) * 5
    with torch.inference_mode():
        expected = norm(x)
        got = ops.rms_norm(x, norm.weight, 1e-5)
    # Same rounding steps; only the float32 sum of squares may differ in order.
    assert_close(got, expected, dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_equals_apply_rotary_pos_emb(dtype: torch.dtype) -> None:
    batch, seq, heads, kv, d = 2, 9, 6, 2, 64
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.arange(64, dtype=torch.float32)[:, None] * inv
    cos, sin = angles.cos().contiguous(), angles.sin().contiguous()
    pos = torch.arange(5, 5 + seq).repeat(batch, 1)
    q = randn(batch, seq, heads, d, dtype=dtype, seed=3)
    k = randn(batch, seq, kv, d, dtype=dtype, seed=4)
    full_cos = torch.cat((cos, cos), dim=-1)[pos]  # HF layout [batch, seq, d]
    full_sin = torch.cat((sin, sin), dim=-1)[pos]
    q_hf, k_hf = llama.apply_rotary_pos_emb(q.transpose(1, 2).float(), k.transpose(1, 2).float(),
                                            full_cos, full_sin)
    ops.rotary_embedding(q, k, pos, cos, sin)
    assert_close(q, q_hf.transpose(1, 2), dtype)
    assert_close(k, k_hf.transpose(1, 2), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_and_mul_equals_llama_mlp_activation(dtype: torch.dtype) -> None:
    gate = randn(7, 1536, dtype=dtype, seed=5) * 4
    up = randn(7, 1536, dtype=dtype, seed=6)
    act = llama.ACT2FN["silu"]
    assert_close(ops.silu_and_mul(gate, up), act(gate) * up, dtype)
