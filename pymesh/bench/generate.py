"""Decode speed of SmolLM2-135M: pymesh vs transformers, float32 and bfloat16, pymesh on
quantized weights (q8_0, q4_0, q4_1), llama.cpp on the GGUF file when asked, plus the ceiling.

A quantized row runs the GGUF file itself when its type is the file's (the embedded model's
file is Q4_1: ``weights`` says ``gguf file``), else the float32 folder with that format
computed at load (``weights``: ``quantized at load``). ``weight_bytes_per_token`` is what the
loaded model reads per decode step (blocks, final norm, LM head). ``--llamacpp-bench BIN``
adds llama.cpp's own ``llama-bench`` on the same GGUF file, taking turns with pymesh
(``../shared/tools/llamacpp_bench.sh`` builds it); pymesh never depends on it.

Both engines get the same ~20-token prompt and produce the same number of greedy
tokens (128 by default; EOS does not stop them), each with an explicit torch
thread count. Each engine does one prefill with the whole prompt, then one token
per step with its own KV cache; decode tokens/s counts the steps after the first
token. The ceiling is what a decoder reading every weight byte exactly once per
token would reach at this machine's read bandwidth (a ``threads``-thread pass
over 1 GiB, best of 5 passes, sampled again after every round of runs so that it
sees the same load as the engines; the best sample counts). Everything is measured in a fresh child process started
with ``OMP_WAIT_POLICY=PASSIVE`` and ``OMP_NUM_THREADS=threads``: OpenMP reads those
once, when torch loads, and spinning threads ruin timings on a shared machine.

``pymesh bench generate [--json]``; rows: engine (pymesh | transformers | ceiling),
dtype, decode_tokens_per_s, prefill_s.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from pymesh.errors import ConfigError, PymeshError
from pymesh.proto.records import QUANT_LABELS

log = logging.getLogger(__name__)

PROMPT = "The history of Paris begins with a Celtic tribe, the Parisii, who settled on an island in the river"
ENGINES = ("pymesh", "transformers")
DTYPES = ("float32", "bfloat16")
QUANT_TYPES = QUANT_LABELS
DEFAULT_DTYPES = ("float32", "bfloat16", "q8_0", "q4_1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", default=None, metavar="DIR",
                        help="model folder (default: SmolLM2-135M-Instruct from `pymesh model pull`)")
    parser.add_argument("--new-tokens", type=int, default=None, help="greedy tokens per run (default 128; --quick 32)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for every engine (default 2)")
    parser.add_argument("--dtypes", default=",".join(DEFAULT_DTYPES),
                        help="comma-separated: float32,bfloat16,q8_0,q4_0,q4_1 (default %(default)s)")
    parser.add_argument("--gguf", default=None, metavar="FILE",
                        help="GGUF file to run for its own type (default: the embedded model's Q4_1 file "
                             "when --model-path is not given)")
    parser.add_argument("--llamacpp-bench", default=None, metavar="BIN",
                        help="llama.cpp's llama-bench binary: adds its decode speed on the GGUF file")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated: pymesh,transformers")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs per engine and dtype, taking turns; the best is kept (default 3, --quick 1)")


class BandwidthProbe:
    """Read bandwidth of a ``threads``-thread pass (a sum) over a ``gib`` GiB buffer.

    ``sample()`` takes the best of ``repeats`` passes and keeps the best sample seen, so
    the ceiling is sampled between the engines' runs, under the same load as they are.
    """

    def __init__(self, threads: int, gib: float = 1.0) -> None:
        import torch

        self.threads = threads
        self.buf = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
        self.best = 0.0

    def sample(self, repeats: int = 5) -> float:
        import torch

        old = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            self.buf.sum()  # pages are resident and warm
            for _ in range(repeats):
                t = time.perf_counter()
                self.buf.sum()
                self.best = max(self.best, self.buf.numel() * 4 / (time.perf_counter() - t))
        finally:
            torch.set_num_threads(old)
        return self.best


def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of a ``threads``-thread read pass over ``gib`` GiB, best of ``repeats``."""
    return BandwidthProbe(threads, gib).sample(repeats)


