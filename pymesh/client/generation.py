"""Token generation through the swarm, step for step like ``pymesh.model.generate``.

Same prompt ids, same step shapes (one prefill of the whole prompt, then one token per
step), same sampler, same end conditions (EOS of config and tokenizer, stop strings,
``max_new_tokens``): greedy output equals the single-process run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Sequence

import trio

from pymesh.client.session import InferenceSession
from pymesh.client.swarm import Swarm

if TYPE_CHECKING:
    from pymesh.model.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    tokens: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    route: list[dict[str, Any]] = field(default_factory=list)
    recoveries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.tokens) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


class ClientModel:
    """What the client holds of the model: config, tokenizer, embeddings, final norm, LM head."""

    def __init__(self, model_path: str | Path, *, device: str = "cpu", dtype: str = "float32",
                 model_name: str | None = None) -> None:
        from pymesh.model.fingerprint import model_id
        from pymesh.model.head import load_head
        from pymesh.model.tokenizer import load_tokenizer
        from pymesh.model.torch_setup import parse_dtype

        self.path = Path(model_path)
        self.head = load_head(self.path, device=device, dtype=parse_dtype(dtype))
        self.config = self.head.config
        self.tokenizer = load_tokenizer(self.path)
        self.model_id = model_id(self.path, model_name)

    def prompt_ids(self, prompt: str | Sequence[int], chat: bool) -> list[int]:
        from pymesh.model.generate import prompt_ids

        if isinstance(prompt, str):
            return prompt_ids(self.tokenizer, prompt, chat)
        return [int(i) for i in prompt]

    @property
    def eos_ids(self) -> set[int]:
        return set(self.config.eos_token_id) | set(getattr(self.tokenizer, "eos_token_ids", []) or [])


async def generate_tokens(
    swarm: Swarm,
    model: ClientModel,
    ids: Sequence[int],
    params: SamplingParams,
    *,
    stats: GenerationStats | None = None,
    ignore_eos: bool = False,
) -> AsyncIterator[int]:
    """Yield new token ids for the prompt ``ids`` (an EOS id is yielded, then it stops,
    unless ``ignore_eos``: benchmarks generate a fixed number of tokens)."""
    import torch

    from pymesh.model.generate import make_stop_check
    from pymesh.model.sampling import Sampler

    from pymesh.errors import ConfigError

    ids = list(ids)
    if not ids:
        raise ConfigError("the prompt is empty: at least one token is needed")
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(ids)
    eos = set() if ignore_eos else model.eos_ids
    stop_check = make_stop_check(model.tokenizer, params.stop) if params.stop else None
    sampler = Sampler(params)
    history = list(ids)
    head = model.head
    total = len(ids) + params.max_new_tokens

    def embed(tokens: list[list[int]]) -> "torch.Tensor":
        with torch.inference_mode():
            return head.embed(torch.tensor(tokens)).contiguous()

    def pick(out: "torch.Tensor") -> int:
        with torch.inference_mode():
            return int(sampler.sample(head.logits(out[0, -1]), history))

    def pick_and_embed(out: "torch.Tensor") -> tuple[int, "torch.Tensor"]:
        """Sample the next token and embed it: one trip to the compute thread per token."""
        token = pick(out)
        history.append(token)
        return token, embed([[token]])

    async with InferenceSession(swarm, 0, model.config.num_hidden_layers, max(total, 1)) as session:
        stats.route = [{"peer": str(o.peer), "start": o.start, "stop": o.stop} for o in session.route]
        t0 = time.perf_counter()
        hidden = await trio.to_thread.run_sync(embed, [ids])
        t_decode = t0
        try:
            for i in range(params.max_new_tokens):
                out = await session.step(hidden)
                token, hidden = await trio.to_thread.run_sync(pick_and_embed, out)
                if i == 0:
                    stats.prefill_s = time.perf_counter() - t0
                    t_decode = time.perf_counter()
                stats.tokens.append(token)
                stats.decode_s = time.perf_counter() - t_decode
                yield token
                if token in eos or (stop_check is not None and stop_check(stats.tokens)):
                    return
        finally:
            stats.recoveries = list(session.recoveries)
            stats.route = [{"peer": str(o.peer), "start": o.start, "stop": o.stop} for o in session.route]
