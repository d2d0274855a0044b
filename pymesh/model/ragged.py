"""Several sequences' steps through one span as one forward pass (continuous batching).

A worker serving many sessions gets their steps one by one: decode steps of one token,
prefill chunks of many. A decode step is bound by reading the weights, so the rows of
all the steps that are ready together go through every projection and MLP as one
matrix (one GEMM instead of one GEMV per session), while attention stays per sequence,
over its own KV cache and its own length (a ragged batch).

``forward_ragged(span, items)`` takes ``(hidden [1, s_i, hidden], cache_i, start_i)`` per
sequence (each cache made by ``span.new_cache(max_tokens, 1)``, no cache twice) and
returns each sequence's new hidden states, as ``span.forward`` would one at a time: the
same kernels, only the row count of the projections differs (so results agree to
rounding, not bit for bit).

Attention: the decode rows (one token each) go to ``pymesh._C.decode_attention``, one
call per block for all of them (it stores each row's new key and value in its own
cache, then attends over that cache); prefill chunks use torch's attention per
sequence (``Block.attend``). Without the compiled kernels every row takes the torch path.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch

from pymesh.model import ops
from pymesh.model.kv_cache import KVCache
from pymesh.model.shapes import ShapeError

if TYPE_CHECKING:
    from pymesh.model.span import SpanModel

#: one sequence's step: its hidden states ``[1, seq, hidden]``, its cache, its first position
RaggedItem = tuple[torch.Tensor, KVCache, int]

#: a sequence's torch attention over at most this many rows runs on one thread
SHORT_ROWS = 8
#: the decode rows' attention in one kernel call per block (tests turn it off to compare)
USE_KERNEL = True


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


class _DecodeRows:
    """Inputs of the decode-attention kernel for the first ``n`` rows (the one-token steps)."""

    def __init__(self, span: "SpanModel", caches: list[KVCache], positions: torch.Tensor) -> None:
        self.n = len(caches)
        self.ptrs = torch.stack([c.slot_ptrs for c in caches], dim=1).contiguous()  # [blocks, n]
        self.positions = positions[:self.n].contiguous()
        self.limits = torch.tensor([c.max_tokens for c in caches], dtype=torch.int64)
        self.code = ops._DTYPE_CODES[span.dtype]
        self.window = span.config.sliding_window or 0
        self.scale = 1.0 / math.sqrt(span.config.head_dim)

    def attend(self, i: int, q: torch.Tensor, attn: torch.Tensor, heads: int, kv_heads: int, d: int) -> None:
        """Block ``i``: store the rows' k/v and write their attention into ``attn`` rows ``[:n]``."""
        # q is the start of the block's qkv output, contiguous rows [q | k | v]; attn is contiguous
        ops._C.decode_attention(attn.data_ptr(), heads * d, q.data_ptr(), (heads + 2 * kv_heads) * d,
                                self.ptrs[i].data_ptr(), self.positions.data_ptr(), self.limits.data_ptr(),
                                self.n, heads, kv_heads, d, self.window, self.scale, self.code,
                                torch.get_num_threads())


@torch.inference_mode()
def forward_ragged(span: "SpanModel", items: Sequence[RaggedItem]) -> list[torch.Tensor]:
    """Run every item's step through the span in one pass; returns each one's new hidden
    ``[1, seq_i, hidden]`` in the span's dtype, in the order given."""
    seqs = _check(span, items)
    # decode rows first: the kernel takes them as one contiguous run of rows
    kernel = (USE_KERNEL and ops.using_c() and span.device.type == "cpu" and span.dtype in ops._DTYPE_CODES)
    order = sorted(range(len(items)), key=lambda j: seqs[j] != 1) if kernel else list(range(len(items)))
    items = [items[j] for j in order]
    seqs = [seqs[j] for j in order]
    n_dec = sum(1 for s in seqs if s == 1) if kernel else 0
    ends = [start + s for (_, _, start), s in zip(items, seqs)]
    span._ensure_rope(max(ends))
    dev, dt = span.device, span.dtype
    residual = torch.cat([h.reshape(-1, h.shape[-1]).to(device=dev, dtype=dt) for h, _, _ in items]).unsqueeze(0)
    if span.blocks:
        _run_blocks(span, items, seqs, ends, residual, n_dec)
    out: list[torch.Tensor] = [residual] * len(items)
    row = 0
    for j, (_, cache, _), s, end in zip(order, items, seqs, ends):
        if end > cache.length:
            cache.length = end
        out[j] = residual[:, row:row + s]
        row += s
    return out


def _run_blocks(span: "SpanModel", items: list[RaggedItem], seqs: list[int], ends: list[int],
                residual: torch.Tensor, n_dec: int) -> None:
    dt, dev = span.dtype, span.device
    positions = torch.cat([span._positions[start:end] for (_, _, start), end in zip(items, ends)])
    offsets = [0]
    for s in seqs:
        offsets.append(offsets[-1] + s)
    cos, sin, eps = span._cos, span._sin, span._eps
    first = span.blocks[0]
    heads, kv_heads, d = first.heads, first.kv_heads, first.head_dim
    attn = torch.empty((1, offsets[-1], first.q_size), dtype=dt, device=dev)
    dec = _DecodeRows(span, [c for _, c, _ in items[:n_dec]], positions) if n_dec else None
    # one sequence's torch attention over a few rows is faster on one thread than waking another
    torch_threads = torch.get_num_threads()
    rest = range(n_dec, len(items))
    short = [j for j in rest if seqs[j] <= SHORT_ROWS]
    long = [j for j in rest if seqs[j] > SHORT_ROWS]
    x = ops.rms_norm(residual, first.ln_attn, eps)
    for i, block in enumerate(span.blocks):
        if i:
            ops.fused_add_rms_norm(x, residual, block.ln_attn, eps)
        q, k, v = block.qkv(x, positions, cos, sin)
        if dec is not None:
            dec.attend(i, q, attn, heads, kv_heads, d)
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
