"""The HTTP API's cost: `pymesh serve` against the Python API on the same local swarm.

Starts a bootstrap node and N workers (an even split of the embedded SmolLM2-135M) and
`pymesh serve` as child processes on loopback. For each concurrency (1, 4, 8, 16 streams;
``--quick``: 1 and 4 with fewer tokens) it runs, interleaved and repeated: C concurrent
streaming ``/v1/completions`` requests through the openai SDK (threads), and C concurrent
``SwarmClient.agenerate`` runs in this process (the Python API), each with the same
128-token prompt and up to 64 greedy tokens. Per run: aggregate tokens/s, TTFT p50/p95,
inter-token p50/p95 (streamed deltas' arrival gaps for the API), and CPU-seconds per
token: the serve process's (``/proc``; client head + HTTP) against this process's during
the Python API runs (client head only); their difference is the HTTP layer's.

``pymesh bench serve [--json]``; one row per (concurrency, api) with the median over
repeats and the spread (min-max) of tokens/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pymesh.bench.swarm import CHILD_ENV, even_split, prompt_of
from pymesh.settings import settings_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", default=None, metavar="DIR",
                        help="model folder (default: SmolLM2-135M-Instruct from `pymesh model pull`)")
    parser.add_argument("--workers", type=int, default=3, help="worker processes (default 3)")
    parser.add_argument("--concurrency", default=None, help="comma-separated stream counts (default 1,4,8,16; --quick 1,4)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length in tokens (default 128)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per stream at most (default 64; --quick 24)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats per configuration (default 3; --quick 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each process (default 1)")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def api_run(client: Any, model: str, prompt: str, n: int, c: int) -> dict[str, Any]:
    """``c`` concurrent streams through ``client`` (one OpenAI client for the whole benchmark:
    its first request pays one-time set-up that is no part of the API's cost)."""
    ttft: list[float] = []
    gaps: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def one() -> None:
        t0 = time.perf_counter()
        last, first, count = t0, True, 0
        for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=n, stream=True,
                                               stream_options={"include_usage": True}):
            now = time.perf_counter()
            if chunk.usage is not None:
                count = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].text:
                with lock:
                    (ttft.append(now - t0) if first else gaps.append(now - last))
                first, last = False, now
        with lock:
            tokens[0] += count

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one) for _ in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"seconds": time.perf_counter() - t0, "tokens": tokens[0], "ttft": ttft, "gaps": gaps}


async def python_run(client: Any, prompt: str, n: int, c: int) -> dict[str, Any]:
    import trio

    from pymesh.model.sampling import SamplingParams

    ttft: list[float] = []
    gaps: list[float] = []
    tokens = [0]

    async def one() -> None:
        t0 = time.perf_counter()
        last, first = t0, True
        async for _ in client.agenerate(prompt, SamplingParams(max_new_tokens=n)):
            now = time.perf_counter()
            (ttft.append(now - t0) if first else gaps.append(now - last))
            first, last = False, now
            tokens[0] += 1

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(c):
            nursery.start_soon(one)
    return {"seconds": time.perf_counter() - t0, "tokens": tokens[0], "ttft": ttft, "gaps": gaps}


def _summary(api: str, c: int, runs: list[dict[str, Any]], cpu: float) -> dict[str, Any]:
    rates = [r["tokens"] / r["seconds"] for r in runs if r["seconds"] > 0]
    ttft = [x for r in runs for x in r["ttft"]]
    gaps = [x for r in runs for x in r["gaps"]]
    tokens = sum(r["tokens"] for r in runs)
    return {"api": api, "streams": c, "tokens_per_s": round(statistics.median(rates), 2),
            "tokens_per_s_min": round(min(rates), 2), "tokens_per_s_max": round(max(rates), 2),
            "ttft_p50_s": round(_pct(ttft, 0.5), 4), "ttft_p95_s": round(_pct(ttft, 0.95), 4),
            "inter_token_p50_ms": round(1000 * _pct(gaps, 0.5), 2), "inter_token_p95_ms": round(1000 * _pct(gaps, 0.95), 2),
            "cpu_ms_per_token": round(1000 * cpu / tokens, 3) if tokens else None, "tokens": tokens}


