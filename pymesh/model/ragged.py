"""Several sequences' steps through one span as one forward pass (continuous batching).

A worker serving many sessions gets their steps one by one: decode steps of one token,
prefill chunks of many. A decode step is bound by reading the weights, so the rows of
all the steps that are ready together go through every projection and MLP as one
matrix (one GEMM instead of one GEMV per session), while attention stays per sequence,
over its own KV cache and its own length (a ragged batch).

``forward_ragged(span, items)`` takes ``(hidden [1, s_i, hidden], cache_i, start_i)`` per
sequence (each cache made by ``span.new_cache(max_tokens, 1)``, no cache twice) and
returns each sequence's new hidden states, as ``span.forward`` would one at a time: the
same kernels and the same attention per sequence, only the row count of the
projections differs (so results agree to rounding, not bit for bit).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from pymesh.model import ops
from pymesh.model.kv_cache import KVCache
from pymesh.model.shapes import ShapeError

if TYPE_CHECKING:
    from pymesh.model.span import SpanModel

#: a sequence's attention over at most this many rows runs on one thread
SHORT_ROWS = 8

#: one sequence's step: its hidden states ``[1, seq, hidden]``, its cache, its first position
RaggedItem = tuple[torch.Tensor, KVCache, int]


def _check(span: "SpanModel", items: Sequence[RaggedItem]) -> list[int]:
    """Each item's row count (raises ShapeError on a malformed batch)."""
    if not items:
        raise ShapeError("a ragged batch needs at least one sequence")
    hidden_size = span.config.hidden_size
    seen: set[int] = set()
    seqs = []
    for hidden, cache, start in items:
        if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[-1] != hidden_size:
            raise ShapeError(f"each sequence of a ragged batch must be [1, seq, {hidden_size}], "
                             f"got {list(hidden.shape)}")
        if id(cache) in seen:
            raise ShapeError("a ragged batch holds at most one step per KV cache (steps of one "
                             "sequence run in order)")
        seen.add(id(cache))
        cache.check(start, hidden.shape[1], 1)
        seqs.append(int(hidden.shape[1]))
    return seqs


@torch.inference_mode()
def forward_ragged(span: "SpanModel", items: Sequence[RaggedItem]) -> list[torch.Tensor]:
    """Run every item's step through the span in one pass; returns each one's new hidden
    ``[1, seq_i, hidden]`` in the span's dtype, in the order given."""
    seqs = _check(span, items)
    ends = [start + s for (_, _, start), s in zip(items, seqs)]
    span._ensure_rope(max(ends))
    dev, dt = span.device, span.dtype
    residual = torch.cat([h.reshape(-1, h.shape[-1]).to(device=dev, dtype=dt) for h, _, _ in items]).unsqueeze(0)
    if span.blocks:
        positions = torch.cat([span._positions[start:end] for (_, _, start), end in zip(items, ends)])
        offsets = [0]
        for s in seqs:
            offsets.append(offsets[-1] + s)
        cos, sin, eps = span._cos, span._sin, span._eps
        q_size = span.blocks[0].q_size
        attn = torch.empty((1, offsets[-1], q_size), dtype=dt, device=dev)
        # one sequence's attention over a few rows is faster on one thread than waking another
        torch_threads = torch.get_num_threads()
        short = [j for j, s in enumerate(seqs) if s <= SHORT_ROWS]
        long = [j for j, s in enumerate(seqs) if s > SHORT_ROWS]
        x = ops.rms_norm(residual, span.blocks[0].ln_attn, eps)
        for i, block in enumerate(span.blocks):
            if i:
                ops.fused_add_rms_norm(x, residual, block.ln_attn, eps)
            q, k, v = block.qkv(x, positions, cos, sin)
            for group, threads in ((short, 1), (long, torch_threads)):
                if not group:
                    continue
                torch.set_num_threads(threads)
                try:
                    for j in group:
                        (_, cache, start), lo, hi = items[j], offsets[j], offsets[j + 1]
                        attn[:, lo:hi] = block.attend(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi],
                                                      cache.keys[i], cache.values[i], start)
                finally:
                    torch.set_num_threads(torch_threads)
            a = ops.linear(attn, block.w_o, block.b_o)
            ops.fused_add_rms_norm(a, residual, block.ln_mlp, eps)
            x = block.mlp(a)
        residual.add_(x)
    out = []
    row = 0
    for (_, cache, _), s, end in zip(items, seqs, ends):
        if end > cache.length:
            cache.length = end
        out.append(residual[:, row:row + s])
        row += s
    return out
