"""A contiguous span of transformer blocks ``[start, stop)`` on one device.

``SpanModel.forward(hidden, cache, start_pos)`` takes and returns the residual
stream ``[batch, seq, hidden]``. Inside the span the residual stays in one
buffer and the fused add + RMSNorm joins consecutive blocks; the input tensor is
never modified, so a caller may keep it for replay.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pymesh.errors import ConfigError
from pymesh.model.shapes import ShapeError
from pymesh.model.config import ModelConfig, load_config
from pymesh.model.decode_plan import DecodePlan, plan_supported
from pymesh.model.kv_cache import KVCache
from pymesh.model import ops
from pymesh.model.layers import Block
from pymesh.model.rope import rope_tables
from pymesh.model.quant import Weight, cat_rows
from pymesh.model.weights import TensorStore, open_store, progress_iter

log = logging.getLogger(__name__)


class SpanModel:
    """Blocks ``[start, stop)`` of one model; ``forward`` runs prefill or decode steps."""

    def __init__(self, config: ModelConfig, start: int, stop: int, blocks: list[Block],
                 *, device: torch.device, dtype: torch.dtype) -> None:
        self.config = config
        self.start = start
        self.stop = stop
        self.blocks = blocks
        self.device = device
        self.dtype = dtype
        self._eps = config.rms_norm_eps
        self._rope_len = 0
        self._cos = self._sin = self._positions = torch.empty(0)
        self._ensure_rope(min(config.max_position_embeddings, 4096))

    def _ensure_rope(self, n: int) -> None:
        if n <= self._rope_len:
            return
        size = max(n, 2 * self._rope_len)
        self._cos, self._sin = rope_tables(self.config, size, self.device)
        self._positions = torch.arange(size, dtype=torch.int64, device=self.device)
        self._rope_len = size

    def new_cache(self, max_tokens: int, batch: int = 1) -> KVCache:
        """A zeroed KV cache for ``batch`` sequences of up to ``max_tokens`` positions."""
        self._ensure_rope(max_tokens)
        c = self.config
        return KVCache(len(self.blocks), batch, c.num_key_value_heads, max_tokens, c.head_dim,
                       dtype=self.dtype, device=self.device)

    def cache_bytes_per_token(self) -> int:
        """Bytes of KV cache one position of one sequence takes in this span."""
        c = self.config
        return len(self.blocks) * 2 * c.num_key_value_heads * c.head_dim * torch.empty(0, dtype=self.dtype).element_size()

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, cache: KVCache, start_pos: int) -> torch.Tensor:
        """Run the span on ``hidden`` ``[batch, seq, hidden]`` at positions ``start_pos..``; returns new hidden."""
        if hidden.dim() != 3 or hidden.shape[-1] != self.config.hidden_size:
            raise ShapeError(f"hidden states must be [batch, seq, {self.config.hidden_size}], "
                              f"got {list(hidden.shape)}")
        b, s, _ = hidden.shape
        cache.check(start_pos, s, b)
        end = start_pos + s
        self._ensure_rope(end)
        if s == 1:
            plan = cache.plan
            if plan is None or (plan and plan.span is not self):
                plan = cache.plan = DecodePlan(self, cache) if plan_supported(self, cache) else False
            if plan:
                if hidden.dtype != self.dtype or hidden.device != self.device:
                    hidden = hidden.to(device=self.device, dtype=self.dtype)
                out: torch.Tensor = plan.step(hidden, start_pos)
                if end > cache.length:
                    cache.length = end
                return out
        residual = hidden.to(device=self.device, dtype=self.dtype, copy=True).contiguous()
        if not self.blocks:
            return residual
        positions = self._positions[start_pos:end]
        cos, sin, eps = self._cos, self._sin, self._eps
        keys, values = cache.keys, cache.values
        x = ops.rms_norm(residual, self.blocks[0].ln_attn, eps)
        for i, block in enumerate(self.blocks):
            if i:
                ops.fused_add_rms_norm(x, residual, block.ln_attn, eps)
            a = block.attention(x, keys[i], values[i], start_pos, positions, cos, sin)
            ops.fused_add_rms_norm(a, residual, block.ln_mlp, eps)
            x = block.mlp(a)
        residual.add_(x)
        if end > cache.length:
            cache.length = end
        return residual

    __call__ = forward


def _load_block(store: TensorStore, config: ModelConfig, i: int, dtype: torch.dtype,
                device: torch.device, quantize: str | None = None) -> Block:
    p = f"model.layers.{i}."
    h, q, kv, inter = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size

    def get(name: str, *shape: int) -> torch.Tensor:
        return store.get(p + name, shape, dtype, device)

    def mat(name: str, *shape: int) -> Weight:
        return store.get_weight(p + name, shape, dtype, device, quantize)

    if config.model_type == "phi3":
        # Phi-3 stores q/k/v and gate/up fused, in exactly the row order pymesh runs them.
        w_qkv = mat("self_attn.qkv_proj.weight", q + 2 * kv, h)
        w_gate_up = mat("mlp.gate_up_proj.weight", 2 * inter, h)
    else:
        w_qkv = cat_rows([mat("self_attn.q_proj.weight", q, h), mat("self_attn.k_proj.weight", kv, h),
                          mat("self_attn.v_proj.weight", kv, h)])
        w_gate_up = cat_rows([mat("mlp.gate_proj.weight", inter, h), mat("mlp.up_proj.weight", inter, h)])
    b_qkv = None
    if config.qkv_bias:
        b_qkv = torch.cat([get("self_attn.q_proj.bias", q), get("self_attn.k_proj.bias", kv),
                           get("self_attn.v_proj.bias", kv)])
    return Block(
        config, i,
        w_qkv=w_qkv, b_qkv=b_qkv,
        w_o=mat("self_attn.o_proj.weight", h, q),
        b_o=get("self_attn.o_proj.bias", h) if config.o_bias else None,
        w_gate_up=w_gate_up,
        w_down=mat("mlp.down_proj.weight", h, inter),
        ln_attn=get("input_layernorm.weight", h),
        ln_mlp=get("post_attention_layernorm.weight", h),
    )


def check_span(config: ModelConfig, start: int, stop: int) -> None:
    """ConfigError unless ``[start, stop)`` is a valid span of this model."""
    n = config.num_hidden_layers
    if not (0 <= start <= stop <= n):
        raise ConfigError(f"blocks [{start}, {stop}) do not exist: the model has {n} blocks, numbered 0-{n - 1}")


def load_span(model_dir: str | Path, start: int, stop: int, *, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32, progress: bool = False,
              quantize: str | None = None) -> SpanModel:
    """Load blocks ``[start, stop)`` of the model in ``model_dir`` (a folder or a GGUF file),
    reading only their tensors. Activations and the KV cache are in ``dtype``; weight
    matrices too, unless the file holds them quantized (kept as they are) or ``quantize``
    names a block format to compute them into (folders only)."""
    config = load_config(model_dir)
    check_span(config, start, stop)
    dev = torch.device(device)
    with open_store(model_dir) as store:
        blocks = [_load_block(store, config, i, dtype, dev, quantize)
                  for i in progress_iter(range(start, stop), f"loading blocks {start}-{stop - 1}", progress)]
    log.debug("loaded blocks [%d, %d) of %s as %s on %s", start, stop, model_dir, dtype, dev)
    return SpanModel(config, start, stop, blocks, device=dev, dtype=dtype)
