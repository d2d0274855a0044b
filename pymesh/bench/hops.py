"""The cost of each added hop: one session through 1, 2, 3, 5 worker processes, over TCP and QUIC.

For each worker count N: a bootstrap and N workers on loopback (an even split of the
model's blocks, :func:`pymesh.bench.swarm.even_split`), every count's swarm up at once, then
from this process greedy sessions (a ``--prompt-tokens`` prompt, ``--new-tokens`` tokens,
EOS ignored), each repeat visiting every (N, transport) once, so the shared machine's drift
falls on every N alike. Each token's arrival is timestamped; a row's ``ms_per_token_p50``
is the median of the intervals between consecutive tokens of all its repeats (the median,
not the mean: a stall of another process should not move the figure). Single-process
generation is timed the same way before and after the swarms (the intervals pooled).
``--verify`` sets the client's verification (with it on, the default, every hop also sends
the client a copy of its output each step: a per-hop cost of its own).

Compute per token is the same whatever N (the blocks are only split differently), so the
slope of a least-squares line through (N, ms_per_token_p50) is what one more hop adds:
``per_hop_ms``; its ``intercept_ms`` is what is left at N = 0 (compute, the client's head
and sampling, and one round trip's fixed part).

Before each session's first decode step and after its last, the client reads every worker's
``compute_us`` counter (``pm.stats``: time in the worker's batcher step, i.e. the forward,
the hand-off to the compute thread and any wait for a batch): ``worker_step_ms`` is that
per decode step summed over the hops (a mean, where ms_per_token_p50 is a median: on a
loaded machine it can exceed the median), and ``outside_ms`` = ms_per_token_p50 -
worker_step_ms is what the network, the event loops, (de)serialisation, receipts and the
client's head and sampling take. Its slope against N (``outside_per_hop_ms``) is the
per-hop cost with the compute's noise taken out.

``--echo`` starts echo-mode workers (no weights: each returns its input unchanged) for the
model's shape (SmolLM2-135M's 30 blocks x 576 hidden without ``--model-path``), and the
client steps hidden states through an :class:`~pymesh.client.session.InferenceSession`:
the slope is then the transport and scheduling cost of a hop with no compute at all.

Rows: per (transport, workers) ``kind="point"`` with transport, workers, mode ("model" or
"echo"), model, verify, ms_per_token_p50, tokens_per_s, worker_step_ms, outside_ms, ttft_s,
single_process_ms_per_token_p50, single_process_ttft_s and ratio (swarm tokens/s over single
process; None in echo mode, which has no single-process counterpart); per transport
``kind="fit"`` with per_hop_ms, intercept_ms, outside_per_hop_ms and the counts fitted.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

from pymesh.settings import Settings, settings_of

log = logging.getLogger(__name__)

#: echo mode without --model-path: SmolLM2-135M's shape (blocks, hidden size)
ECHO_SHAPE = (30, 576)
#: what the issue asks of one added hop, per transport (ms)
GOALS_MS = {"tcp": 0.5, "quic": 1.0}
POINT_KEYS = ("kind", "transport", "workers", "mode", "model", "verify", "ms_per_token_p50", "tokens_per_s",
              "worker_step_ms", "outside_ms", "ttft_s",
              "single_process_ms_per_token_p50", "ratio", "single_process_ttft_s")
FIT_KEYS = ("kind", "transport", "mode", "model", "verify", "per_hop_ms", "intercept_ms", "outside_per_hop_ms",
            "workers_fitted")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", default=None, metavar="DIR",
                        help="model folder (default: SmolLM2-135M-Instruct from `pymesh model pull`)")
    parser.add_argument("--workers", default="1,2,3,5", metavar="N,N,...",
                        help="worker counts to measure (default 1,2,3,5)")
    parser.add_argument("--transports", default="tcp,quic", help="comma-separated: tcp,quic (default both)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length in tokens (default 128)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="tokens per session (default 64; --quick 32)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="sessions per transport and worker count, intervals pooled (default 3; --quick 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of each worker and of the baseline (default: half the cores)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype (default float32)")
    parser.add_argument("--verify", default=None, choices=["off", "sample", "all"],
                        help="the client's verification (default: $PYMESH_VERIFY, else sample; with it on, "
                             "every hop also sends the client a copy of its output each step)")
    parser.add_argument("--echo", action="store_true",
                        help="echo-mode workers (no weights): the transport and scheduling cost alone")


def worker_counts(text: str) -> list[int]:
    """``--workers 5,1,3`` -> [1, 3, 5]; every count at least 1."""
    from pymesh.errors import ConfigError

    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ConfigError(f"--workers {text!r} must be comma-separated integers, e.g. 1,2,3,5") from None
    if not counts or counts[0] < 1:
        raise ConfigError(f"--workers {text!r}: give at least one count, each at least 1")
    return counts


def interval_p50_ms(stamps: Sequence[Sequence[float]]) -> float:
    """Median over every run of the gaps between consecutive timestamps (seconds -> ms)."""
    gaps = [b - a for run in stamps for a, b in zip(run, run[1:])]
    if not gaps:
        raise ValueError("no token intervals: each run needs at least two tokens")
    return 1000.0 * statistics.median(gaps)


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float] | None:
    """Least-squares (slope, intercept) of ys against xs; None with fewer than two distinct xs."""
    if len(xs) != len(ys) or len(set(xs)) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


@dataclass
class Timing:
    """Token timestamps of each run of one configuration, and each run's time to first token."""

    stamps: list[list[float]] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    #: per run: the workers' own time per decode step, summed over the hops (ms; a mean)
    worker_ms: list[float] = field(default_factory=list)

    @property
    def p50_ms(self) -> float:
        return interval_p50_ms(self.stamps)

    @property
    def ttft_s(self) -> float:
        return min(self.ttfts)

    @property
    def worker_step_ms(self) -> float | None:
        return statistics.median(self.worker_ms) if self.worker_ms else None


