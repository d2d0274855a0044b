"""pymesh._C.qlinear (csrc/qgemv.cpp) against torch references, on every code path this CPU has.

For q4_0 / q4_1 the CPU kernel quantizes each block of 32 activations to int8 (q = round(x *
127 / amax), scale amax / 127). It is compared tightly with a torch reference that quantizes x
the same way, and loosely with the float32 dequantize reference, within the bound that
quantizing x allows: per block, |x - x_q| <= amax / 254, so |y - y_ref| <= sum_b amax_b / 254 *
sum |w_b|. q8_0 keeps x in float32: tight against the float32 dequantize reference itself.
"""

from __future__ import annotations

from typing import Iterator

import pytest
import torch

from pymesh import _C
from pymesh.model import ops, qops
from pymesh.model.quant import FORMATS, QTensor, quantize
from tests.kernels.conftest import randn

pytestmark = pytest.mark.timeout(300)

ISAS = ["avx512_vnni", "avx2", "generic"]
QTYPES = list(FORMATS)
DTYPES = [torch.float32, torch.bfloat16]
# (rows, in, out): in = 1..64 blocks (odd counts hit the half pair), out small/odd and larger.
CASES = [(1, 32, 1), (2, 64, 3), (5, 96, 17), (1, 576, 17), (7, 576, 64), (32, 1536, 3),
         (33, 2048, 17), (100, 576, 24), (300, 96, 5), (4, 1536, 40)]
