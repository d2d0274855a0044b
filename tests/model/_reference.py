"""Helpers comparing pymesh with transformers: reference greedy decoding and token equality."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

#: a differing greedy token is acceptable only where the reference's top-2 logit gap is below this
NEAR_TIE = 1e-3


def load_reference(model_dir: Path, dtype: torch.dtype = torch.float32) -> Any:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


@torch.no_grad()
def reference_logits(model: Any, ids: Sequence[int]) -> torch.Tensor:
    """transformers' float32 logits ``[seq, vocab]`` for one prompt."""
    return model(torch.tensor([list(ids)])).logits[0].float()


@torch.no_grad()
def reference_greedy(model: Any, ids: Sequence[int], n: int) -> tuple[list[int], list[float]]:
    """n greedy tokens from transformers (its own KV cache, no EOS stop), and each step's top-2 logit gap."""
    out = model(torch.tensor([list(ids)]), use_cache=True)
    tokens: list[int] = []
    gaps: list[float] = []
    for _ in range(n):
        logits = out.logits[0, -1].float()
        top2 = torch.topk(logits, 2).values
        gaps.append(float(top2[0] - top2[1]))
        tokens.append(int(torch.argmax(logits)))
        out = model(torch.tensor([[tokens[-1]]]), cache=out.cache, use_cache=True)
    return tokens, gaps


def assert_same_tokens(ours: Sequence[int], ref: Sequence[int], gaps: Sequence[float]) -> None:
    """Greedy ids must be equal up to the first near tie of the reference (which the test checks)."""
    assert len(ours) == len(ref), f"pymesh gave {len(ours)} tokens, transformers {len(ref)}"
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            assert gaps[i] < NEAR_TIE, (
                f"token {i} differs (pymesh {a}, transformers {b}) and the reference's top-2 gap "
                f"{gaps[i]:.2e} is not a near tie; pymesh {list(ours)} vs transformers {list(ref)}")
            return  # after a legitimate divergence the continuations differ