def weight_bytes_per_token(model_dir: Path, elem_size: int) -> int:
    """Bytes a decode step must read: every block weight, the final norm and the LM head (not the embeddings)."""
    from pymesh.model.config import load_config

    c = load_config(model_dir)
    h, q, kv, i = c.hidden_size, c.q_size, c.kv_size, c.intermediate_size
    per_block = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
    if c.attention_bias:
        per_block += q + 2 * kv + (h if c.o_bias else 0)
    return elem_size * (c.num_hidden_layers * per_block + h + c.vocab_size * h)


Run = tuple[float, float, list[int]]  # prefill seconds, decode tokens/s, tokens
Runner = Callable[[list[int], int], Run]


def _timed(steps: Iterator[int]) -> Run:
    """Drain a token iterator; prefill = time to the first token, rate over the rest."""
    t0 = time.perf_counter()
    t_first = t0
    tokens: list[int] = []
    for tok in steps:
        if not tokens:
            t_first = time.perf_counter()
        tokens.append(tok)
    rate = (len(tokens) - 1) / max(time.perf_counter() - t_first, 1e-9)
    return t_first - t0, rate, tokens


def pymesh_model(model_dir: Path, dtype: str, gguf: Path | None) -> tuple[Any, str]:
    """The LocalModel a row runs, and what its weights are."""
    from pymesh.model.generate import LocalModel

    if dtype in DTYPES:
        return LocalModel.load(model_dir, dtype=dtype), "float folder"
    if gguf is not None and gguf_label(gguf) == dtype:
        return LocalModel.load(gguf), "gguf file"
    return LocalModel.load(model_dir, quantize=dtype), "quantized at load"


def gguf_label(gguf: Path) -> str | None:
    from pymesh.model.fingerprint import quant_label

    return quant_label(gguf)


def pymesh_runner(model: Any) -> Runner:
    from pymesh.model.sampling import SamplingParams

    return lambda ids, n: _timed(model.generate_ids(ids, SamplingParams(max_new_tokens=n), eos_ids=[]))


def llamacpp_runner(binary: str, gguf: Path, threads: int) -> Runner:
    """One llama-bench run (``-r 1``) on the file: its decode tokens/s and prompt time."""

    def run(ids: list[int], n: int) -> Run:
        cmd = [binary, "-m", str(gguf), "-t", str(threads), "-p", str(len(ids)), "-n", str(n), "-r", "1",
               "-o", "json"]
        # As its users run it: ggml's OpenMP threads spin between ops, and the PASSIVE wait
        # policy this benchmark's children get would cost llama.cpp 2.5x on 2 cores.
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        if done.returncode:
            raise PymeshError(f"llama-bench failed ({done.returncode}): {done.stderr.strip()[-300:]}")
        tests = json.loads(done.stdout)
        gen = next(t for t in tests if t.get("n_gen"))
        prompt = next((t for t in tests if t.get("n_prompt") and not t.get("n_gen")), None)
        prefill = len(ids) / float(prompt["avg_ts"]) if prompt else float("nan")
        return prefill, float(gen["avg_ts"]), []

    return run


def transformers_runner(model_dir: Path, dtype: str) -> Runner:
    import torch
    import transformers

    model: Any = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model.eval()

    def steps(ids: list[int], n: int) -> Iterator[int]:
        # The same loop as pymesh's: prefill, then one token per step on transformers' own KV cache.
        with torch.inference_mode():
            out = model(torch.tensor([ids]), use_cache=True)
            for i in range(n):
                token = int(out.logits[0, -1].argmax())
                yield token
                if i + 1 < n:
                    out = model(torch.tensor([[token]]), cache=out.cache, use_cache=True)

    return lambda ids, n: _timed(steps(ids, n))




