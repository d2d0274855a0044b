"""Concurrent sessions for ``pymesh bench swarm --sessions 1,4,8,16``.

For each N: N generations at once through the swarm (one client process, one shared
:class:`~pymesh.client.swarm.Swarm` and client model, N trio tasks, each with its own
prompt of ``--prompt-tokens`` tokens and ``--new-tokens`` greedy tokens, EOS ignored), and
the same work in one process: 1 session alone, and N sessions batched as one
``[N, seq, hidden]`` prefill then N rows per decode step (the LM head over N rows).

Per row: ``aggregate_tokens_per_s`` = every session's tokens / wall time from the start of
all N to the end of the last (prefill included); ``per_session_tokens_per_s_p50`` = median
over sessions of (tokens after the first) / (last token time - first token time);
``ttft_s_p50`` = median over sessions of the time from the session's start (opening the
session included: under load that is where waiting shows) to its first token. Route
discovery is paid once per transport by a 1-token warm-up before any measured run.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pymesh.settings import Settings

SESSION_KEYS = ("transport", "workers", "sessions", "model", "aggregate_tokens_per_s",
                "per_session_tokens_per_s_p50", "ttft_s_p50")
#: the ``transport`` of the single-process rows
LOCAL = "single-process"
LOCAL_BATCHED = "single-process-batched"


@dataclass
class SessionTiming:
    """One session's clock: start, first token, last token (perf_counter seconds), token count."""

    start: float
    first: float
    last: float
    tokens: int

    @property
    def rate(self) -> float:
        span = self.last - self.first
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else 0.0


@dataclass
class SessionsRun:
    """N sessions run together: each one's timing and the wall time of all."""

    timings: list[SessionTiming]
    wall_s: float
    #: each session's tokens, where the run keeps them (the single-process batch does)
    tokens: list[list[int]] = field(default_factory=list)

    @property
    def aggregate(self) -> float:
        return sum(t.tokens for t in self.timings) / self.wall_s if self.wall_s > 0 else 0.0


def prompts_for(base: list[int], count: int, length: int) -> list[list[int]]:
    """``count`` different prompts of ``length`` tokens: windows of ``base`` starting one apart."""
    if len(base) < length + count - 1:
        raise ValueError(f"need {length + count - 1} base tokens for {count} prompts of {length}, got {len(base)}")
    return [base[i:i + length] for i in range(count)]


def best(runs: list[SessionsRun]) -> SessionsRun:
    """The run with the highest aggregate throughput (the machine's load drifts)."""
    return max(runs, key=lambda r: r.aggregate)


def row(transport: str, workers: int, model: str, run: SessionsRun) -> dict[str, Any]:
    return {
        "transport": transport, "workers": workers, "sessions": len(run.timings), "model": model,
        "aggregate_tokens_per_s": round(run.aggregate, 2),
        "per_session_tokens_per_s_p50": round(statistics.median(t.rate for t in run.timings), 2),
        "ttft_s_p50": round(statistics.median(t.first - t.start for t in run.timings), 4),
    }


@torch.inference_mode()
def local_batched(model: Any, prompts: list[list[int]], n: int) -> SessionsRun:
    """``len(prompts)`` equal-length prompts as one batch through a :class:`LocalModel`:
    one prefill ``[N, seq, hidden]``, then ``n - 1`` decode steps of N rows, greedy."""
    b, length = len(prompts), len(prompts[0])
    if any(len(p) != length for p in prompts):
        raise ValueError("batched prompts must have equal lengths")
    cache = model.span.new_cache(length + n, batch=b)
    t0 = time.perf_counter()
    hidden = model.head.embed(torch.tensor(prompts))
    pos, first, steps = 0, t0, []
    while True:
        out = model.span.forward(hidden, cache, pos)
        pos += hidden.shape[1]
        picks = model.head.logits(out[:, -1]).argmax(dim=-1)  # [N]
        steps.append(picks)
        if len(steps) == 1:
            first = time.perf_counter()
        if len(steps) == n:
            break
        hidden = model.head.embed(picks[:, None])
    last = time.perf_counter()
    tokens = torch.stack(steps, dim=1).tolist()
    return SessionsRun([SessionTiming(t0, first, last, n) for _ in range(b)], last - t0, tokens)


async def swarm_sessions(bootstrap: str, model_dir: Path, transport: str, prompts: list[list[int]], n: int,
                         counts: list[int], repeats: int, dtype: str, settings: Settings | None = None
                         ) -> dict[int, SessionsRun]:
    """For each N in ``counts``: N concurrent generations through one Swarm; best of ``repeats``."""
    import trio

    from pymesh.client.generation import ClientModel, generate_tokens
    from pymesh.client.swarm import Swarm
    from pymesh.model.sampling import SamplingParams

    model = ClientModel(model_dir, dtype=dtype)
    params = SamplingParams(max_new_tokens=n)

    async def session(ids: list[int], out: list[SessionTiming], limit: SamplingParams) -> None:
        start = time.perf_counter()
        first, count = start, 0
        async for _token in generate_tokens(swarm, model, ids, limit, ignore_eos=True):
            count += 1
            if count == 1:
                first = time.perf_counter()
        out.append(SessionTiming(start, first, time.perf_counter(), count))

    results: dict[int, SessionsRun] = {}
    async with Swarm([bootstrap], model.model_id, transport=transport, settings=settings) as swarm:
        await session(prompts[0], [], SamplingParams(max_new_tokens=1))  # route discovery, not measured
        for count in counts:
            runs = []
            for _ in range(repeats):
                timings: list[SessionTiming] = []
                t0 = time.perf_counter()
                async with trio.open_nursery() as nursery:
                    for ids in prompts[:count]:
                        nursery.start_soon(session, ids, timings, params)
                runs.append(SessionsRun(timings, time.perf_counter() - t0))
            results[count] = best(runs)
    return results


def render_rows(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    model = rows[0]["model"] if rows else "?"
    table = Table(title=f"concurrent sessions, {model} (random weights if synthetic), greedy; higher tokens/s is better")
    for col in ("transport", "workers", "N", "total tok/s", "p50 tok/s each", "p50 TTFT s"):
        table.add_column(col, justify="left" if col == "transport" else "right", no_wrap=col == "transport")
    for r in rows:
        table.add_row(r["transport"], str(r["workers"]), str(r["sessions"]), f"{r['aggregate_tokens_per_s']:.1f}",
                      f"{r['per_session_tokens_per_s_p50']:.1f}", f"{r['ttft_s_p50']:.3f}")
    return table
