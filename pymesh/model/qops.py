"""Front end of the quantized linear kernels: ``y = x @ dequantize(W)^T + b`` for a
:class:`~pymesh.model.quant.QTensor` ``W``.

:func:`qlinear` is what :func:`pymesh.model.ops.linear` calls for a quantized weight. It checks
shapes, devices and dtypes (a mismatch is a :class:`~pymesh.model.ops.KernelInputError`), then
runs ``pymesh._C.qlinear`` on CPU (csrc/qgemv.cpp: activations quantized to int8 per block of
32, integer dot products; any number of rows) or ``pymesh._C.cuda.qlinear`` on a GPU
(csrc/qgemv.cu, float activations). Where no kernel exists (float64 activations, other
devices, a build without it, autograd) the pure-torch reference :func:`qlinear_ref` runs;
under ``PYMESH_REQUIRE_C=1`` a CPU or CUDA case the kernel should take is an error instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pymesh.model import ops
from pymesh.model.quant import QTensor


def qlinear_ref(x: torch.Tensor, weight: QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: dequantize to float32, multiply in float32, return in x's dtype."""
    w = weight.dequantize(torch.float32).to(x.device)
    b = None if bias is None else bias.to(torch.float32)
    return F.linear(x.to(torch.float32), w, b).to(x.dtype)


def kernel_supports(dtype: torch.dtype) -> bool:
    """Whether ``pymesh._C.qlinear`` takes activations of ``dtype`` (the decode plan asks)."""
    return ops._C is not None and hasattr(ops._C, "qlinear") and dtype in ops._DTYPE_CODES


def _check(x: torch.Tensor, weight: QTensor, bias: torch.Tensor | None) -> None:
    if not isinstance(weight, QTensor):
        raise ops.KernelInputError(f"qlinear: weight must be a QTensor, got {type(weight).__name__}")
    if x.dim() == 0 or x.shape[-1] != weight.in_features:
        raise ops.KernelInputError(
            f"qlinear: x {tuple(x.shape)} does not match the {weight.qtype} weight "
            f"{weight.shape}: x.shape[-1] must equal in_features {weight.in_features}")
    if x.device != weight.device:
        raise ops.KernelInputError(
            f"qlinear: x is on {x.device} but the weight is on {weight.device}; move them to one device")
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != weight.out_features:
            raise ops.KernelInputError(
                f"qlinear: bias must have shape ({weight.out_features},), got {tuple(bias.shape)}")
        if bias.device != x.device or bias.dtype != x.dtype:
            raise ops.KernelInputError(
                f"qlinear: bias is {bias.dtype} on {bias.device} but x is {x.dtype} on {x.device}; "
                f"convert it with .to(x)")


def qlinear(x: torch.Tensor, weight: QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., in] @ W^T + bias`` -> ``[..., out]`` in x's dtype."""
    _check(x, weight, bias)
    code = ops._DTYPE_CODES.get(x.dtype)
    if code is None or x.device.type not in ("cpu", "cuda"):
        return qlinear_ref(x, weight, bias)
    backend = ops._backend("qlinear", x, bias)
    if backend is None:
        return qlinear_ref(x, weight, bias)
    if not hasattr(backend, "qlinear"):
        ops._fallback("qlinear", "pymesh._C is a stale build without qlinear (rebuild it)")
        return qlinear_ref(x, weight, bias)
    k, n = weight.in_features, weight.out_features
    rows = x.numel() // k
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    try:
        _, stride = ops._rows("qlinear", "x", x)
    except ops.KernelInputError:  # rows that do not flatten to one stride: copy them
        x, stride = x.contiguous(), k
    if rows > 1 and stride < k:  # overlapping rows (an expanded x): the kernel needs them apart
        x, stride = x.contiguous(), k
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    w = weight.contiguous()
    ops._launch(backend, "qlinear", x, out.data_ptr(), x.data_ptr(), stride, w.data_ptr(),
                0 if bias is None else bias.data_ptr(), rows, k, n, w.fmt.code, code)
    ops._stats["qlinear"] += 1
    return out
