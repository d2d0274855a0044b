"""Kernel benchmark: each fused op against its pure-torch reference.

``pymesh bench kernels [--json] [--quick] [--threads 2] [--ops rms_norm,linear]``

Per op, at decode sizes (1, 2, 4, 8 tokens) and prefill (512 tokens), hidden 576
and 4096, float32: median time per call of the reference (``ops_ref``, or
``torch.nn.functional.linear`` for linear) and of the fused op (``ops``).
Linear runs the model's weight shapes ``[out, in]`` in float32 and bfloat16, at
1, 2, 4, 8, 16 and 32 rows of x (decode steps of that many sessions batched) and 512;
its rows also carry the weight-read bandwidth both sides reached (gbps, ref_gbps),
next to the machine's streaming-read ceiling measured in the same run on the same
threads (read_ceiling_gbps: the best of summing a 256 MiB buffer).
Qlinear (``pymesh.model.qops``, block-quantized weights) runs per block type at SmolLM2's
shapes (3072x576 gate/up, 576x1536 down, the 49152x576 head in q8_0) and Llama-3.2-1B's
(16384x2048, 2048x8192), float32 x, 1, 4, 32 and 300 rows: its "ref" side is the float32
linear on the same shape, so ``vs_fp32`` (not ``speedup``: no fused-op goal reads it) is
the gain from the smaller weight, and gbps counts the quantized bytes read.

Rows: op, tokens, hidden, dtype, ref_us, fused_us, speedup (medians), plus
ref_us_min / fused_us_min (best samples), threads, and for linear out, gbps, ref_gbps,
read_ceiling_gbps.
The two sides are sampled alternately so background load hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from pymesh.model import ops, ops_ref
from pymesh.model.quant import FORMATS, BLOCK, QTensor

DECODE = (1, 2, 4, 8)
LINEAR_ROWS = (1, 2, 4, 8, 16, 32)  # batched decode: up to ops.LINEAR_MAX_ROWS sessions a step
PREFILL = (512,)
HIDDEN = (576, 4096)
LINEAR_SHAPES = ((576, 576), (1536, 576), (576, 1536), (4096, 4096))  # weight [out, in]
OPS = ("rms_norm", "fused_add_rms_norm", "rotary", "silu_and_mul", "linear", "qlinear")
QLINEAR_SHAPES = ((3072, 576), (576, 1536), (16384, 2048), (2048, 8192))  # SmolLM2, Llama-3.2-1B
QLINEAR_HEAD = (49152, 576)  # SmolLM2's LM head, q8_0 as GGUF files keep it
QLINEAR_ROWS = (1, 4, 32, 300)
HEAD_DIM = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=2,
                        help="torch and kernel threads (default 2)")
    parser.add_argument("--ops", default=",".join(OPS),
                        help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of sampling per case and side (default 0.25, 0.05 with --quick)")


def _median_us(ref: Callable[[], Any], fused: Callable[[], Any], budget: float
               ) -> tuple[float, float, float, float]:
    """Median and best microseconds per call of each side (ref, fused, ref_min, fused_min),
    sampled alternately."""
    for fn in (ref, fused, ref, fused):
        fn()
    calls = {}
    for name, fn in (("ref", ref), ("fused", fused)):
        start = time.perf_counter()
        fn()
        once = max(time.perf_counter() - start, 1e-7)
        calls[name] = max(1, min(1000, int(5e-4 / once)))  # ~0.5 ms per sample
    samples: dict[str, list[float]] = {"ref": [], "fused": []}
    deadline = time.perf_counter() + 2 * budget
    while (len(samples["ref"]) < 7 or time.perf_counter() < deadline) and len(samples["ref"]) < 400:
        for name, fn in (("ref", ref), ("fused", fused)):
            n = calls[name]
            start = time.perf_counter_ns()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter_ns() - start) / n / 1e3)
    return (statistics.median(samples["ref"]), statistics.median(samples["fused"]),
            min(samples["ref"]), min(samples["fused"]))


def _rope_tables(max_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / 10000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM)
    angles = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv[None, :]
    return angles.cos().contiguous(), angles.sin().contiguous()


def _cases(op: str, tokens: int, hidden: int, dtype: torch.dtype
           ) -> tuple[Callable[[], Any], Callable[[], Any]]:
    gen = torch.Generator().manual_seed(tokens + hidden)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    weight = torch.randn(hidden, generator=gen).to(dtype)
    eps = 1e-6
    if op == "rms_norm":
        out = torch.empty_like(x)
        return (lambda: ops_ref.rms_norm_ref(x, weight, eps),
                lambda: ops.rms_norm(x, weight, eps, out=out))
    if op == "fused_add_rms_norm":
        residual = torch.randn(tokens, hidden, generator=gen).to(dtype)
        x2, res2 = x.clone(), residual.clone()
        return (lambda: ops_ref.fused_add_rms_norm_ref(x, residual, weight, eps),
                lambda: ops.fused_add_rms_norm(x2, res2, weight, eps))
    if op == "rotary":
        # hidden = heads * head_dim for q; k has a third of the heads (GQA, as in SmolLM2).
        heads = hidden // HEAD_DIM
        kv = max(1, heads // 3)
        q = torch.randn(tokens, heads, HEAD_DIM, generator=gen).to(dtype)
        k = torch.randn(tokens, kv, HEAD_DIM, generator=gen).to(dtype)
        cos, sin = _rope_tables(2048)
        pos = torch.arange(100, 100 + tokens)
        return (lambda: ops_ref.rotary_embedding_ref(q, k, pos, cos, sin),
                lambda: ops.rotary_embedding(q, k, pos, cos, sin))
    if op == "silu_and_mul":
        gate = x
        up = torch.randn(tokens, hidden, generator=gen).to(dtype)
        out = torch.empty_like(x)
        return (lambda: ops_ref.silu_and_mul_ref(gate, up),
                lambda: ops.silu_and_mul(gate, up, out=out))
    raise ValueError(f"unknown op {op!r}; choose from {', '.join(OPS)}")


def random_qtensor(out_f: int, in_f: int, qtype: str, gen: torch.Generator) -> QTensor:
    """Random blocks of ``qtype`` with sane scales (the speed does not depend on the values,
    and this is much faster than quantizing a float matrix of the 1B shapes)."""
    fmt = FORMATS[qtype]
    nb = in_f // BLOCK
    data = torch.randint(0, 256, (out_f, nb, fmt.block_bytes), generator=gen, dtype=torch.uint8)
    scales = 2 if qtype == "q4_1" else 1  # d (and m) fp16 at the start of each block
    half = torch.full((out_f, nb, scales), 0.01, dtype=torch.float16)
    data[..., : 2 * scales] = half.view(torch.uint8).reshape(out_f, nb, 2 * scales)
    return QTensor(fmt, (out_f, in_f), data.reshape(out_f, nb * fmt.block_bytes))


def _qlinear_row(tokens: int, shape: tuple[int, int], qtype: str, budget: float) -> dict[str, Any]:
    out_f, in_f = shape
    gen = torch.Generator().manual_seed(out_f + in_f)
    w = torch.randn(out_f, in_f, generator=gen)
    qw = random_qtensor(out_f, in_f, qtype, gen)
    x = torch.randn(tokens, in_f, generator=gen)
    ref_us, fused_us, ref_min, fused_min = _median_us(
        lambda: ops.linear(x, w), lambda: ops.linear(x, qw), budget)
    return {"hidden": in_f, "out": out_f, "qtype": qtype, "ref_us": ref_us, "fused_us": fused_us,
            "ref_us_min": ref_min, "fused_us_min": fused_min,
            "vs_fp32": round(ref_us / fused_us, 2),
            "gbps": round(qw.nbytes() / (fused_us * 1e-6) / 1e9, 1),
            "ref_gbps": round(w.numel() * 4 / (ref_us * 1e-6) / 1e9, 1),
            "gbps_best": round(qw.nbytes() / (fused_min * 1e-6) / 1e9, 1)}


def read_bandwidth_gbps(budget: float, threads: int) -> float:
    """Streaming-read ceiling: best GB/s summing a 256 MiB float32 buffer, read in the
    same chunks and threads as the GEMV reads weights (torch's sum without ``_C``)."""
    big = torch.ones(64 * 1024 * 1024)
    c = ops._C
    read = (lambda: c.read_sum(big.data_ptr(), big.numel(), threads)) if c is not None and hasattr(
        c, "read_sum") else big.sum
    read()
    times: list[float] = []
    deadline = time.perf_counter() + max(budget * 4, 0.5)
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 20):
        start = time.perf_counter()
        read()
        times.append(time.perf_counter() - start)
    return big.numel() * 4 / min(times) / 1e9