def single_process(model_dir: Path, ids: list[int], n: int, repeats: int, dtype: str, into: Timing) -> None:
    """Time ``LocalModel.generate_ids`` token by token, ``repeats`` times."""
    from pymesh.model.generate import LocalModel
    from pymesh.model.sampling import SamplingParams

    model = LocalModel.load(model_dir, dtype=dtype)
    for _ in range(repeats):
        t0 = time.perf_counter()
        stamps = [time.perf_counter() for _tok in model.generate_ids(ids, SamplingParams(max_new_tokens=n),
                                                                     eos_ids=[])]
        into.stamps.append(stamps)
        into.ttfts.append(stamps[0] - t0)


#: awaited after the first token (the prefill) and after the last: the workers' compute clock
Mark = Callable[[], Awaitable[None]]


async def _no_mark() -> None:
    return None


async def model_session(swarm: Any, model: Any, ids: list[int], n: int, into: Timing, mark: Mark = _no_mark
                        ) -> None:
    """One greedy generation through the swarm; TTFT is the client's prefill time (no discovery)."""
    from pymesh.client.generation import GenerationStats, generate_tokens
    from pymesh.model.sampling import SamplingParams

    stats = GenerationStats()
    stamps: list[float] = []
    async for _t in generate_tokens(swarm, model, ids, SamplingParams(max_new_tokens=n), stats=stats,
                                    ignore_eos=True):
        if not stamps:
            await mark()      # not inside an interval: the first one starts after it
        stamps.append(time.perf_counter())
    await mark()
    into.stamps.append(stamps)
    into.ttfts.append(stats.prefill_s)


async def echo_session(swarm: Any, blocks: int, hidden: int, prompt: int, n: int, into: Timing,
                       mark: Mark = _no_mark) -> None:
    """A prompt-sized step then ``n - 1`` one-token steps of hidden states through echo workers."""
    import torch

    from pymesh.client.session import InferenceSession

    async with InferenceSession(swarm, 0, blocks, max_tokens=prompt + n) as session:
        t0 = time.perf_counter()
        await session.step(torch.zeros(1, prompt, hidden))
        ttft = time.perf_counter() - t0
        await mark()
        stamps = [time.perf_counter()]
        token = torch.zeros(1, 1, hidden)
        for _ in range(n - 1):
            await session.step(token)
            stamps.append(time.perf_counter())
        await mark()
    into.stamps.append(stamps)
    into.ttfts.append(ttft)


