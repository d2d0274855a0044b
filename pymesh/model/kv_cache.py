"""A preallocated key/value cache for one span and one or more sessions.

Layout per block: ``[batch, kv_heads, max_tokens, head_dim]`` — the shape
``scaled_dot_product_attention`` reads directly. Keys and values are written by
position, so running a forward pass again over positions already cached (a
replay after a fault) simply overwrites them.
"""

from __future__ import annotations

import torch

from pymesh.errors import ConfigError


class KVCache:
    """Keys and values of ``num_blocks`` blocks for ``batch`` sequences of up to ``max_tokens``."""

    def __init__(self, num_blocks: int, batch: int, kv_heads: int, max_tokens: int, head_dim: int,
                 *, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        if max_tokens < 1 or batch < 1:
            raise ConfigError(f"KV cache needs max_tokens >= 1 and batch >= 1, got {max_tokens} and {batch}")
        shape = (num_blocks, batch, kv_heads, max_tokens, head_dim)
        self._k = torch.zeros(shape, dtype=dtype, device=device)
        self._v = torch.zeros(shape, dtype=dtype, device=device)
        # Per-block views, built once: indexing in the decode loop costs nothing.
        self.keys: list[torch.Tensor] = list(self._k.unbind(0))
        self.values: list[torch.Tensor] = list(self._v.unbind(0))
        self.batch = batch
        self.max_tokens = max_tokens
        #: one past the highest position written so far (informational; forward takes start_pos).
        self.length = 0

    @property
    def nbytes(self) -> int:
        return self._k.numel() * self._k.element_size() * 2

    def check(self, start_pos: int, seq: int, batch: int) -> None:
        """Raise ConfigError unless positions ``start_pos .. start_pos+seq-1`` fit."""
        if batch != self.batch:
            raise ConfigError(f"hidden states have batch {batch} but the KV cache was made for batch {self.batch}")
        if start_pos < 0 or seq < 1 or start_pos + seq > self.max_tokens:
            raise ConfigError(f"positions {start_pos}..{start_pos + seq - 1} do not fit a KV cache of "
                              f"{self.max_tokens} tokens; open the session with a larger max_tokens")
