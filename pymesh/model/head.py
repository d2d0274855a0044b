"""The client's part of the model: token embeddings, final norm and LM head."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from pymesh.model.shapes import ShapeError
from pymesh.model.config import ModelConfig, load_config
from pymesh.model import ops
from pymesh.model.quant import QTensor, Weight
from pymesh.model.weights import open_store

log = logging.getLogger(__name__)


class ClientHead:
    """Embeddings in, float32 logits out; the LM head is the embedding matrix when tied."""

    def __init__(self, config: ModelConfig, embed_tokens: Weight, norm: torch.Tensor,
                 lm_head: Weight, *, device: torch.device, dtype: torch.dtype) -> None:
        self.config = config
        self.embed_tokens = embed_tokens
        self.norm = norm
        self.lm_head = lm_head
        self.device = device
        self.dtype = dtype

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``[batch, seq]`` token ids -> ``[batch, seq, hidden]``."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        if ids.dim() != 2:
            raise ShapeError(f"token ids must be [batch, seq], got shape {list(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ShapeError(f"token ids must lie in 0..{self.config.vocab_size - 1}")
        table = self.embed_tokens
        if isinstance(table, QTensor):
            # Only the looked-up rows are dequantized.
            flat = ids.reshape(-1).cpu()
            rows = QTensor(table.fmt, (flat.numel(), table.in_features), table.data[flat])
            return rows.dequantize(self.dtype).to(self.device).view(*ids.shape, table.in_features)
        return F.embedding(ids, table)

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head over ``hidden`` ``[..., hidden]`` -> float32 ``[..., vocab]``."""
        h = ops.rms_norm(hidden.to(self.dtype).contiguous(), self.norm, self.config.rms_norm_eps)
        return ops.linear(h, self.lm_head).float()

    @torch.no_grad()
    def logits_rows(self, rows: Sequence[torch.Tensor]) -> torch.Tensor:
        """Final norm + LM head over several sessions' last hidden rows (each ``[hidden]``) in
        one pass: ``[len(rows), vocab]`` float32, row ``i`` for ``rows[i]``. One matmul reads
        the LM head once for all rows, where a pass per row reads it once each."""
        size = self.config.hidden_size
        bad = [tuple(r.shape) for r in rows if tuple(r.shape) != (size,)]
        if not rows or bad:
            raise ShapeError(f"logits_rows needs one or more hidden rows of shape [{size}], got "
                             f"{bad or 'none'}")
        x = torch.stack([r.to(device=self.device, dtype=self.dtype) for r in rows])
        return self.logits(x)


#: block format of the embeddings / LM head when ``--quantize`` names any format (as in the
#: GGUF files llama.cpp writes: a 4-bit head costs the most accuracy per byte saved)
HEAD_QUANTIZE = "q8_0"


def load_head(model_dir: str | Path, *, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32, quantize: str | None = None) -> ClientHead:
    """Load only the embeddings, the final norm and the LM head (tied: the embeddings again).
    A GGUF file's quantized embeddings / head stay quantized; ``quantize`` (folders) holds
    them in :data:`HEAD_QUANTIZE`."""
    config = load_config(model_dir)
    dev = torch.device(device)
    v, h = config.vocab_size, config.hidden_size
    q = HEAD_QUANTIZE if quantize else None
    with open_store(model_dir) as store:
        embed = store.get_weight("model.embed_tokens.weight", (v, h), dtype, dev, q)
        norm = store.get("model.norm.weight", (h,), dtype, dev)
        if config.tie_word_embeddings:
            lm_head = embed
        else:
            lm_head = store.get_weight("lm_head.weight", (v, h), dtype, dev, q)
    return ClientHead(config, embed, norm, lm_head, device=dev, dtype=dtype)