async def compute_us(swarm: Any, options: Sequence[Any]) -> int:
    """The sum of the workers' ``compute_us`` counters (time in their batcher's step: the
    forward, the hand-off to the compute thread and any wait for a batch)."""
    from pymesh.proto import session_wire as sw

    total = 0
    for o in options:
        meta, _ = await swarm.call(o, sw.STATS, {})
        total += sw.StatsReply.from_meta_untrusted(meta).compute_us
    return total


@dataclass
class HopsPlan:
    """What one run measures: the shape, the sessions and where the workers' weights are."""

    model_dir: Path | None        # None: echo mode
    model_name: str
    blocks: int
    hidden: int
    ids: list[int]
    n: int
    repeats: int
    transports: list[str]
    dtype: str
    threads: int
    settings: Settings

    @property
    def echo(self) -> bool:
        return self.model_dir is None


async def measure(bootstraps: dict[int, str], plan: HopsPlan, progress: Any, task: Any) -> dict[int, dict[str, Timing]]:
    """Sessions through every swarm (worker count -> bootstrap address) over every transport,
    interleaved: each repeat visits every (count, transport) once, so the load's drift falls
    on all counts alike and does not tilt the slope. One client Swarm per (count, transport)
    stays open throughout; each pays route discovery and first-call costs in a two-token
    warm-up before anything is measured."""
    from contextlib import AsyncExitStack

    from pymesh.client.swarm import Swarm

    model: Any = None
    if plan.model_dir is not None:
        from pymesh.client.generation import ClientModel

        model = ClientModel(plan.model_dir, dtype=plan.dtype)
    model_id = "echo" if model is None else model.model_id
    out = {count: {t: Timing() for t in plan.transports} for count in bootstraps}

    async def session(swarm: Any, n: int, into: Timing, options: Sequence[Any] = ()) -> None:
        clock: list[int] = []

        async def mark() -> None:
            if options:
                clock.append(await compute_us(swarm, options))

        if model is None:
            await echo_session(swarm, plan.blocks, plan.hidden, len(plan.ids), n, into, mark)
        else:
            await model_session(swarm, model, plan.ids, n, into, mark)
        if len(clock) == 2:
            into.worker_ms.append((clock[1] - clock[0]) / 1000.0 / (n - 1))

    async with AsyncExitStack() as stack:
        swarms, options = {}, {}
        for count, bootstrap in bootstraps.items():
            for t in plan.transports:
                progress.update(task, description=f"{count} workers over {t}: warm-up")
                swarm = await stack.enter_async_context(Swarm([bootstrap], model_id, transport=t,
                                                              settings=plan.settings))
                await session(swarm, 2, Timing())
                swarms[count, t] = swarm
                options[count, t] = swarm.options_from(await swarm.records())
                if len(options[count, t]) != count:
                    log.warning("bench hops: the %d-worker swarm lists %d workers over %s; worker_step_ms "
                                "sums those", count, len(options[count, t]), t)
        for r in range(plan.repeats):
            for (count, t), swarm in swarms.items():
                progress.update(task, description=f"{count} workers over {t}: session {r + 1}/{plan.repeats}")
                await session(swarm, plan.n, out[count][t], options[count, t])
                progress.advance(task)
    return out


def start_workers(sup: Any, plan: HopsPlan, spans: list[tuple[int, int]], tmp: Path) -> str:
    """A bootstrap and one worker per span under ``sup``; returns the bootstrap's address once
    every worker has joined."""
    from pymesh.demo.procs import free_port, pymesh_argv

    bport = free_port()
    boot = sup.spawn("bootstrap", pymesh_argv("bootstrap", "--host", "127.0.0.1", "--port", str(bport)))
    boot.wait_for_output("bootstrap address", 60)
    weights = [] if plan.model_dir is None else ["--model-path", str(plan.model_dir), "--dtype", plan.dtype]
    workers = []
    for i, (a, b) in enumerate(spans):
        workers.append(sup.spawn(f"worker{i}", pymesh_argv(
            "worker", "--bootstrap", f"127.0.0.1:{bport}", "--host", "127.0.0.1", "--port", str(free_port()),
            "--layers", f"{a}-{b - 1}", *weights, "--transport", "both",
            "--identity", str(tmp / f"w{i}.key"), "--threads", str(plan.threads))))
    for w in workers:
        w.wait_for_output("Worker bootstrapped", 180)
    return f"127.0.0.1:{bport}"