def run_rows(args: argparse.Namespace, progress: Any) -> list[dict[str, Any]]:
    selected = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = sorted(set(selected) - set(OPS))
    if unknown:
        raise SystemExit(f"bench kernels: unknown op(s) {', '.join(unknown)}; choose from {', '.join(OPS)}")
    quick = bool(getattr(args, "quick", False))
    budget = args.budget if args.budget is not None else (0.05 if quick else 0.25)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    plan: list[tuple[str, int, Any, torch.dtype]] = []
    for op in selected:
        if op == "linear":
            for dtype in (torch.float32, torch.bfloat16):
                for shape in LINEAR_SHAPES:
                    for tokens in LINEAR_ROWS + PREFILL:
                        plan.append((op, tokens, shape, dtype))
        elif op == "qlinear":
            for qtype in FORMATS:
                shapes = QLINEAR_SHAPES + ((QLINEAR_HEAD,) if qtype == "q8_0" else ())
                for shape in shapes[:2] if quick else shapes:
                    for tokens in QLINEAR_ROWS[:3:2] if quick else QLINEAR_ROWS:
                        plan.append((op, tokens, (shape, qtype), torch.float32))
        else:
            for hidden in HIDDEN:
                for tokens in DECODE + PREFILL:
                    plan.append((op, tokens, hidden, torch.float32))
    rows: list[dict[str, Any]] = []
    task = progress.add_task(f"kernels ({args.threads} threads)", total=len(plan) + 1)
    try:
        wants_ceiling = "linear" in selected or "qlinear" in selected
        ceiling = read_bandwidth_gbps(budget, args.threads) if wants_ceiling else None
        progress.advance(task)
        with torch.inference_mode():
            for op, tokens, size, dtype in plan:
                row: dict[str, Any] = {"op": op, "tokens": tokens}
                if op == "linear":
                    out_f, in_f = size
                    gen = torch.Generator().manual_seed(out_f + in_f)
                    w = torch.randn(out_f, in_f, generator=gen).to(dtype)
                    x = torch.randn(tokens, in_f, generator=gen).to(dtype)
                    ref_us, fused_us, ref_min, fused_min = _median_us(
                        lambda: F.linear(x, w), lambda: ops.linear(x, w), budget)
                    row.update(hidden=in_f, out=out_f)
                    weight_bytes = w.numel() * w.element_size()
                    row["gbps"] = round(weight_bytes / (fused_us * 1e-6) / 1e9, 1)
                    row["ref_gbps"] = round(weight_bytes / (ref_us * 1e-6) / 1e9, 1)
                    row["gbps_best"] = round(weight_bytes / (fused_min * 1e-6) / 1e9, 1)
                elif op == "qlinear":
                    row.update(_qlinear_row(tokens, size[0], size[1], budget))
                    ref_us, fused_us = row["ref_us"], row["fused_us"]
                    ref_min, fused_min = row["ref_us_min"], row["fused_us_min"]
                else:
                    ref_us, fused_us, ref_min, fused_min = _median_us(
                        *_cases(op, tokens, size, dtype), budget)
                    row["hidden"] = size
                row["dtype"] = str(dtype).removeprefix("torch.")
                row["ref_us"] = round(ref_us, 2)
                row["fused_us"] = round(fused_us, 2)
                # qlinear is judged against float32 linear (vs_fp32); no fused-op goal reads it
                row["speedup"] = round(ref_us / fused_us, 2) if op != "qlinear" else None
                # Best samples too: on a loaded machine they show what the code can do.
                row["ref_us_min"] = round(ref_min, 2)
                row["fused_us_min"] = round(fused_min, 2)
                row["threads"] = args.threads
                if op in ("linear", "qlinear") and ceiling is not None:
                    row["read_ceiling_gbps"] = round(ceiling, 1)
                rows.append(row)
                progress.advance(task)
    finally:
        torch.set_num_threads(threads_before)
    return rows


