"""Front end of the quantized linear kernels: ``y = x @ dequantize(W)^T + b`` for a
:class:`~pymesh.model.quant.QTensor` ``W``.

:func:`qlinear` is what :func:`pymesh.model.ops.linear` calls for a quantized weight. Until
the compiled kernels cover a case, it runs the pure-torch reference (dequantize, then
``F.linear``), which is also what the kernels are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pymesh.model.quant import QTensor


def qlinear_ref(x: torch.Tensor, weight: QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: dequantize to float32, multiply in float32, return in x's dtype."""
    w = weight.dequantize(torch.float32).to(x.device)
    b = None if bias is None else bias.to(torch.float32)
    return F.linear(x.to(torch.float32), w, b).to(x.dtype)


def kernel_supports(dtype: torch.dtype) -> bool:
    """Whether ``pymesh._C.qlinear`` takes activations of ``dtype`` (the decode plan asks)."""
    return False


def qlinear(x: torch.Tensor, weight: QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., in] @ W^T + bias`` -> ``[..., out]`` in x's dtype."""
    return qlinear_ref(x, weight, bias)
