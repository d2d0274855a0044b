"""Swarm speed: a local swarm of N worker processes vs single-process generation, QUIC and TCP.

Starts a bootstrap node and N workers (an even split of the embedded SmolLM2-135M,
``--transport both``) as child processes on loopback, then from this process:
single-process ``generate`` (the baseline), and a swarm client over QUIC and over TCP,
each with a 128-token prompt and 128 greedy tokens (EOS does not stop them).

TTFT is the time from sending the prompt's hidden states to having the first token
(embedding, prefill through every worker, LM head, sampling); route discovery and
opening the session are not in it. Decode tokens/s counts the steps after the first
token. ratio = swarm decode tokens/s / single-process decode tokens/s; the baseline runs
before and after the swarm and its best is kept (the machine's load drifts).

``pymesh bench swarm [--json]``; rows: transport, workers, ttft_s, decode_tokens_per_s,
single_process_tokens_per_s, ratio (plus single_process_ttft_s and model).

``--sessions 1,4,8,16`` adds concurrent-session rows (:mod:`pymesh.bench.swarm_sessions`):
per transport and N, N generations at once through the swarm; and from one process, 1
session alone and N sessions batched. Keys: transport (``single-process`` /
``single-process-batched`` for those), workers, sessions, model, dtype,
aggregate_tokens_per_s, per_session_tokens_per_s_p50, ttft_s_p50.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from pymesh.settings import Settings, settings_of

log = logging.getLogger(__name__)

PROMPT_TEXT = (
    "The history of Paris begins with a Celtic tribe, the Parisii, who settled on an island in the river "
    "Seine. The Romans conquered the area and built a town named Lutetia on the left bank. "
)

#: environment of the benchmark's children: short timers, no start-up measurement spin
CHILD_ENV = {
    "PYMESH_HEARTBEAT": "2",
    "PYMESH_RECORD_TTL": "10",
    "PYMESH_DHT_TIMEOUT": "1",
    "OMP_WAIT_POLICY": "PASSIVE",
    "TOKENIZERS_PARALLELISM": "false",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", default=None, metavar="DIR",
                        help="model folder (default: SmolLM2-135M-Instruct from `pymesh model pull`)")
    parser.add_argument("--workers", type=int, default=3, help="worker processes (default 3)")
    parser.add_argument("--transports", default="quic,tcp", help="comma-separated: quic,tcp")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length in tokens (default 128)")
    parser.add_argument("--new-tokens", type=int, default=None, help="greedy tokens per run (default 128; --quick 32)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of each worker and of the baseline (default: half the cores)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per configuration, best kept (default 2)")
    parser.add_argument("--sessions", default=None, metavar="N,N,...",
                        help="also run this many concurrent sessions, e.g. 1,4,8,16 (default: none)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype of the workers, the client and the baseline (default float32)")


def session_counts(text: str | None) -> list[int]:
    """``--sessions 1,4,8`` -> [1, 4, 8] (sorted, unique); None or empty -> []."""
    from pymesh.errors import ConfigError

    try:
        counts = sorted({int(x) for x in (text or "").split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--sessions {text!r} must be comma-separated integers, e.g. 1,4,8,16") from None
    if counts and counts[0] < 1:
        raise ConfigError(f"--sessions {text!r}: every count must be at least 1")
    return counts


def even_split(num_blocks: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous spans covering ``num_blocks`` blocks, sizes differing by at most one."""
    parts = max(1, min(parts, num_blocks))
    base, extra = divmod(num_blocks, parts)
    spans, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        spans.append((start, stop))
        start = stop
    return spans


