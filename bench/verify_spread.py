"""How far honest workers' outputs for one span differ: the data behind pymesh/client/tolerance.py.

``python bench/verify_spread.py [--json] [--quick] [--threads N]``

A spot check compares a hop's output with a checker's re-run of the same span. The checked
worker ran the session as a prefill plus one-token decode steps (the C++ decode path); the
checker runs every position so far as ONE chunk. This script measures, per position row, the
relative L2 error ``||y - y_ref|| / ||y_ref||`` (pymesh.client.tolerance.row_errors) between

- ``fp32/fp32``:    y = fp32 prefill + decode (2 threads), y_ref = fp32 one chunk (2 threads)
- ``fp32/fp32 thr``: y = fp32 prefill + decode (1 thread),  y_ref = fp32 one chunk (2 threads)
- ``bf16/fp32``:    y = bf16 prefill + decode,              y_ref = fp32 one chunk
- ``fp32/bf16``:    y = fp32 prefill + decode,              y_ref = bf16 one chunk (a bf16 checker)
- ``bf16/bf16``:    y = bf16 prefill + decode (1 thread),   y_ref = bf16 one chunk (2 threads)
- ``noise``:        y = y_ref + N(0, (0.5 x RMS of the step's output)^2), per step (the test
                    workers' corruption), y_ref = fp32 one chunk; one value per STEP (its worst
                    row, what a check compares), so its ``min`` is the margin that matters

for spans of 1, 2, 4, 8, 15 and 30 blocks at several starts, prompts of several lengths and
64 decode steps, on SmolLM2-135M-Instruct (30 blocks; bf16 = its fp32 weights loaded as bf16,
as a worker does with --dtype bfloat16) and on a seeded random tiny Llama (30 blocks, hidden
64). Each span's input is the fp32 residual stream at its first block. Prints max, p99 and
median per (pair, span length); ``--json`` prints one JSON object instead. Measures; asserts
nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pymesh.client.tolerance import row_errors, tolerance
from pymesh.model.span import SpanModel, load_span

SPAN_LENGTHS = (1, 2, 4, 8, 15, 30)
PROMPT_LENGTHS = (6, 24, 80)
DECODE_STEPS = 64
PAIRS = ("fp32/fp32", "fp32/fp32 thr", "bf16/fp32", "fp32/bf16", "bf16/bf16", "noise")
TEXT = ("The old lighthouse keeper climbed the spiral stairs each evening, counting the steps "
        "as his father had taught him. Below, the sea rolled grey and patient against the rocks, "
        "and the gulls wheeled over the harbour where the fishing boats waited for the tide. "
        "He lit the lamp, wound the clockwork that turned the lens, and wrote the time in the "
        "log: seven minutes past six, wind from the south-west, visibility fair. Then he sat "
        "by the window with a cup of tea and watched the first ships of the night come in, "
        "their lights small and steady, following the beam home across the dark water.")


def _sub(full: SpanModel, start: int, n: int) -> SpanModel:
    """Blocks [start, start+n) of an already loaded full model (no reload)."""
    return SpanModel(full.config, start, start + n, full.blocks[start:start + n],
                     device=full.device, dtype=full.dtype)


def _chunk(span: SpanModel, x: torch.Tensor, threads: int) -> torch.Tensor:
    torch.set_num_threads(threads)
    cache = span.new_cache(x.shape[1], 1)
    return span.forward(x, cache, 0).float()


def _worker(span: SpanModel, x: torch.Tensor, prompt: int, threads: int) -> torch.Tensor:
    """Prefill of ``prompt`` positions, then one decode step per remaining position."""
    torch.set_num_threads(threads)
    cache = span.new_cache(x.shape[1], 1)
    outs = [span.forward(x[:, :prompt], cache, 0).float()]
    for t in range(prompt, x.shape[1]):
        outs.append(span.forward(x[:, t:t + 1], cache, t).float())
    return torch.cat(outs, dim=1)


def _noise(ref: torch.Tensor, prompt: int, gen: torch.Generator) -> torch.Tensor:
    """The test workers' corruption, per step: the worst row error of each corrupted step
    (the prefill block, then each decode row), which is what a check compares."""
    steps = [ref[:, :prompt]] + [ref[:, t:t + 1] for t in range(prompt, ref.shape[1])]
    worst = []
    for s in steps:
        rms = s.pow(2).mean().sqrt()
        worst.append(row_errors(s + 0.5 * rms * torch.randn(s.shape, generator=gen), s).max())
    return torch.stack(worst)


def _starts(n_layers: int, n: int) -> list[int]:
    last = n_layers - n
    return sorted({0, last // 2, last}) if last > 0 else [0]


def _boundaries(full: SpanModel, x0: torch.Tensor) -> list[torch.Tensor]:
    """The fp32 residual stream before every block (and after the last), one chunk."""
    hs = [x0]
    for b in range(len(full.blocks)):
        hs.append(_chunk(_sub(full, b, 1), hs[-1], 2))
    return hs


def _tiny_model(folder: Path, layers: int = 30) -> Path:
    """A seeded random Llama of ``layers`` blocks (hidden 64), written as safetensors."""
    from safetensors.torch import save_file

    h, inter, heads, kv, vocab = 64, 160, 4, 2, 256
    d = h // heads
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": h,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 512,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
           "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
    g = torch.Generator().manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g) * 0.1

    t = {"model.embed_tokens.weight": torch.randn((vocab, h), generator=g), "model.norm.weight": torch.ones(h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.q_proj.weight": w(h, h), p + "self_attn.k_proj.weight": w(kv * d, h),
                  p + "self_attn.v_proj.weight": w(kv * d, h), p + "self_attn.o_proj.weight": w(h, h),
                  p + "mlp.gate_proj.weight": w(inter, h), p + "mlp.up_proj.weight": w(inter, h),
                  p + "mlp.down_proj.weight": w(h, inter),
                  p + "input_layernorm.weight": 1 + w(h), p + "post_attention_layernorm.weight": 1 + w(h)})
    folder.mkdir(parents=True, exist_ok=True)
    save_file(t, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _inputs(name: str, folder: Path, prompts: tuple[int, ...], steps: int) -> list[tuple[int, torch.Tensor]]:
    """(prompt length, embeddings [1, prompt+steps, hidden]) per prompt, from fixed text or seeded ids."""
    from pymesh.model.head import load_head

    head = load_head(folder)
    if name == "smollm2":
        from pymesh.model.tokenizer import load_tokenizer

        ids = load_tokenizer(folder).encode(TEXT)
    else:
        ids = torch.randint(3, head.config.vocab_size, (400,), generator=torch.Generator().manual_seed(1)).tolist()
    while len(ids) < 7 * len(prompts) + max(prompts) + steps:
        ids = ids + ids  # repeated text is still text
    out = []
    for k, p in enumerate(prompts):
        seq = ids[7 * k: 7 * k + p + steps]
        out.append((p, head.embed(torch.tensor([seq]))))
    return out


def measure(name: str, folder: Path, lengths: tuple[int, ...], prompts: tuple[int, ...],
            steps: int) -> dict[str, dict[int, list[float]]]:
    """Row errors per pair and span length (every start, prompt and position pooled)."""
    fp32 = load_span(folder, 0, _n_layers(folder), dtype=torch.float32)
    bf16 = load_span(folder, 0, _n_layers(folder), dtype=torch.bfloat16)
    n_layers = len(fp32.blocks)
    gen = torch.Generator().manual_seed(0)
    errs: dict[str, dict[int, list[float]]] = {p: {n: [] for n in lengths} for p in PAIRS}
    for prompt, x0 in _inputs(name, folder, prompts, steps):
        hs = _boundaries(fp32, x0)
        for n in lengths:
            if n > n_layers:
                continue
            for s in _starts(n_layers, n):
                x = hs[s]
                f, b = _sub(fp32, s, n), _sub(bf16, s, n)
                ref32, ref32_1, ref16 = _chunk(f, x, 2), _chunk(f, x, 1), _chunk(b, x, 2)
                w32 = _worker(f, x, prompt, 2)
                w16 = _worker(b, x, prompt, 2)
                got = {"fp32/fp32": row_errors(w32, ref32),
                       "fp32/fp32 thr": torch.maximum(row_errors(_worker(f, x, prompt, 1), ref32),
                                                      row_errors(w32, ref32_1)),
                       "bf16/fp32": row_errors(w16, ref32),
                       "fp32/bf16": row_errors(w32, ref16),
                       "bf16/bf16": row_errors(_worker(b, x, prompt, 1), ref16),
                       "noise": _noise(ref32, prompt, gen)}
                for pair, e in got.items():
                    errs[pair][n].extend(e.tolist())
    torch.set_num_threads(2)
    return errs


def _n_layers(folder: Path) -> int:
    from pymesh.model.config import load_config

    return load_config(folder).num_hidden_layers


def _stats(values: list[float]) -> dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64)).tolist()
    return {"rows": len(values), "max": float(t.max()), "p99": q[2], "p50": q[1], "min": float(t.min()), "p1": q[0]}


def _tol(pair: str, n: int) -> float | None:
    dtypes = {"fp32/fp32": ("float32", "float32"), "fp32/fp32 thr": ("float32", "float32"),
              "bf16/fp32": ("bfloat16", "float32"), "fp32/bf16": ("float32", "bfloat16"),
              "bf16/bf16": ("bfloat16", "bfloat16")}.get(pair)
    return tolerance(dtypes[0], dtypes[1], n) if dtypes else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--quick", action="store_true", help="spans 1 and 8, one prompt, 16 decode steps")
    ap.add_argument("--models", default="smollm2,tiny", help="comma-separated: smollm2, tiny")
    args = ap.parse_args(argv)
    lengths: tuple[int, ...] = (1, 8)
    prompts: tuple[int, ...] = PROMPT_LENGTHS[1:2]
    steps = 16
    if not args.quick:
        lengths, prompts, steps = SPAN_LENGTHS, PROMPT_LENGTHS, DECODE_STEPS
    result: dict[str, Any] = {"span_lengths": list(lengths), "prompts": list(prompts), "decode_steps": steps,
                              "torch": torch.__version__, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            t0 = time.perf_counter()
            if name == "smollm2":
                from pymesh.model.pull import pull_default_model
                from pymesh.settings import load_settings

                rt = load_settings().runtime
                folder = pull_default_model(progress=False, root=rt.cache_root(), gguf=rt.smollm2_gguf)
            elif name == "tiny":
                folder = _tiny_model(Path(tmp) / "tiny-30")
            else:
                raise SystemExit(f"verify_spread: unknown model {name!r}; use smollm2 or tiny")
            errs = measure(name, folder, lengths, prompts, steps)
            result["models"][name] = {
                "seconds": round(time.perf_counter() - t0, 1),
                "pairs": {p: {str(n): {**_stats(v), "tolerance": _tol(p, n)} for n, v in by_n.items() if v}
                          for p, by_n in errs.items()}}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    for name, m in result["models"].items():
        print(f"\n{name} ({m['seconds']} s; prompts {result['prompts']}, {steps} decode steps)")
        print(f"{'pair':<14} {'blocks':>6} {'rows':>6} {'max':>9} {'p99':>9} {'p50':>9} {'p1':>9} {'tolerance':>9}")
        for pair, by_n in m["pairs"].items():
            for n, s in by_n.items():
                tol = "-" if s["tolerance"] is None else f"{s['tolerance']:.3g}"
                print(f"{pair:<14} {n:>6} {s['rows']:>6} {s['max']:9.2e} {s['p99']:9.2e} {s['p50']:9.2e} "
                      f"{s['p1']:9.2e} {tol:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
