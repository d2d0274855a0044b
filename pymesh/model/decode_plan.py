"""The decode fast path: one token per sequence through a span with almost no Python.

A decode step has fixed shapes, so everything the fused-op front end checks on
every call (devices, dtypes, shapes, strides) is checked once here, when the
plan is built for a (span, cache) pair. Buffers are preallocated and the step is
a flat list of ``pymesh._C`` calls on raw pointers, plus one
``scaled_dot_product_attention`` per block:

- the q projection writes into a fixed buffer; the k/v projection writes straight
  into the cache slot of the current position (the cache is position-major, see
  :mod:`pymesh.model.kv_cache`), so no copy moves keys or values;
- rotary embedding rotates q in its buffer and k in the cache;
- fused add + RMSNorm joins attention, MLP and the next block.

The kernels are the same ones the checked path (``SpanModel`` through
``pymesh.model.ops``) calls, with the same arguments, so both paths give the same
numbers; ``PYMESH_FAST_DECODE=0`` turns the plan off.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from pymesh.model.kv_cache import KVCache
from pymesh.model import ops, qops
from pymesh.model.quant import QTensor, Weight
from pymesh.model.switches import SWITCHES

if TYPE_CHECKING:
    from pymesh.model.span import SpanModel

log = logging.getLogger(__name__)

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else int(t.data_ptr())


def _wref(w: Weight) -> tuple[int, int]:
    """A weight as the plan calls it: (address, block-format code, -1 for a float matrix)."""
    return (w.data_ptr(), w.fmt.code) if isinstance(w, QTensor) else (int(w.data_ptr()), -1)


def _weights_supported(span: "SpanModel") -> bool:
    ws = [w for b in span.blocks for w in (b.w_qkv, b.w_o, b.w_gate_up, b.w_down)]
    if not all(w.is_contiguous() for w in ws):
        return False
    quantized = [w for w in ws if isinstance(w, QTensor)]
    return not quantized or (hasattr(ops._C, "qlinear") and qops.kernel_supports(span.dtype))


def fast_decode_enabled() -> bool:
    """``PYMESH_FAST_DECODE`` as the CLI set it (pymesh.model.switches)."""
    return SWITCHES.fast_decode


def plan_supported(span: "SpanModel", cache: KVCache) -> bool:
    """Whether the compiled kernels can run this span's decode steps on this cache."""
    return (fast_decode_enabled() and ops.using_c()
            and span.device.type == "cpu" and span.dtype in _DTYPE_CODES
            and 1 <= cache.batch <= ops.LINEAR_MAX_ROWS and bool(span.blocks)
            and _weights_supported(span))