def model_and_gguf(args: argparse.Namespace, settings: Any) -> tuple[Path, Path | None]:
    """The float folder (``--model-path``, else the embedded model, pulled) and the GGUF file
    (``--gguf``, else the embedded model's when no folder was named)."""
    gguf = Path(args.gguf) if args.gguf else None
    if args.model_path:
        return Path(args.model_path), gguf
    from pymesh.model.pull import default_gguf, pull_default_model

    root = settings.runtime.cache_root()
    model_dir = pull_default_model(progress=True, root=root, gguf=settings.runtime.smollm2_gguf)
    if gguf is None:
        gguf = default_gguf(progress=True, root=root, override=settings.runtime.smollm2_gguf)
    return model_dir, gguf


def run_rows(args: argparse.Namespace, progress: Any) -> list[dict[str, Any]]:
    """Measure in a fresh child process, so OpenMP starts with the PASSIVE wait policy and the
    requested thread count whatever this process has already imported."""
    from pymesh.settings import settings_of

    settings = settings_of(args)
    quick = getattr(args, "quick", False)
    model_dir, gguf = model_and_gguf(args, settings)
    if args.llamacpp_bench and gguf is None:
        raise ConfigError("--llamacpp-bench needs a GGUF file: pass --gguf FILE")
    spec = {"model_dir": str(model_dir), "gguf": str(gguf) if gguf else None,
            "llamacpp": args.llamacpp_bench, "new_tokens": args.new_tokens or (32 if quick else 128),
            "require_c": settings.runtime.require_c, "fast_decode": settings.runtime.fast_decode,
            "repeats": args.repeats or (1 if quick else 3), "threads": args.threads,
            "dtypes": [d for d in args.dtypes.split(",") if d], "engines": [e for e in args.engines.split(",") if e]}
    for name in spec["engines"]:
        if name not in ENGINES:
            raise ConfigError(f"--engines: unknown engine {name!r}; choose from {', '.join(ENGINES)}")
    for name in spec["dtypes"]:
        if name not in DTYPES + QUANT_TYPES:
            raise ConfigError(f"--dtypes: unknown dtype {name!r}; choose from {', '.join(DTYPES + QUANT_TYPES)}")
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(args.threads))
    task = progress.add_task("bench generate", total=len(spec["dtypes"]) * len(spec["engines"]) * spec["repeats"] + 1)
    result: dict[str, Any] = {}
    with subprocess.Popen([sys.executable, "-m", "pymesh.bench.generate", json.dumps(spec)],
                          stdout=subprocess.PIPE, env=env, text=True) as child:
        assert child.stdout is not None
        for line in child.stdout:
            event = json.loads(line)
            if "progress" in event:
                progress.update(task, description=event["progress"], advance=event.get("advance", 0))
            else:
                result = event
    if child.returncode or "rows" not in result:
        raise PymeshError(f"the benchmark process failed (exit status {child.returncode}); see its error above")
    for note in result["notes"]:
        log.info("%s", note)
    for note in result["warnings"]:
        log.warning("%s", note)
    return list(result["rows"])


