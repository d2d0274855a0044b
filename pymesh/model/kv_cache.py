"""A preallocated key/value cache for one span and one or more sessions.

Storage per block is position-major, ``[max_tokens, batch, 2, kv_heads, head_dim]``:
the keys and values of one position for every sequence of the batch are one
contiguous run, exactly the rows a decode step's k/v projection produces, so
that projection can write straight into the cache. ``keys[i]`` / ``values[i]``
are strided views ``[batch, kv_heads, max_tokens, head_dim]`` that
``scaled_dot_product_attention`` reads directly. Keys and values are written by
position, so running a forward pass again over positions already cached (a
replay after a fault) simply overwrites them.
"""

from __future__ import annotations

from typing import Any

import torch

from pymesh.errors import ConfigError
from pymesh.model.shapes import ShapeError


class KVCache:
    """Keys and values of ``num_blocks`` blocks for ``batch`` sequences of up to ``max_tokens``."""

    def __init__(self, num_blocks: int, batch: int, kv_heads: int, max_tokens: int, head_dim: int,
                 *, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        if max_tokens < 1 or batch < 1:
            raise ConfigError(f"KV cache needs max_tokens >= 1 and batch >= 1, got {max_tokens} and {batch}")
        self._kv = torch.zeros((num_blocks, max_tokens, batch, 2, kv_heads, head_dim), dtype=dtype, device=device)
        # Per-block views, built once: indexing in the decode loop costs nothing.
        self.slots: list[torch.Tensor] = list(self._kv.unbind(0))  # [max_tokens, batch, 2, kv_heads, head_dim]
        self.keys: list[torch.Tensor] = [s[:, :, 0].permute(1, 2, 0, 3) for s in self.slots]
        self.values: list[torch.Tensor] = [s[:, :, 1].permute(1, 2, 0, 3) for s in self.slots]
        #: each block's cache address (int64 [num_blocks]): the ragged decode kernel's input
        self.slot_ptrs = torch.tensor([t.data_ptr() for t in self.slots], dtype=torch.int64)
        self.batch = batch
        self.max_tokens = max_tokens
        #: one past the highest position written so far (informational; forward takes start_pos).
        self.length = 0
        #: the span's decode fast path for this cache (built on the first decode step), or False
        self.plan: Any = None

    @property
    def nbytes(self) -> int:
        return self._kv.numel() * self._kv.element_size()

    def check(self, start_pos: int, seq: int, batch: int) -> None:
        """Raise :class:`ShapeError` unless positions ``start_pos .. start_pos+seq-1`` fit."""
        if batch != self.batch:
            raise ShapeError(f"hidden states have batch {batch} but the KV cache was made for batch {self.batch}")
        if start_pos < 0 or seq < 1 or start_pos + seq > self.max_tokens:
            raise ShapeError(f"positions {start_pos}..{start_pos + seq - 1} do not fit a KV cache of "
                              f"{self.max_tokens} tokens; open the session with a larger max_tokens")
