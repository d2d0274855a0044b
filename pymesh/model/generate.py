"""Single-process generation: the baseline the swarm must reproduce token for token.

Step shapes are fixed: one prefill call with the whole prompt, then one token
per step. (Results of float math depend on matrix shapes, so a replay must use
the same shapes to give the same tokens.)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from pymesh.errors import ConfigError
from pymesh.model.config import ModelConfig
from pymesh.model.head import ClientHead, load_head
from pymesh.model.sampling import Sampler, SamplingParams
from pymesh.model.span import SpanModel, load_span
from pymesh.model.torch_setup import parse_dtype

log = logging.getLogger(__name__)


def prompt_ids(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    """Token ids of ``prompt``, through the model's chat template when ``chat``."""
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = list(tokenizer.encode(text, add_special_tokens=False))
    else:
        ids = list(tokenizer.encode(prompt))
    if not ids:
        raise ConfigError("the prompt encodes to no tokens; give a non-empty --prompt")
    return ids


def eos_ids(config: ModelConfig, tokenizer: Any | None) -> list[int]:
    """End-of-sequence ids: the config's and the tokenizer's, merged."""
    return sorted(set(config.eos_token_id) | set(getattr(tokenizer, "eos_token_ids", None) or []))


class LocalModel:
    """A whole model in this process: every block plus the client head."""

    def __init__(self, span: SpanModel, head: ClientHead) -> None:
        self.span = span
        self.head = head
        self.config: ModelConfig = span.config

    @classmethod
    def load(cls, model_dir: str | Path, *, device: str | torch.device = "cpu",
             dtype: str | torch.dtype = torch.float32, progress: bool = False,
             quantize: str | None = None) -> "LocalModel":
        """``model_dir``: a model folder or a GGUF file; ``quantize``: a block format to compute
        a folder's weight matrices in (see :func:`pymesh.model.span.load_span`)."""
        dt = parse_dtype(dtype)
        head = load_head(model_dir, device=device, dtype=dt, quantize=quantize)
        span = load_span(model_dir, 0, head.config.num_hidden_layers, device=device, dtype=dt, progress=progress,
                         quantize=quantize)
        return cls(span, head)

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads: every block's, the final norm and the LM head
        (the embedding table is not read, only the looked-up rows)."""
        from pymesh.model.quant import weight_nbytes

        total = weight_nbytes(self.head.norm) + weight_nbytes(self.head.lm_head)
        for b in self.span.blocks:
            for w in (b.w_qkv, b.b_qkv, b.w_o, b.b_o, b.w_gate_up, b.w_down, b.ln_attn, b.ln_mlp):
                if w is not None:
                    total += weight_nbytes(w)
        return total

    @torch.no_grad()
    def generate_ids(self, ids: Sequence[int], params: SamplingParams, *,
                     eos_ids: Sequence[int] | None = None,
                     stop_check: Callable[[list[int]], bool] | None = None) -> Iterator[int]:
        """Yield up to ``params.max_new_tokens`` new ids; an EOS id is yielded, then generation stops.

        ``stop_check(generated)`` is asked after every token (stop strings); true ends generation.
        """
        ids = list(ids)
        if not ids:
            raise ConfigError("the prompt is empty: at least one token is needed")
        eos = set(self.config.eos_token_id if eos_ids is None else eos_ids)
        total = len(ids) + params.max_new_tokens
        cache = self.span.new_cache(max(total, 1))
        sampler = Sampler(params)
        history = list(ids)
        generated: list[int] = []
        hidden = self.head.embed(torch.tensor([ids]))
        pos = 0
        for _ in range(params.max_new_tokens):
            out = self.span.forward(hidden, cache, pos)
            pos += hidden.shape[1]
            token = sampler.sample(self.head.logits(out[0, -1]), history)
            history.append(token)
            generated.append(token)
            yield token
            if token in eos or (stop_check is not None and stop_check(generated)):
                return
            hidden = self.head.embed(torch.tensor([[token]]))


def generate(model_dir: str | Path, prompt: str | Sequence[int], *, chat: bool = False,
             params: SamplingParams | None = None, device: str | torch.device = "cpu",
             dtype: str | torch.dtype = torch.float32, quantize: str | None = None) -> Iterator[int]:
    """Generate from ``prompt`` (text, or token ids) with the model in ``model_dir``; yields new token ids."""
    params = params or SamplingParams()
    model = LocalModel.load(model_dir, device=device, dtype=dtype, quantize=quantize)
    tokenizer = None
    if isinstance(prompt, str) or params.stop:
        from pymesh.model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(model_dir)
    if isinstance(prompt, str):
        ids = prompt_ids(tokenizer, prompt, chat)
    else:
        ids = [int(i) for i in prompt]
    stop_check = make_stop_check(tokenizer, params.stop) if params.stop else None
    yield from model.generate_ids(ids, params, eos_ids=eos_ids(model.config, tokenizer), stop_check=stop_check)


def make_stop_check(tokenizer: Any, stop: Sequence[str]) -> Callable[[list[int]], bool]:
    """A predicate: has any stop string appeared in the decoded generated text?"""
    stops = list(stop)
    # A character takes at most 4 byte-level tokens, so this tail of tokens holds any stop string.
    tail = 4 * max(len(s) for s in stops) + 8

    def check(generated: list[int]) -> bool:
        text = tokenizer.decode(generated[-tail:])
        return any(s in text for s in stops)

    return check