def make_plan(args: argparse.Namespace) -> HopsPlan:
    from pymesh.bench.swarm import prompt_of
    from pymesh.errors import ConfigError
    from pymesh.model.torch_setup import configure_threads

    settings = settings_of(args)
    if args.verify is not None:
        settings = dataclasses.replace(settings, client=dataclasses.replace(settings.client, verify=args.verify))
    quick = getattr(args, "quick", False)
    n = args.new_tokens or (32 if quick else 64)
    if n < 2:
        raise ConfigError(f"--new-tokens {n}: at least 2 (a per-token interval needs two tokens)")
    model_dir: Path | None = None
    name, (blocks, hidden), ids = "echo", ECHO_SHAPE, [0] * args.prompt_tokens
    if args.model_path or not args.echo:
        if args.model_path:
            model_dir = Path(args.model_path)
        else:
            from pymesh.model.pull import pull_default_model

            model_dir = pull_default_model(progress=True, root=settings.runtime.cache_root(),
                                           gguf=settings.runtime.smollm2_gguf)
        from pymesh.model.config import load_config

        cfg = load_config(model_dir)
        blocks, hidden = cfg.num_hidden_layers, cfg.hidden_size
        if args.echo:    # echo workers of this model's shape
            name, model_dir = f"echo ({model_dir.name})", None
        else:
            from pymesh.model.tokenizer import load_tokenizer

            name, ids = model_dir.name, prompt_of(load_tokenizer(model_dir), args.prompt_tokens)
    return HopsPlan(model_dir, name, blocks, hidden, ids, n=n, repeats=args.repeats or (2 if quick else 3),
                    transports=[t for t in args.transports.split(",") if t], dtype=args.dtype,
                    threads=configure_threads(settings.runtime.threads_or(args.threads)), settings=settings)


