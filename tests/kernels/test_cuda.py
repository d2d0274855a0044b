"""The CUDA kernels against the reference, on a GPU when there is one."""

from __future__ import annotations

import pytest
import torch

from pymesh import _C
from pymesh.model import ops, ops_ref
from tests.kernels.conftest import DTYPES, assert_close, randn

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine"),
    pytest.mark.skipif(not _C.has_cuda, reason="pymesh._C was built without CUDA kernels"),
]


def cuda(t: torch.Tensor) -> torch.Tensor:
    return t.to("cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,hidden", [(1, 64), (7, 769), (83, 4096), (512, 5125)])
def test_norms_on_cuda(tokens: int, hidden: int, dtype: torch.dtype) -> None:
    x = cuda(randn(tokens, hidden, dtype=dtype, seed=1))
    res = cuda(randn(tokens, hidden, dtype=dtype, seed=2))
    w = cuda(randn(hidden, dtype=dtype, seed=3))
    before = ops.kernel_stats()
    assert_close(ops.rms_norm(x, w, 1e-6), ops_ref.rms_norm_ref(x, w, 1e-6), dtype)
    x_ref, res_ref = x.clone(), res.clone()
    ops_ref.fused_add_rms_norm_ref(x_ref, res_ref, w, 1e-6)
    ops.fused_add_rms_norm(x, res, w, 1e-6)
    torch.testing.assert_close(res, res_ref, rtol=0, atol=0)
    assert_close(x, x_ref, dtype)
    after = ops.kernel_stats()
    assert after["rms_norm"] == before["rms_norm"] + 1
    assert after["fused_add_rms_norm"] == before["fused_add_rms_norm"] + 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 83, 512])
def test_rotary_and_silu_on_cuda(tokens: int, dtype: torch.dtype) -> None:
    d = 128
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.arange(1024, dtype=torch.float32)[:, None] * inv
    cos, sin = cuda(angles.cos().contiguous()), cuda(angles.sin().contiguous())
    pos = cuda(torch.randint(0, 1024, (tokens,)))
    qkv = cuda(randn(tokens, (8 + 2 * 2) * d, dtype=dtype, seed=4))
    q = qkv[:, : 8 * d].view(tokens, 8, d)
    k = qkv[:, 8 * d:10 * d].view(tokens, 2, d)
    expected = qkv.clone()
    ops_ref.rotary_embedding_ref(expected[:, : 8 * d].view(tokens, 8, d),
                                 expected[:, 8 * d:10 * d].view(tokens, 2, d), pos, cos, sin)
    ops.rotary_embedding(q, k, pos, cos, sin)
    assert_close(qkv, expected, dtype)
    gate_up = cuda(randn(tokens, 2 * 1536, dtype=dtype, seed=5) * 3)
    gate, up = gate_up.chunk(2, dim=-1)
    assert_close(ops.silu_and_mul(gate, up), ops_ref.silu_and_mul_ref(gate, up), dtype)


def test_cuda_runs_on_the_current_stream() -> None:
    stream = torch.cuda.Stream()
    x = cuda(randn(64, 4096, seed=6))
    w = cuda(randn(4096, seed=7))
    with torch.cuda.stream(stream):
        out = ops.rms_norm(x, w, 1e-6)
    stream.synchronize()
    assert_close(out, ops_ref.rms_norm_ref(x, w, 1e-6), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("rows,k,n", [(1, 32, 1), (3, 96, 17), (33, 576, 64), (300, 1536, 40)])
def test_qlinear_on_cuda(rows: int, k: int, n: int, qtype: str, dtype: torch.dtype) -> None:
    """The CUDA kernel (float activations) against the dequantize reference on the CPU."""
    from pymesh.model import qops
    from pymesh.model.quant import quantize

    w = quantize(randn(n, k, seed=8), qtype)
    x = randn(rows, k, dtype=dtype, seed=9)
    bias = randn(n, dtype=dtype, seed=10)
    expected = qops.qlinear_ref(x, w, bias)
    before = ops.kernel_stats()["qlinear"]
    got = ops.linear(cuda(x), w.to("cuda"), cuda(bias))
    assert ops.kernel_stats()["qlinear"] == before + 1
    assert got.is_cuda and got.dtype == dtype
    assert_close(got.cpu(), expected, dtype, scale=k ** 0.5)