def _measure(spec: dict[str, Any]) -> None:
    """The child process: runs every engine and dtype, prints progress and result as JSON lines."""
    import torch

    from pymesh.model.switches import set_switches
    from pymesh.model.tokenizer import load_tokenizer
    from pymesh.model.torch_setup import configure_threads

    def emit(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    model_dir, n, repeats, threads = Path(spec["model_dir"]), spec["new_tokens"], spec["repeats"], spec["threads"]
    configure_threads(threads, shared=False)
    set_switches(require_c=spec.get("require_c", False), fast_decode=spec.get("fast_decode", True))
    ids = load_tokenizer(model_dir).encode(PROMPT)
    notes = [f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}",
             f"prompt {len(ids)} tokens, {n} new greedy tokens, {threads} threads, best of {repeats} runs"]
    warnings: list[str] = []
    rows: list[dict[str, Any]] = []
    probe = BandwidthProbe(threads)
    gguf = Path(spec["gguf"]) if spec.get("gguf") else None
    read: dict[str, int] = {}
    for dtype in spec["dtypes"]:
        runners: dict[str, Runner] = {}
        weights = {}
        for e in spec["engines"]:
            if e == "pymesh":
                model, weights["pymesh"] = pymesh_model(model_dir, dtype, gguf)
                read[dtype] = model.weight_bytes_per_token()
                runners[e] = pymesh_runner(model)
            elif dtype in DTYPES:
                runners[e], weights[e] = transformers_runner(model_dir, dtype), "float folder"
        if spec.get("llamacpp") and gguf is not None and dtype == gguf_label(gguf):
            runners["llama.cpp"], weights["llama.cpp"] = llamacpp_runner(spec["llamacpp"], gguf, threads), "gguf file"
        best: dict[str, Run] = {}
        for r in range(repeats):  # engines take turns, so a burst of load on the machine hits both
            for engine, runner in runners.items():
                emit({"progress": f"{engine} {dtype} run {r + 1}/{repeats}"})
                res = runner(ids, n)
                if engine not in best or res[1] > best[engine][1]:
                    best[engine] = res
                emit({"progress": f"{engine} {dtype} run {r + 1}/{repeats}", "advance": 1})
            probe.sample()
        for engine, (prefill, rate, _) in best.items():
            rows.append({"engine": engine, "dtype": dtype, "weights": weights[engine],
                         "decode_tokens_per_s": round(rate, 2), "prefill_s": round(prefill, 4),
                         "weight_bytes_per_token": read.get(dtype) if engine == "pymesh" else None})
        if "pymesh" in best and "transformers" in best:
            a, b = (best[e][2] for e in ENGINES)
            if a != b:
                step = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                (warnings if dtype == "float32" else notes).append(
                    f"{dtype}: pymesh and transformers greedy tokens diverge at step {step}")
        del runners
        gc.collect()
    emit({"progress": "memory bandwidth"})
    bandwidth = probe.sample()
    for dtype in spec["dtypes"]:
        if dtype in read:
            nbytes = read[dtype]
        else:
            nbytes = weight_bytes_per_token(model_dir, torch.empty(0, dtype=getattr(torch, dtype)).element_size())
        rows.append({"engine": "ceiling", "dtype": dtype, "weights": "-",
                     "decode_tokens_per_s": round(bandwidth / nbytes, 2), "prefill_s": None,
                     "weight_bytes_per_token": nbytes})
    notes.append(f"read bandwidth ({threads} threads, 1 GiB, best pass, sampled after every round): "
                 f"{bandwidth / 1e9:.1f} GB/s; "
                 f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    emit({"progress": "done", "advance": 1})
    emit({"rows": rows, "notes": notes, "warnings": warnings})


def render(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title="decode speed, SmolLM2-135M, greedy (tokens/s; higher is better)")
    for col in ("engine", "dtype", "weights", "decode tokens/s", "prefill s", "MB read/token", "vs transformers",
                "vs pymesh fp32"):
        table.add_column(col, justify="left" if col in ("engine", "dtype", "weights") else "right")
    base = {r["dtype"]: r["decode_tokens_per_s"] for r in rows if r["engine"] == "transformers"}
    fp32 = next((r["decode_tokens_per_s"] for r in rows if r["engine"] == "pymesh" and r["dtype"] == "float32"), None)
    for r in rows:
        ref = base.get(r["dtype"])
        ratio = f"{r['decode_tokens_per_s'] / ref:.2f}x" if ref else "-"
        vs32 = f"{r['decode_tokens_per_s'] / fp32:.2f}x" if fp32 and r["engine"] != "ceiling" else "-"
        prefill = "-" if r["prefill_s"] is None else f"{r['prefill_s']:.3f}"
        nbytes = r.get("weight_bytes_per_token")
        mb = "-" if not nbytes else f"{nbytes / 1e6:.0f}"
        table.add_row(r["engine"], r["dtype"], r.get("weights", "-"), f"{r['decode_tokens_per_s']:.1f}", prefill,
                      mb, ratio, vs32)
    return table


if __name__ == "__main__":
    _measure(json.loads(sys.argv[1]))