def run_rows(args: argparse.Namespace, progress: Any) -> list[dict[str, Any]]:
    import trio
    from contextlib import ExitStack

    from pymesh.bench.swarm import CHILD_ENV, even_split
    from pymesh.demo.procs import Supervisor

    plan = make_plan(args)
    counts = worker_counts(args.workers)
    baseline = 0 if plan.echo else 2
    task = progress.add_task("bench hops", total=baseline + len(counts) + plan.repeats * len(counts) * len(plan.transports))
    single = Timing()
    if plan.model_dir is not None:
        progress.update(task, description=f"single process: {len(plan.ids)}-token prompt, {plan.n} tokens")
        single_process(plan.model_dir, plan.ids, plan.n, plan.repeats, plan.dtype, single)
        progress.advance(task)
    env = {**os.environ, **CHILD_ENV, "PYMESH_THREADS": str(plan.threads), "PYMESH_SKIP_THROUGHPUT": "1"}
    # Every swarm stays up until the end (idle workers cost little but a heartbeat), each with
    # its own bootstrap so their records never mix.
    with tempfile.TemporaryDirectory(prefix="pymesh-bench-hops-") as tmp, ExitStack() as stack:
        bootstraps = {}
        for count in counts:
            spans = even_split(plan.blocks, count)
            root = Path(tmp) / f"n{len(spans)}"
            sup = stack.enter_context(Supervisor(root, env={**env, "PYMESH_HOME": str(root)}))
            progress.update(task, description=f"starting a bootstrap and {len(spans)} workers")
            bootstraps[len(spans)] = start_workers(sup, plan, spans, root)
            progress.advance(task)
        measured = trio.run(measure, bootstraps, plan, progress, task)
    if plan.model_dir is not None:
        # Again after the swarms: the machine's load drifts; both runs' intervals are pooled.
        progress.update(task, description="single process again")
        single_process(plan.model_dir, plan.ids, plan.n, plan.repeats, plan.dtype, single)
        progress.advance(task)
    log.info("threads per process: %d; prompt %d tokens; %d new tokens; %d repeats; verify %s",
             plan.threads, len(plan.ids), plan.n, plan.repeats, plan.settings.client.verify)
    return rows_of(plan, measured, single)


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def rows_of(plan: HopsPlan, measured: dict[int, dict[str, Timing]], single: Timing) -> list[dict[str, Any]]:
    """Point rows per (transport, workers), then a fit row per transport."""
    common = {"mode": "echo" if plan.echo else "model", "model": plan.model_name, "verify": plan.settings.client.verify}
    sp_ms = single.p50_ms if single.stamps else None
    rows: list[dict[str, Any]] = []
    for t in plan.transports:
        for workers in sorted(measured):
            timing = measured[workers][t]
            ms, worker_ms = timing.p50_ms, timing.worker_step_ms
            rows.append({"kind": "point", "transport": t, "workers": workers, **common,
                         "ms_per_token_p50": round(ms, 3), "tokens_per_s": _r(1000.0 / ms if ms > 0 else None, 2),
                         "worker_step_ms": _r(worker_ms),
                         "outside_ms": _r(None if worker_ms is None else ms - worker_ms),
                         "ttft_s": round(timing.ttft_s, 4), "single_process_ms_per_token_p50": _r(sp_ms),
                         "ratio": _r(sp_ms / ms if sp_ms and ms > 0 else None),
                         "single_process_ttft_s": _r(single.ttft_s if single.ttfts else None, 4)})
    for t in plan.transports:
        points = [r for r in rows if r["kind"] == "point" and r["transport"] == t]
        xs = [float(r["workers"]) for r in points]
        fit = fit_line(xs, [r["ms_per_token_p50"] for r in points])
        outside = [r["outside_ms"] for r in points]
        fit_out = fit_line(xs, outside) if None not in outside else None
        rows.append({"kind": "fit", "transport": t, **common,
                     "per_hop_ms": _r(None if fit is None else fit[0]),
                     "intercept_ms": _r(None if fit is None else fit[1]),
                     "outside_per_hop_ms": _r(None if fit_out is None else fit_out[0]),
                     "workers_fitted": [r["workers"] for r in points]})
    return rows


def render(rows: list[dict[str, Any]]) -> Any:
    from rich.console import Group
    from rich.table import Table

    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    points = [r for r in rows if r.get("kind") == "point"]
    fits = [r for r in rows if r.get("kind") == "fit"]
    model = rows[0].get("model", "?") if rows else "?"
    table = Table(title=f"one session through N workers, {model}, greedy (loopback; median of per-token intervals; "
                        "workers ms: their own step time, summed)")
    for col in ("transport", "N", "ms/tok p50", "tok/s", "workers ms", "outside ms", "TTFT s", "1-proc ms/tok",
                "ratio"):
        table.add_column(col, justify="left" if col == "transport" else "right")
    for r in points:
        table.add_row(r["transport"], str(r["workers"]), f"{r['ms_per_token_p50']:.2f}", num(r["tokens_per_s"], ".1f"),
                      num(r["worker_step_ms"], ".2f"), num(r["outside_ms"], ".2f"), f"{r['ttft_s']:.3f}",
                      num(r["single_process_ms_per_token_p50"], ".2f"), num(r["ratio"], ".2f"))
    fit_table = Table(title="cost of each added hop: least-squares slope of ms/token (and of outside ms) against N")
    for col in ("transport", "mode", "verify", "ms/hop", "goal", "intercept", "outside ms/hop", "N"):
        fit_table.add_column(col, justify="left" if col in ("transport", "mode", "verify") else "right")
    for r in fits:
        goal = GOALS_MS.get(r["transport"])
        fit_table.add_row(r["transport"], r["mode"], r["verify"], num(r["per_hop_ms"], ".3f"), num(goal, ".1f"),
                          num(r["intercept_ms"], ".2f"), num(r["outside_per_hop_ms"], ".3f"),
                          ",".join(map(str, r["workers_fitted"])))
    return Group(table, fit_table)