OUT_EPS = {torch.float32: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


@pytest.fixture(params=ISAS)
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    name: str = request.param
    _C.qlinear_limit_isa(name)
    try:
        if _C.qlinear_isa() != name:
            pytest.skip(f"this CPU lacks {name} (best path under that cap: {_C.qlinear_isa()})")
        yield name
    finally:
        _C.qlinear_limit_isa("avx512_vnni")


def quantize_x(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, in] as the kernel quantizes it: (x_q * dx as float64, amax per block)."""
    rows, k = x.shape
    xb = x.float().reshape(rows, k // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    # torch.full_like(...) / amax, not 127.0 / amax: that one is reciprocal(amax) * 127 in torch
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    xq = torch.round(xb * inv).clamp(-127, 127)
    dx = amax / 127.0
    return (xq.double() * dx.double()).reshape(rows, k), amax.reshape(rows, k // 32)


def check(y: torch.Tensor, x: torch.Tensor, w: QTensor, bias: torch.Tensor | None) -> None:
    """y against the quantized-x reference (tight) and the float32 reference (bound)."""
    wd = w.dequantize().double()
    b = 0.0 if bias is None else bias.double()
    xd, amax = quantize_x(x)
    if w.qtype == "q8_0":  # float activations: the quantized-x reference is the float one
        xd, amax = x.double(), torch.zeros_like(amax)
    exact = xd @ wd.T + b
    scale = xd.abs() @ wd.abs().T + (0.0 if bias is None else bias.double().abs())
    tol = 1e-5 * scale + exact.abs() * OUT_EPS[y.dtype] + 1e-6
    err = (y.double() - exact).abs()
    assert (err <= tol).all(), f"max error {err.max().item():.3g} vs quantized-x reference"
    full = x.double() @ wd.T + b
    step = (amax.double() / 254).repeat_interleave(32, dim=1) @ wd.abs().T
    assert ((y.double() - full).abs() <= step + tol).all(), "error beyond x's quantization step"


def run(x: torch.Tensor, w: QTensor, bias: torch.Tensor | None, stride: int | None = None) -> torch.Tensor:
    rows, k = x.shape
    y = torch.empty(rows, w.out_features, dtype=x.dtype)
    _C.qlinear(y.data_ptr(), x.data_ptr(), k if stride is None else stride, w.data_ptr(),
               0 if bias is None else bias.data_ptr(), rows, k, w.out_features, w.fmt.code,
               ops._DTYPE_CODES[x.dtype], 2)
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qtype", QTYPES)
def test_kernel_matches_references(isa: str, qtype: str, dtype: torch.dtype) -> None:
    for i, (rows, k, n) in enumerate(CASES):
        w = quantize(randn(n, k, seed=i), qtype)
        bias = randn(n, dtype=dtype, seed=100 + i) if i % 2 else None
        wide = randn(rows, k + 40, dtype=dtype, seed=200 + i)  # rows of x 40 elements apart
        x = wide[:, 3:3 + k]
        check(run(x, w, bias, stride=k + 40), x, w, bias)


@pytest.mark.parametrize("qtype", QTYPES)
def test_every_row_count_up_to_33(isa: str, qtype: str) -> None:
    w = quantize(randn(17, 96, seed=1), qtype)
    for rows in range(1, 34):
        x = randn(rows, 96, seed=rows)
        check(run(x, w, None), x, w, None)


def test_lm_head_shape() -> None:
    """SmolLM2's head (49152 x 576, q8_0): every output row, one and three rows of x."""
    w = quantize(randn(49152, 576, seed=3) * 0.05, "q8_0")
    for rows in (1, 3):
        x = randn(rows, 576, seed=rows)
        check(run(x, w, None), x, w, None)


def test_zero_and_tiny_blocks() -> None:
    """A block of zeros quantizes to scale 0 (no 0/0); a huge block next to it stays exact."""
    w = quantize(randn(5, 128, seed=4), "q4_1")
    x = torch.zeros(2, 128)
    x[0, 32:64] = randn(32, seed=5) * 1e4
    x[1, 96:] = 1e-30
    check(run(x, w, None), x, w, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_front_end(dtype: torch.dtype) -> None:
    w = quantize(randn(24, 64, seed=6), "q4_0")
    bias = randn(24, dtype=dtype, seed=7)
    x = randn(2, 3, 64, dtype=dtype, seed=8)
    before = ops.kernel_stats()["qlinear"]
    y = ops.linear(x, w, bias)
    assert y.shape == (2, 3, 24) and y.dtype == dtype
    assert ops.kernel_stats()["qlinear"] == before + 1
    check(y.reshape(6, 24), x.reshape(6, 64), w, bias)
    # a non-contiguous x (transposed leading dims) and an expanded one give the same numbers
    xt = x.transpose(0, 1)
    torch.testing.assert_close(qops.qlinear(xt, w, bias), qops.qlinear(xt.contiguous(), w, bias))
    xe = x[:1, :1].expand(2, 3, 64)
    torch.testing.assert_close(qops.qlinear(xe, w), qops.qlinear(xe.contiguous(), w))
    assert qops.qlinear(torch.empty(0, 64, dtype=dtype), w).shape == (0, 24)
    assert qops.kernel_supports(dtype)


def test_front_end_rejects_mismatches() -> None:
    w = quantize(randn(24, 64, seed=9), "q8_0")
    with pytest.raises(ops.KernelInputError, match="in_features 64"):
        qops.qlinear(torch.zeros(2, 32), w)
    with pytest.raises(ops.KernelInputError, match="bias must have shape"):
        qops.qlinear(torch.zeros(2, 64), w, torch.zeros(23))
    with pytest.raises(ops.KernelInputError, match="convert it"):
        qops.qlinear(torch.zeros(2, 64), w, torch.zeros(24, dtype=torch.bfloat16))
    with pytest.raises(ops.KernelInputError, match="QTensor"):
        qops.qlinear(torch.zeros(2, 64), torch.zeros(24, 64))  # type: ignore[arg-type]
    with pytest.raises(ops.KernelInputError, match="does not match"):
        qops.qlinear(torch.tensor(1.0), w)
    # float64 has no kernel: the reference answers
    x64 = randn(2, 64, seed=10).double()
    torch.testing.assert_close(qops.qlinear(x64, w), qops.qlinear_ref(x64, w))
    assert not qops.kernel_supports(torch.float64)


def test_kernel_rejects_bad_arguments() -> None:
    w = quantize(randn(4, 64, seed=11), "q4_0")
    x, y = torch.zeros(2, 64), torch.zeros(2, 4)
    args = dict(y=y.data_ptr(), x=x.data_ptr(), x_stride=64, w=w.data_ptr(), bias=0, rows=2,
                in_features=64, out_features=4, qtype=1, dtype=0)
    for bad, what in [({"qtype": 3}, "block type"), ({"in_features": 48}, "multiple of 32"),
                      ({"rows": 0}, "rows"), ({"x_stride": 32}, "stride"), ({"dtype": 7}, "dtype")]:
        with pytest.raises(ValueError, match=what):
            _C.qlinear(**{**args, **bad})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown path"):
        _C.qlinear_limit_isa("sse")


def test_require_c_makes_reference_fallback_loud(monkeypatch: pytest.MonkeyPatch) -> None:
    """With autograd on, a CPU case the kernel takes cannot run it: under PYMESH_REQUIRE_C it fails."""
    monkeypatch.setattr(ops.SWITCHES, "require_c", True)
    w = quantize(randn(8, 64, seed=12), "q4_1")
    x = randn(1, 64, seed=13).requires_grad_(True)
    with torch.enable_grad(), pytest.raises(ops.KernelUnavailableError, match="qlinear"):
        qops.qlinear(x, w)
    monkeypatch.setattr(ops, "_C", None)
    with pytest.raises(ops.KernelUnavailableError, match="qlinear"):
        qops.qlinear(x.detach(), w)


def test_bench_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """`pymesh bench kernels --ops qlinear` rows: each type beside the float32 linear (small shapes)."""
    from rich.console import Console

    from pymesh.bench import kernels
    from tests.kernels.test_bench import run_quick

    monkeypatch.setattr(kernels, "QLINEAR_SHAPES", ((48, 64), (24, 96)))
    monkeypatch.setattr(kernels, "QLINEAR_HEAD", (40, 64))
    rows = run_quick("qlinear")
    assert {r["qtype"] for r in rows} == set(FORMATS)
    assert {r["tokens"] for r in rows} == {1, 32}
    assert {(r["out"], r["hidden"]) for r in rows if r["qtype"] == "q4_1"} == {(48, 64), (24, 96)}
    for r in rows:
        assert r["speedup"] is None  # not a fused-op goal: vs_fp32 instead (the key is in every row)
        assert r["vs_fp32"] == pytest.approx(r["ref_us"] / r["fused_us"], rel=0.02, abs=0.01)
        assert r["gbps"] >= 0 and r["read_ceiling_gbps"] > 0
    console = Console(record=True, width=200)
    console.print(kernels.render(rows))
    assert "w q4_1" in console.export_text()
    w = kernels.random_qtensor(8, 64, "q4_1", torch.Generator().manual_seed(0))
    assert torch.isfinite(w.dequantize()).all()
