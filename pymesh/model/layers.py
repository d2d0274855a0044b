"""One Llama-family transformer block, written for a fast decode step.

Weights are pre-fused at load time: q, k and v projections form one matrix (one
GEMV per decode step instead of three) and gate/up form another. Norms, rotary
embedding, SiLU-and-mul and the projections go through the fused-op front end
``pymesh.model.ops`` (which runs its pure-torch reference when ``pymesh._C`` is
missing).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from pymesh.model import ops
from pymesh.model.config import ModelConfig
from pymesh.model.quant import Weight

log = logging.getLogger(__name__)

_sdpa = F.scaled_dot_product_attention


class Block:
    """Weights of one block plus its attention and MLP halves.

    ``w_qkv`` is ``[q_size + 2 * kv_size, hidden]`` (rows q, then k, then v) and
    ``w_gate_up`` is ``[2 * intermediate, hidden]`` (rows gate, then up).
    """

    __slots__ = ("index", "w_qkv", "b_qkv", "w_o", "b_o", "w_gate_up", "w_down", "ln_attn", "ln_mlp",
                 "q_size", "kv_size", "heads", "kv_heads", "head_dim", "group", "inter", "window")

    def __init__(self, config: ModelConfig, index: int, *, w_qkv: Weight, b_qkv: torch.Tensor | None,
                 w_o: Weight, b_o: torch.Tensor | None, w_gate_up: Weight, w_down: Weight,
                 ln_attn: torch.Tensor, ln_mlp: torch.Tensor) -> None:
        self.index = index
        self.w_qkv, self.b_qkv, self.w_o, self.b_o = w_qkv, b_qkv, w_o, b_o
        self.w_gate_up, self.w_down = w_gate_up, w_down
        self.ln_attn, self.ln_mlp = ln_attn, ln_mlp
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.heads, self.kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                    config.head_dim)
        self.group = self.heads // self.kv_heads
        self.inter = config.intermediate_size
        self.window = config.sliding_window

    def attention(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int,
                  positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Self-attention of ``x`` ``[b, s, hidden]`` at positions ``start..start+s-1``; fills the cache."""
        b, s, _ = x.shape
        if b > 1:
            positions = positions.expand(b, s)
        q, k, v = self.qkv(x, positions, cos, sin)
        return ops.linear(self.attend(q, k, v, k_cache, v_cache, start), self.w_o, self.b_o)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[b, s, heads, d]``, k and v ``[b, s, kv_heads, d]`` of ``x``, rotary applied to q and k
        (``positions``: one per token of ``x``)."""
        b, s, _ = x.shape
        q_size, kv_size, d = self.q_size, self.kv_size, self.head_dim
        qkv = ops.linear(x, self.w_qkv, self.b_qkv)
        q = qkv[..., :q_size].view(b, s, self.heads, d)
        k = qkv[..., q_size:q_size + kv_size].view(b, s, self.kv_heads, d)
        v = qkv[..., q_size + kv_size:].view(b, s, self.kv_heads, d)
        ops.rotary_embedding(q, k, positions, cos, sin)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, start: int) -> torch.Tensor:
        """Store k, v at positions ``start..`` of the cache and attend: ``[b, s, q_size]`` (before
        the output projection)."""
        b, s = q.shape[0], q.shape[1]
        q_size, d = self.q_size, self.head_dim
        end = start + s
        k_cache[:, :, start:end].copy_(k.transpose(1, 2))
        v_cache[:, :, start:end].copy_(v.transpose(1, 2))
        window = self.window
        if s == 1:
            # Decode: every cached key up to `end` is visible (within the window), so no mask;
            # grouped-query attention without expanding K/V: a group's query heads become rows.
            lo = 0 if window is None else max(0, end - window)
            out = _sdpa(q.view(b, self.kv_heads, self.group, d), k_cache[:, :, lo:end], v_cache[:, :, lo:end])
            return out.view(b, 1, q_size)
        keys, values = k_cache[:, :, :end], v_cache[:, :, :end]
        qh = q.transpose(1, 2)
        if start == 0 and (window is None or s <= window):
            out = _sdpa(qh, keys, values, is_causal=True, enable_gqa=True)
        else:
            out = _sdpa(qh, keys, values, attn_mask=attention_mask(start, s, window, q.device), enable_gqa=True)
        return out.transpose(1, 2).reshape(b, s, q_size)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU MLP: ``down(silu(gate(x)) * up(x))``."""
        gate_up = ops.linear(x, self.w_gate_up)
        inter = self.inter
        h = ops.silu_and_mul(gate_up[..., :inter], gate_up[..., inter:])
        return ops.linear(h, self.w_down)


def attention_mask(start: int, seq: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean ``[seq, start+seq]`` mask: query i (position start+i) sees keys j <= start+i within the window."""
    q_pos = torch.arange(start, start + seq, device=device)[:, None]
    k_pos = torch.arange(start + seq, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask
