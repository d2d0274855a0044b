"""Pure-torch reference of every fused op in ``pymesh.model.ops``.

These are what the kernels are tested against, and the fallback when
``pymesh._C`` is missing. Rounding mirrors Hugging Face ``transformers``:
RMSNorm normalises in float32, casts to the input dtype, then multiplies by the
weight in that dtype; SiLU is rounded to the dtype before the multiply. Rotary
embedding is computed in float32 and rounded once per element.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "rms_norm_ref",
    "fused_add_rms_norm_ref",
    "rotary_embedding_ref",
    "silu_and_mul_ref",
    "linear_ref",
]


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x^2) + eps))`` over the last dim, rounded like HF."""
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(x.dtype)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> None:
    """In place: ``residual += x``, then ``x = rms_norm(residual) * weight``."""
    residual.add_(x)
    x.copy_(rms_norm_ref(residual, weight, eps))


def rotary_embedding_ref(q: torch.Tensor, k: torch.Tensor | None, positions: torch.Tensor,
                         cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate-half rotary embedding in place on ``q`` and ``k``.

    ``q`` is ``[..., heads, head_dim]`` whose leading dims flatten to
    ``positions.numel()`` tokens; ``cos``/``sin`` are float32
    ``[max_pos, rot_dim // 2]``; the first ``rot_dim`` elements of each head rotate.
    """
    flat_pos = positions.reshape(-1)
    c = cos.index_select(0, flat_pos)[:, None, :]
    s = sin.index_select(0, flat_pos)[:, None, :]
    half = cos.shape[-1]
    tokens = flat_pos.numel()
    for t in (q, k):
        if t is None:
            continue
        rows = t.reshape(tokens, t.shape[-2], t.shape[-1])  # a view when the layout allows
        x1 = rows[..., :half].to(torch.float32)
        x2 = rows[..., half:2 * half].to(torch.float32)
        rotated = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(t.dtype)
        t[..., :2 * half] = rotated.reshape(*t.shape[:-1], 2 * half)


def silu_and_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, SiLU rounded to the dtype first (as HF's MLP does)."""
    return F.silu(gate) * up


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
               ) -> torch.Tensor:
    """``x @ weight.T + bias`` (torch's own linear)."""
    return F.linear(x, weight, bias)
