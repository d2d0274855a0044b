"""Choosing the next token: greedy by default, or temperature / top-k / top-p sampling.

The order of transformations is transformers': repetition penalty, temperature,
top-k, top-p, then a draw from the remaining distribution with a seeded
``torch.Generator``. ``temperature == 0`` means greedy (argmax after the
repetition penalty). :class:`StopText` holds back streamed text that might be
the start of a stop string, so a stop string is never printed.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pymesh.errors import ConfigError

if TYPE_CHECKING:  # torch is imported lazily: the CLIs add these flags before OpenMP may start
    import torch


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ConfigError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1] (1 = off)")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1 = off)")
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, previous_ids: list[int], penalty: float) -> torch.Tensor:
    """transformers' rule: a seen token's logit is divided by ``penalty`` if positive, else multiplied."""
    if penalty == 1.0 or not previous_ids:
        return logits
    import torch

    ids = torch.tensor(sorted(set(previous_ids)), dtype=torch.long, device=logits.device)
    seen = logits.index_select(-1, ids)
    logits = logits.clone()
    logits.index_copy_(-1, ids, torch.where(seen < 0, seen * penalty, seen / penalty))
    return logits


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest to -inf (k <= 0: unchanged)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    import torch

    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_mask(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``p`` (at least one)."""
    if p >= 1.0:
        return logits
    import torch

    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = (cum - sorted_logits.softmax(-1)) >= p  # mass before this token already reaches p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


class Sampler:
    """Turns one step's float logits ``[vocab]`` into a token id."""

    def __init__(self, params: SamplingParams) -> None:
        import torch

        self._torch = torch
        self.params = params
        self.generator = torch.Generator(device="cpu")
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self.generator.manual_seed(seed)

    def sample(self, logits: torch.Tensor, previous_ids: list[int]) -> int:
        torch = self._torch
        p = self.params
        logits = logits.detach().float().reshape(-1).cpu()
        logits = apply_repetition_penalty(logits, previous_ids, p.repetition_penalty)
        if p.greedy:
            return int(torch.argmax(logits))
        logits = top_p_mask(top_k_mask(logits / p.temperature, p.top_k), p.top_p)
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


class StopText:
    """Streams text while holding back any tail that could begin a stop string.

    ``push(piece)`` returns the text safe to print; ``stopped`` turns true once a
    stop string appears (the text before it is printed, the rest never).
    """

    def __init__(self, stop: list[str]) -> None:
        self.stop = list(stop)
        self.pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        if not self.stop:
            return piece
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        keep = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """``--temperature --top-k --top-p --repetition-penalty --seed --stop`` (shared by generate and client)."""
    g = parser.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); higher = more random")
    g.add_argument("--top-k", type=int, default=0, help="sample only among the K most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling probability mass (1 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="penalise tokens already seen (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (repeatable)")


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    """SamplingParams from parsed flags; ``--max-tokens`` (if the command has it) sets max_new_tokens."""
    kwargs = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  repetition_penalty=args.repetition_penalty, seed=args.seed, stop=list(args.stop or []))
    max_tokens = getattr(args, "max_tokens", None)
    if max_tokens is not None:
        kwargs["max_new_tokens"] = max_tokens
    return SamplingParams(**kwargs)
