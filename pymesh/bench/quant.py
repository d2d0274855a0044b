"""Accuracy of quantized weights against the same model in float32 (issue 15).

For each prompt the float32 model generates ``--new-tokens`` greedy tokens: the reference
sequence. Each quantized form (``q8_0``/``q4_0``/``q4_1`` computed at load from the float
folder, and the GGUF file as it is when one is given) then

- reads prompt + reference sequence in one forward pass (teacher forcing): the logits at
  every generated position are compared with float32's: max and mean |delta logit| and the
  share of positions whose argmax agrees (``top1_agreement``);
- generates freely from the prompt: ``greedy_prefix`` is how many of its tokens equal the
  reference before the first difference (out of ``new_tokens``).

Each form is compared twice: ``against: float32 folder`` (the original weights: quantization
error plus arithmetic) and ``against: own blocks in fp32`` (its own blocks dequantized and run
through pymesh's float32 path: the quantized kernels' arithmetic alone).

The embedded model's float32 folder holds exactly the GGUF file's values dequantized, so
for it the GGUF row measures the kernels' arithmetic alone (activations, summation order),
and the ``quantized at load`` rows measure re-quantizing those values.

``pymesh bench quant [--json]``; rows: weights, dtype, against, prompts, new_tokens,
max_abs_dlogit, mean_abs_dlogit, top1_agreement, greedy_prefix_mean, greedy_exact.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from pymesh.errors import ConfigError
from pymesh.proto.records import QUANT_LABELS

log = logging.getLogger(__name__)

PROMPTS = (
    "The history of Paris begins with a Celtic tribe, the Parisii, who",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Photosynthesis is the process by which plants",
    "Here is a short story about a robot who learns to paint:",
    "The three laws of thermodynamics state that",
)
TYPES = QUANT_LABELS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", default=None, metavar="DIR",
                        help="float model folder (default: SmolLM2-135M-Instruct from `pymesh model pull`)")
    parser.add_argument("--gguf", default=None, metavar="FILE",
                        help="GGUF file of the same model to compare too (default: the embedded model's file "
                             "when --model-path is not given)")
    parser.add_argument("--types", default="q8_0,q4_1", help="formats computed at load (default %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per prompt (default 64; --quick 16)")
    parser.add_argument("--prompts", type=int, default=None,
                        help=f"how many of the {len(PROMPTS)} prompts (default all; --quick 2)")


def dequantized_twin(model: Any) -> Any:
    """The same model with every quantized matrix dequantized to float32 (the fp32 oracle of
    its own blocks)."""
    import copy

    from pymesh.model.quant import QTensor

    def f(w: Any) -> Any:
        return w.dequantize() if isinstance(w, QTensor) else w

    twin = copy.copy(model)
    twin.span = copy.copy(model.span)
    twin.span.blocks = []
    for b in model.span.blocks:
        nb = copy.copy(b)
        nb.w_qkv, nb.w_o, nb.w_gate_up, nb.w_down = f(b.w_qkv), f(b.w_o), f(b.w_gate_up), f(b.w_down)
        twin.span.blocks.append(nb)
    twin.head = copy.copy(model.head)
    twin.head.embed_tokens, twin.head.lm_head = f(model.head.embed_tokens), f(model.head.lm_head)
    return twin


def compare(ref: Any, model: Any, prompts: list[list[int]], n: int) -> dict[str, Any]:
    """Teacher-forced logit deltas and free-running greedy agreement of ``model`` vs ``ref``."""
    import torch

    from pymesh.model.sampling import SamplingParams

    greedy = SamplingParams(max_new_tokens=n)
    max_d, sum_d, count, agree, total = 0.0, 0.0, 0, 0, 0
    prefixes: list[int] = []
    for ids in prompts:
        want = list(ref.generate_ids(ids, greedy, eos_ids=[]))
        seq = torch.tensor([ids + want[:-1]])
        logits = []
        for m in (ref, model):
            cache = m.span.new_cache(seq.shape[1])
            hidden = m.span.forward(m.head.embed(seq), cache, 0)[0, len(ids) - 1:]
            logits.append(m.head.logits(hidden))
        d = (logits[0] - logits[1]).abs()
        max_d = max(max_d, float(d.max()))
        sum_d += float(d.mean()) * d.shape[0]
        count += d.shape[0]
        agree += int((logits[0].argmax(-1) == logits[1].argmax(-1)).sum())
        total += d.shape[0]
        got = list(model.generate_ids(ids, greedy, eos_ids=[]))
        prefixes.append(next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got))))
    return {"max_abs_dlogit": round(max_d, 4), "mean_abs_dlogit": round(sum_d / max(count, 1), 5),
            "top1_agreement": round(agree / max(total, 1), 4),
            "greedy_prefix_mean": round(sum(prefixes) / len(prefixes), 2),
            "greedy_exact": sum(p == n for p in prefixes)}


def run_rows(args: argparse.Namespace, progress: Any) -> list[dict[str, Any]]:
    from pymesh.bench.generate import model_and_gguf
    from pymesh.model.generate import LocalModel
    from pymesh.model.tokenizer import load_tokenizer
    from pymesh.settings import settings_of

    settings = settings_of(args)
    quick = getattr(args, "quick", False)
    model_dir, gguf = model_and_gguf(args, settings)
    types = [t for t in args.types.split(",") if t]
    for t in types:
        if t not in TYPES:
            raise ConfigError(f"--types: unknown format {t!r}; choose from {', '.join(TYPES)}")
    n = args.new_tokens or (16 if quick else 64)
    count = args.prompts or (2 if quick else len(PROMPTS))
    tokenizer = load_tokenizer(model_dir)
    prompts = [list(tokenizer.encode(p)) for p in PROMPTS[:count]]
    forms: list[tuple[str, str, Path, str | None]] = [(t, "quantized at load", model_dir, t) for t in types]
    if gguf is not None:
        from pymesh.model.fingerprint import quant_label

        forms.append((quant_label(gguf) or "float", "gguf file", gguf, None))
    task = progress.add_task("bench quant", total=2 * len(forms))
    folder = LocalModel.load(model_dir)
    rows = []
    for dtype, weights, path, quantize in forms:
        progress.update(task, description=f"bench quant: {dtype} ({weights})")
        model = LocalModel.load(path, quantize=quantize)
        for against, ref in (("float32 folder", folder), ("own blocks in fp32", dequantized_twin(model))):
            rows.append({"weights": weights, "dtype": dtype, "against": against, "prompts": count,
                         "new_tokens": n, **compare(ref, model, prompts, n)})
            progress.advance(task)
    return rows


def render(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title="quantized weights vs float32, teacher-forced logits and free greedy decoding")
    cols = ("dtype", "weights", "against", "max |dlogit|", "mean |dlogit|", "top-1 agree", "greedy prefix", "exact runs")
    for col in cols:
        table.add_column(col, justify="left" if col in ("dtype", "weights", "against") else "right")
    for r in rows:
        table.add_row(r["dtype"], r["weights"], r["against"], f"{r['max_abs_dlogit']:.3f}", f"{r['mean_abs_dlogit']:.4f}",
                      f"{100 * r['top1_agreement']:.1f}%", f"{r['greedy_prefix_mean']:.1f}/{r['new_tokens']}",
                      f"{r['greedy_exact']}/{r['prompts']}")
    return table