class DecodePlan:
    """Preallocated buffers and pointers for seq-1 steps of ``span`` on ``cache``."""

    def __init__(self, span: "SpanModel", cache: KVCache) -> None:
        c = span.config
        b = cache.batch
        dt = span.dtype
        self.span, self.cache = span, cache
        self.code = _DTYPE_CODES[dt]
        self.es = torch.empty(0, dtype=dt).element_size()
        self.b, self.hidden, self.q, self.kv, self.inter = b, c.hidden_size, c.q_size, c.kv_size, c.intermediate_size
        self.heads, self.kv_heads, self.d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.eps = c.rms_norm_eps
        self.window = c.sliding_window

        def new(n: int) -> torch.Tensor:
            return torch.zeros((b, n), dtype=dt, device=span.device)

        self.residual = new(self.hidden)
        self.x = new(self.hidden)       # MLP output, then (fused) the next block's normed input
        self.o = new(self.hidden)       # attention output, then (fused) the MLP's normed input
        self.qbuf = new(self.q)
        self.gate_up = new(2 * self.inter)
        self.act = new(self.inter)
        self.positions = torch.zeros(b, dtype=torch.int64, device=span.device)
        # SDPA query view: for one token, a KV group's query heads become the rows.
        self.q_view = self.qbuf.view(b, self.kv_heads, self.heads // self.kv_heads, self.d)
        self.slot_bytes = b * 2 * self.kv * self.es  # one position of one block's cache
        self.slot_base = [s.data_ptr() for s in cache.slots]
        # One sequence: one q/k/v GEMV into a row [q | k | v] and the decode-attention kernel,
        # which stores k/v in the cache and attends (what a batched step's decode rows run);
        # a batch of sequences: q and k/v GEMVs (k/v straight into the cache slot) and SDPA.
        self.fused = b == 1 and hasattr(ops._C, "decode_attention")
        if self.fused:
            self.qkv = new(self.q + 2 * self.kv)
            self.attn = new(self.q)
            self.limits = torch.tensor([cache.max_tokens], dtype=torch.int64)
            self.scale = 1.0 / math.sqrt(self.d)
        self.weights: list[tuple[Any, ...]] = []
        for blk in span.blocks:
            if self.fused:
                qkv_refs: tuple[Any, ...] = (_wref(blk.w_qkv), _ptr(blk.b_qkv), None, 0)
            else:
                b_q = b_kv = None
                if blk.b_qkv is not None:
                    b_q, b_kv = blk.b_qkv[: self.q], blk.b_qkv[self.q:]
                qkv_refs = (_wref(blk.w_qkv[: self.q]), _ptr(b_q), _wref(blk.w_qkv[self.q:]), _ptr(b_kv))
            self.weights.append((_ptr(blk.ln_attn), *qkv_refs, _wref(blk.w_o), _ptr(blk.b_o), _ptr(blk.ln_mlp),
                                 _wref(blk.w_gate_up), _wref(blk.w_down)))
        self._keep = span.blocks  # the pointers above are into these tensors
        #: the single-sequence loop as one kernel call (csrc/decode_span.cpp): one GIL release a
        #: token instead of nine a block, so a worker's event loop cannot stall the step
        self.table: torch.Tensor | None = None
        if self.fused and hasattr(ops._C, "decode_span") and SWITCHES.span_kernel:
            rows = [(ln_a, w_q[0], w_q[1], b_q, w_o[0], w_o[1], b_o, ln_m, w_gu[0], w_gu[1], w_dn[0], w_dn[1])
                    for ln_a, w_q, b_q, _, _, w_o, b_o, ln_m, w_gu, w_dn in self.weights]
            self.table = torch.tensor(rows, dtype=torch.int64)
            assert self.table.shape[1] == ops._C.decode_span_columns()

    def step(self, hidden: torch.Tensor, pos: int) -> torch.Tensor:
        """One token per sequence at position ``pos``: ``hidden`` ``[b, 1, hidden]`` -> new hidden."""
        threads = torch.get_num_threads()
        if threads == 1:
            return self._step(hidden, pos, 1)
        # The kernels get the thread count explicitly; torch's own ops here (one tiny attention per
        # block) are faster on one thread than waking a sleeping (PASSIVE) second one.
        torch.set_num_threads(1)
        try:
            return self._step(hidden, pos, threads)
        finally:
            torch.set_num_threads(threads)

    def _step(self, hidden: torch.Tensor, pos: int, threads: int) -> torch.Tensor:
        _C = ops._C
        span, cache = self.span, self.cache
        b, h, q, kv, inter, d = self.b, self.hidden, self.q, self.kv, self.inter, self.d
        code, eps, es = self.code, self.eps, self.es
        self.residual.copy_(hidden.view(b, h))
        self.positions.fill_(pos)
        pos_ptr = self.positions.data_ptr()
        cos, sin = span._cos, span._sin
        cos_ptr, sin_ptr, rot_half, max_pos = cos.data_ptr(), sin.data_ptr(), cos.shape[1], cos.shape[0]
        res, x, o, qb = self.residual.data_ptr(), self.x.data_ptr(), self.o.data_ptr(), self.qbuf.data_ptr()
        gu, act = self.gate_up.data_ptr(), self.act.data_ptr()
        lo = 0 if self.window is None else max(0, pos + 1 - self.window)
        end = pos + 1
        kv_off = pos * self.slot_bytes
        linear = _C.linear
        qlinear: Any = getattr(_C, "qlinear", None)  # present whenever a weight is quantized (plan_supported)

        def lin(y: int, xp: int, ldx: int, w: tuple[int, int], bias: int, n_in: int, n_out: int) -> None:
            if w[1] < 0:
                linear(y, xp, ldx, w[0], bias, b, n_in, n_out, code, threads)
            else:
                qlinear(y, xp, ldx, w[0], bias, b, n_in, n_out, w[1], code, threads)

        _C.rms_norm(x, h, res, h, self.weights[0][0], b, h, eps, code, threads)
        sdpa, q_view, keys, values = F.scaled_dot_product_attention, self.q_view, cache.keys, cache.values
        fused, heads, kv_heads, row = self.fused, self.heads, self.kv_heads, q + 2 * kv
        if fused:
            qkv, attn_ptr, lim_ptr = self.qkv.data_ptr(), self.attn.data_ptr(), self.limits.data_ptr()
            slots, window, scale = cache.slot_ptrs.data_ptr(), self.window or 0, self.scale
        if self.table is not None:
            _C.decode_span(self.table.data_ptr(), len(self.weights), x, res, o, qkv, attn_ptr, gu, act, slots,
                           pos_ptr, lim_ptr, cos_ptr, sin_ptr, h, q, kv, inter, d, heads, kv_heads, 2 * rot_half,
                           max_pos, window, scale, eps, es, code, threads)
            return torch.add(self.residual, self.x).view(b, 1, h)
        for i, (ln_a, w_q, b_q, w_kv, b_kv, w_o, b_o, ln_m, w_gu, w_dn) in enumerate(self.weights):
            if i:
                _C.fused_add_rms_norm(x, h, res, h, ln_a, b, h, eps, code, threads)
            if fused:  # w_q, b_q: the whole q/k/v projection
                lin(qkv, x, h, w_q, b_q, h, row)
                _C.rotary_embedding(qkv, row, d, heads, qkv + q * es, row, d, kv_heads, d, pos_ptr, 1,
                                    cos_ptr, sin_ptr, 2 * rot_half, max_pos, code, threads)
                _C.decode_attention(attn_ptr, q, qkv, row, slots + 8 * i, pos_ptr, lim_ptr, 1, heads, kv_heads, d,
                                    window, scale, code, threads)
            else:
                slot = self.slot_base[i] + kv_off
                lin(qb, x, h, w_q, b_q, h, q)
                lin(slot, x, h, w_kv, b_kv, h, 2 * kv)
                _C.rotary_embedding(qb, q, d, heads, slot, 2 * kv, d, kv_heads, d, pos_ptr, b,
                                    cos_ptr, sin_ptr, 2 * rot_half, max_pos, code, threads)
                attn = sdpa(q_view, keys[i][:, :, lo:end], values[i][:, :, lo:end])
                if not attn.is_contiguous():
                    attn = attn.contiguous()
                attn_ptr = attn.data_ptr()
            lin(o, attn_ptr, q, w_o, b_o, q, h)
            _C.fused_add_rms_norm(o, h, res, h, ln_m, b, h, eps, code, threads)
            lin(gu, o, h, w_gu, 0, h, 2 * inter)
            _C.silu_and_mul(act, inter, gu, 2 * inter, gu + inter * es, 2 * inter, b, inter, code, threads)
            lin(x, act, inter, w_dn, 0, inter, h)
        return torch.add(self.residual, self.x).view(b, 1, h)