def prompt_of(tokenizer: Any, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids.extend(tokenizer.encode(PROMPT_TEXT, add_special_tokens=False))
    return ids[:n]


def single_process(model_dir: Path, ids: list[int], n: int, repeats: int, dtype: str = "float32"
                   ) -> tuple[float, float]:
    """(TTFT seconds, decode tokens/s) of ``LocalModel.generate_ids``, best of ``repeats``."""
    from pymesh.model.generate import LocalModel
    from pymesh.model.sampling import SamplingParams

    model = LocalModel.load(model_dir, dtype=dtype)
    best = (float("inf"), 0.0)
    for _ in range(repeats):
        t0 = time.perf_counter()
        t_first = t0
        count = 0
        for _tok in model.generate_ids(ids, SamplingParams(max_new_tokens=n), eos_ids=[]):
            if count == 0:
                t_first = time.perf_counter()
            count += 1
        rate = (count - 1) / (time.perf_counter() - t_first)
        best = (min(best[0], t_first - t0), max(best[1], rate))
    return best


async def swarm_runs(bootstrap: str, model_dir: Path, transport: str, ids: list[int], n: int,
                     repeats: int, settings: Settings | None = None, dtype: str = "float32"
                     ) -> tuple[float, float, list[int]]:
    from pymesh.client.generation import ClientModel, GenerationStats, generate_tokens
    from pymesh.client.swarm import Swarm
    from pymesh.model.sampling import SamplingParams

    model = ClientModel(model_dir, dtype=dtype)
    best = (float("inf"), 0.0)
    tokens: list[int] = []
    async with Swarm([bootstrap], model.model_id, transport=transport,
                     settings=settings) as swarm:
        for _ in range(repeats):
            stats = GenerationStats()
            tokens = [t async for t in generate_tokens(swarm, model, ids, SamplingParams(max_new_tokens=n),
                                                       stats=stats, ignore_eos=True)]
            best = (min(best[0], stats.prefill_s), max(best[1], stats.decode_tokens_per_s))
    return best[0], best[1], tokens


def local_session_rows(model_dir: Path, prompts: list[list[int]], n: int, counts: list[int], repeats: int,
                       dtype: str) -> list[dict[str, Any]]:
    """Single-process rows: 1 session alone, then each N > 1 of ``counts`` batched."""
    from pymesh.bench import swarm_sessions as ss
    from pymesh.model.generate import LocalModel

    model = LocalModel.load(model_dir, dtype=dtype)
    rows = []
    for count in sorted({1, *counts}):
        run = ss.best([ss.local_batched(model, prompts[:count], n) for _ in range(repeats)])
        rows.append({**ss.row(ss.LOCAL if count == 1 else ss.LOCAL_BATCHED, 0, model_dir.name, run), "dtype": dtype})
    return rows


def run_rows(args: argparse.Namespace, progress: Any) -> list[dict[str, Any]]:
    import trio

    from pymesh.bench import swarm_sessions as ss
    from pymesh.demo.procs import Supervisor, free_port, pymesh_argv
    from pymesh.model.config import load_config
    from pymesh.model.tokenizer import load_tokenizer
    from pymesh.model.torch_setup import configure_threads

    settings = settings_of(args)
    quick = getattr(args, "quick", False)
    n = args.new_tokens or (32 if quick else 128)
    repeats = args.repeats or (1 if quick else 2)
    if args.model_path:
        model_dir = Path(args.model_path)
    else:
        from pymesh.model.pull import pull_default_model

        model_dir = pull_default_model(progress=True, root=settings.runtime.cache_root(),
                                       gguf=settings.runtime.smollm2_gguf)
    threads = configure_threads(settings.runtime.threads_or(args.threads))
    cfg = load_config(model_dir)
    counts = session_counts(args.sessions)
    tokenizer = load_tokenizer(model_dir)
    ids = prompt_of(tokenizer, args.prompt_tokens)
    prompts = ss.prompts_for(prompt_of(tokenizer, args.prompt_tokens + max(counts or [1])), max(counts or [1]),
                             args.prompt_tokens)
    transports = [t for t in args.transports.split(",") if t]
    task = progress.add_task("bench swarm", total=3 + len(transports) * (2 if counts else 1) + bool(counts))

    progress.update(task, description=f"single process: {len(ids)}-token prompt, {n} tokens")
    sp_ttft, sp_rate = single_process(model_dir, ids, n, repeats, args.dtype)
    progress.advance(task)
    session_rows: list[dict[str, Any]] = []
    if counts:
        progress.update(task, description=f"single process: sessions {counts} batched")
        session_rows += local_session_rows(model_dir, prompts, n, counts, repeats, args.dtype)
        progress.advance(task)

    rows: list[dict[str, Any]] = []
    spans = even_split(cfg.num_hidden_layers, args.workers)
    env = {**os.environ, **CHILD_ENV, "PYMESH_THREADS": str(threads)}
    with tempfile.TemporaryDirectory(prefix="pymesh-bench-swarm-") as tmp, \
            Supervisor(Path(tmp), env={**env, "PYMESH_HOME": tmp}) as sup:
        progress.update(task, description=f"starting a bootstrap and {len(spans)} workers")
        bport = free_port()
        boot = sup.spawn("bootstrap", pymesh_argv("bootstrap", "--host", "127.0.0.1", "--port", str(bport)))
        boot.wait_for_output("bootstrap address", 60)
        workers = []
        for i, (a, b) in enumerate(spans):
            port = free_port()
            workers.append(sup.spawn(f"worker{i}", pymesh_argv(
                "worker", "--bootstrap", f"127.0.0.1:{bport}", "--host", "127.0.0.1", "--port", str(port),
                "--layers", f"{a}-{b - 1}", "--model-path", str(model_dir), "--transport", "both", "--dtype", args.dtype,
                "--identity", str(Path(tmp) / f"w{i}.key"), "--threads", str(threads))))
        for w in workers:
            w.wait_for_output("Worker bootstrapped", 180)
        progress.advance(task)
        measured = []
        for transport in transports:
            progress.update(task, description=f"swarm over {transport}: {len(spans)} workers, {n} tokens")
            ttft, rate, _tokens = trio.run(swarm_runs, f"127.0.0.1:{bport}", model_dir, transport, ids, n, repeats,
                                             settings, args.dtype)
            measured.append((transport, ttft, rate))
            progress.advance(task)
        for transport in transports if counts else []:
            progress.update(task, description=f"swarm over {transport}: sessions {counts}, {n} tokens each")
            runs = trio.run(ss.swarm_sessions, f"127.0.0.1:{bport}", model_dir, transport, prompts, n, counts,
                            repeats, args.dtype, settings)
            session_rows += [{**ss.row(transport, len(spans), model_dir.name, runs[c]), "dtype": args.dtype}
                             for c in counts]
            progress.advance(task)
        # The baseline again, after the swarm: on a shared machine the load drifts, and the
        # best of both baseline runs keeps the comparison conservative.
        progress.update(task, description="single process again")
        sp2_ttft, sp2_rate = single_process(model_dir, ids, n, repeats, args.dtype)
        sp_ttft, sp_rate = min(sp_ttft, sp2_ttft), max(sp_rate, sp2_rate)
        progress.advance(task)
        for transport, ttft, rate in measured:
            rows.append({"transport": transport, "workers": len(spans), "ttft_s": round(ttft, 4),
                         "decode_tokens_per_s": round(rate, 2), "single_process_tokens_per_s": round(sp_rate, 2),
                         "ratio": round(rate / sp_rate, 3) if sp_rate else None,
                         "single_process_ttft_s": round(sp_ttft, 4), "model": model_dir.name})
    log.info("threads per process: %d; prompt %d tokens; %d new tokens", threads, len(ids), n)
    return rows + session_rows


def render(rows: list[dict[str, Any]]) -> Any:
    from rich.console import Group
    from rich.table import Table

    from pymesh.bench.swarm_sessions import render_rows

    sessions = [r for r in rows if "sessions" in r]
    rows = [r for r in rows if "sessions" not in r]
    model = rows[0].get("model", "SmolLM2-135M-Instruct") if rows else "?"
    table = Table(title=f"swarm vs single process, {model}, greedy (loopback; higher tokens/s is better)")
    for col in ("transport", "workers", "TTFT s", "decode tok/s", "single-process tok/s", "ratio",
                "single-process TTFT s"):
        table.add_column(col, justify="left" if col == "transport" else "right")
    for r in rows:
        table.add_row(r["transport"], str(r["workers"]), f"{r['ttft_s']:.3f}", f"{r['decode_tokens_per_s']:.1f}",
                      f"{r['single_process_tokens_per_s']:.1f}", f"{r['ratio']:.2f}" if r["ratio"] else "-",
                      f"{r['single_process_ttft_s']:.3f}")
    return Group(table, render_rows(sessions)) if sessions else table