def render(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    threads = rows[0]["threads"] if rows else "?"
    isa = ops._C.linear_isa() if ops._C is not None else "no _C"
    ceiling = next((r["read_ceiling_gbps"] for r in rows if "read_ceiling_gbps" in r), None)
    if ops._C is not None and hasattr(ops._C, "qlinear_isa"):
        isa += f", qlinear {ops._C.qlinear_isa()}"
    title = f"fused kernels vs reference (qlinear: vs float32 linear) — {threads} threads, GEMV path {isa}"
    if ceiling is not None:
        title += f", read ceiling {ceiling} GB/s"
    table = Table(title=title)
    for name, justify in (("op", "left"), ("tokens", "right"), ("hidden", "right"),
                          ("dtype", "left"), ("ref µs", "right"), ("fused µs", "right"),
                          ("speedup", "right"), ("best ref/fused µs", "right"),
                          ("GB/s ref→fused (best)", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        hidden = f"{r['out']}x{r['hidden']}" if "out" in r else str(r["hidden"])
        speed = r["speedup"] if r.get("speedup") is not None else r.get("vs_fp32", 0.0)
        color = "green" if speed >= (1 if r["tokens"] > 8 or "vs_fp32" in r else 2) else "red"
        bw = f"{r['ref_gbps']}→{r['gbps']} ({r['gbps_best']})" if "gbps" in r else ""
        best = f"{r['ref_us_min']:.1f}/{r['fused_us_min']:.1f}" if "ref_us_min" in r else ""
        dtype = f"{r['dtype']} w {r['qtype']}" if "qtype" in r else r["dtype"]
        table.add_row(r["op"], str(r["tokens"]), hidden, dtype, f"{r['ref_us']:.1f}",
                      f"{r['fused_us']:.1f}", f"[{color}]{speed:.2f}[/]", best, bw)
    return table
