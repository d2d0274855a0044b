"""Pure-torch stand-ins for ``pymesh.model.ops``, used only while that module is absent.

Same names and in-place semantics as the fused-op front end, so the runtime can
switch with one import. Nothing here is tuned for speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    if out is None:
        return y
    out.copy_(y)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    residual.add_(x)
    x.copy_(rms_norm(residual, weight, eps))


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor) -> None:
    c = cos[positions].unsqueeze(-2)  # [..., 1, half]
    s = sin[positions].unsqueeze(-2)
    for t in (q, k):
        half = t.shape[-1] // 2
        a = t[..., :half].float().clone()
        b = t[..., half:].float().clone()
        t[..., :half].copy_(a * c - b * s)
        t[..., half:].copy_(b * c + a * s)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    y = F.silu(gate) * up
    if out is None:
        return y
    out.copy_(y)
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)