def run_rows(args: argparse.Namespace, progress: Any) -> list[dict[str, Any]]:
    import trio

    from pymesh.client.api import SwarmClient
    from pymesh.demo.procs import Supervisor, free_port, pymesh_argv
    from pymesh.model.config import load_config
    from pymesh.model.fingerprint import model_id
    from pymesh.model.tokenizer import load_tokenizer
    from pymesh.model.torch_setup import configure_threads

    import logging

    logging.getLogger("httpx2").setLevel(logging.WARNING)  # the openai SDK's client logs every request
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = settings_of(args)
    quick = getattr(args, "quick", False)
    n = args.new_tokens or (24 if quick else 64)
    repeats = args.repeats or (2 if quick else 3)
    conc = [int(x) for x in (args.concurrency or ("1,4" if quick else "1,4,8,16")).split(",") if x]
    if args.model_path:
        model_dir = Path(args.model_path)
    else:
        from pymesh.model.pull import pull_default_model

        model_dir = pull_default_model(progress=True, root=settings.runtime.cache_root(),
                                       gguf=settings.runtime.smollm2_gguf)
    configure_threads(args.threads)
    tok = load_tokenizer(model_dir)
    prompt = tok.decode(prompt_of(tok, args.prompt_tokens))
    name = model_id(model_dir).split("@", 1)[0]
    spans = even_split(load_config(model_dir).num_hidden_layers, args.workers)
    task = progress.add_task("bench serve", total=1 + len(conc) * repeats)
    # children: this process's environment (the supervisor's default) plus these; no API key
    env = {**CHILD_ENV, "PYMESH_THREADS": str(args.threads), "PYMESH_API_KEY": ""}
    sums: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pymesh-bench-serve-") as tmp, \
            Supervisor(Path(tmp)) as sup:
        sup.env.update({**env, "PYMESH_HOME": tmp})
        progress.update(task, description=f"starting a bootstrap, {len(spans)} workers and pymesh serve")
        bport, hport = free_port(), free_port()
        boot = sup.spawn("bootstrap", pymesh_argv("bootstrap", "--host", "127.0.0.1", "--port", str(bport)))
        boot.wait_for_output("bootstrap address", 60)
        workers = [sup.spawn(f"worker{i}", pymesh_argv(
            "worker", "--bootstrap", f"127.0.0.1:{bport}", "--host", "127.0.0.1", "--port", str(free_port()),
            "--layers", f"{a}-{b - 1}", "--model-path", str(model_dir), "--identity", str(Path(tmp) / f"w{i}.key")))
            for i, (a, b) in enumerate(spans)]
        for w in workers:
            w.wait_for_output("Worker bootstrapped", 180)
        serve = sup.spawn("serve", pymesh_argv("serve", "--bootstrap", f"127.0.0.1:{bport}", "--model-path",
                                               str(model_dir), "--listen", f"127.0.0.1:{hport}",
                                               "--max-active", str(max(conc)), "--max-waiting", "0"))
        serve.wait_for_output("OpenAI-compatible API at", 120)
        from openai import OpenAI

        http = OpenAI(base_url=f"http://127.0.0.1:{hport}/v1", api_key="bench", max_retries=0, timeout=600)
        api_run(http, name, prompt, 4, 1)  # warm-up: route discovery, first session, the SDK's set-up
        progress.advance(task)
        measured: dict[tuple[str, int], list[dict[str, Any]]] = {}
        cpu: dict[tuple[str, int], float] = {}

        async def main() -> None:
            async with SwarmClient([f"127.0.0.1:{bport}"], model_dir, settings=settings) as client:
                await python_run(client, prompt, 4, 1)  # warm-up
                for c in conc:
                    for r in range(repeats):
                        progress.update(task, description=f"{c} streams, repeat {r + 1}/{repeats}")
                        order = ("python", "http") if r % 2 == 0 else ("http", "python")
                        for api in order:
                            if api == "python":
                                c0 = time.process_time()
                                res = await python_run(client, prompt, n, c)
                                used = time.process_time() - c0
                            else:
                                c0 = _cpu_of(serve.pid)
                                res = await trio.to_thread.run_sync(api_run, http, name, prompt, n, c)
                                used = _cpu_of(serve.pid) - c0
                            measured.setdefault((api, c), []).append(res)
                            cpu[(api, c)] = cpu.get((api, c), 0.0) + used
                        progress.advance(task)

        trio.run(main)
        for (api, c), runs in measured.items():
            sums.append(_summary(api, c, runs, cpu[(api, c)]))
    sums.sort(key=lambda r: (r["streams"], r["api"]))
    return sums


def render(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title="pymesh serve (HTTP, openai SDK) vs the Python API, same swarm, interleaved repeats")
    cols = ("streams", "api", "tok/s (median)", "tok/s spread", "TTFT p50/p95 s", "inter-token p50/p95 ms",
            "CPU ms/token")
    for col in cols:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["streams"]), r["api"], f"{r['tokens_per_s']:.1f}",
                      f"{r['tokens_per_s_min']:.1f}-{r['tokens_per_s_max']:.1f}",
                      f"{r['ttft_p50_s']:.3f}/{r['ttft_p95_s']:.3f}",
                      f"{r['inter_token_p50_ms']:.1f}/{r['inter_token_p95_ms']:.1f}",
                      "-" if r["cpu_ms_per_token"] is None else f"{r['cpu_ms_per_token']:.2f}")
    return table
