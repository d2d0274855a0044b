"""``pymesh bench [PART] [--json] [--out FILE] [--quick]``.

Each part is a module ``pymesh.bench.<part>`` with ``add_arguments(parser)``,
``run_rows(args, progress) -> list[dict]`` and ``render(rows) -> rich Table``, and
optionally ``unavailable() -> str | None`` (why it cannot run on this machine: shown,
and the part is skipped as not available).
Without a part, every part runs in turn (an overall progress bar above each part's
own), prints its table, and a summary table closes the run: each part's headline
figure against its goal. Rows are then tagged with ``part``. With ``--json`` the rows
go to stdout and the tables to stderr, so stdout stays machine-readable.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from pymesh.cli.common import load_optional

log = logging.getLogger(__name__)

PARTS = ("kernels", "generate", "quant", "transport", "dht", "swarm", "hops", "serve", "verify", "nat")

Row = dict[str, Any]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the rows as JSON to stdout")
    parser.add_argument("--out", default=None, help="also write the rows as JSON to this file")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repetitions and sizes (the whole suite in about 2 minutes)")
    sub = parser.add_subparsers(dest="part", metavar="PART")
    for part in PARTS:
        sp = sub.add_parser(part, help=f"the {part} benchmark")
        sp.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the rows as JSON to stdout")
        sp.add_argument("--out", default=argparse.SUPPRESS, help="also write the rows as JSON to this file")
        sp.add_argument("--quick", action="store_true", default=argparse.SUPPRESS, help="fewer repetitions")
        module = _module(part)
        if module is not None:
            module.add_arguments(sp)


def _module(part: str) -> Any:
    return load_optional(f"pymesh.bench.{part}")


def _unavailable(module: Any) -> str | None:
    """Why a part cannot run on this machine (a part may define ``unavailable()``), or None."""
    check = getattr(module, "unavailable", None)
    return None if check is None else check()


def _part_args(module: Any, args: argparse.Namespace) -> argparse.Namespace:
    """A part's own defaults plus the shared flags (running all parts)."""
    sp = argparse.ArgumentParser()
    module.add_arguments(sp)
    part_args = sp.parse_args([])
    for key in ("json", "out", "quick"):
        setattr(part_args, key, getattr(args, key))
    if hasattr(args, "settings"):
        part_args.settings = args.settings
    return part_args


@dataclass
class PartResult:
    part: str
    rows: list[Row]
    seconds: float
    error: str | None = None     # None = ran; "not available" / the exception otherwise


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not getattr(args, "verbose", 0):
        # Swarm and transport parts run clients, workers and DHT nodes in this process:
        # their INFO lines would bury the tables (-v brings them back).
        for name in ("pymesh.client", "pymesh.worker", "pymesh.net", "pymesh.model"):
            logging.getLogger(name).setLevel(logging.WARNING)
    err = Console(stderr=True)
    out = err if args.json else Console()
    single = args.part is not None
    parts = [args.part] if single else list(PARTS)
    results: list[PartResult] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        overall = None if single else progress.add_task("bench: all parts", total=len(parts))
        for part in parts:
            module = _module(part)
            if module is None:
                err.print(f"[yellow]bench {part}: not available in this build (pymesh/bench/{part}.py is missing)[/]")
                if single:
                    return 2
                results.append(PartResult(part, [], 0.0, "not available"))
            elif (why := _unavailable(module)) is not None:
                err.print(f"[yellow]bench {part}: not available here: {why}[/]")
                if single:
                    return 2
                results.append(PartResult(part, [], 0.0, "not available"))
            else:
                if overall is not None:
                    progress.update(overall, description=f"bench: {part}")
                results.append(_run_part(part, module, args if single else _part_args(module, args),
                                         progress, out, single))
            if overall is not None:
                progress.advance(overall)
    all_rows = [row if single else {"part": r.part, **row} for r in results for row in r.rows]
    if not single:
        out.print(summary_table(results, quick=args.quick))
    if args.json:
        json.dump(all_rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(all_rows, f, indent=1)
            f.write("\n")
        err.print(f"wrote {len(all_rows)} rows to {args.out}")
    failed = [r.part for r in results if r.error not in (None, "not available")]
    return 1 if failed else 0


def _run_part(part: str, module: Any, part_args: argparse.Namespace, progress: Any, out: Any,
              single: bool) -> PartResult:
    t0 = time.perf_counter()
    try:
        rows = list(module.run_rows(part_args, progress))
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        if single:
            raise
        log.debug("bench %s failed", part, exc_info=True)
        progress.console.print(f"[red]bench {part} failed: {type(exc).__name__}: {exc}[/]")
        return PartResult(part, [], time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - t0
    out.print(module.render(rows))
    if not single:
        out.print(f"[dim]bench {part}: {len(rows)} rows in {seconds:.1f}s[/]")
    return PartResult(part, rows, seconds)


# ---- summary: each part's headline figure against its goal ------------------------------

@dataclass(frozen=True)
class Headline:
    metric: str
    measured: float | None
    goal: str
    met: bool | None


_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _num(row: Row, key: str) -> float | None:
    value = row.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _vals(rows: list[Row], key: str, pred: Callable[[Row], bool] = lambda r: True) -> list[float]:
    return [v for r in rows if pred(r) and (v := _num(r, key)) is not None]


def _at_least(metric: str, values: list[float], goal: float, unit: str = "",
              agg: Callable[[list[float]], float] = min) -> Headline:
    if not values:
        return Headline(metric, None, f">= {goal:g}{unit}", None)
    v = agg(values)
    return Headline(metric, v, f">= {goal:g}{unit}", v >= goal)


def _at_most(metric: str, values: list[float], goal: float, unit: str = "") -> Headline:
    if not values:
        return Headline(metric, None, f"<= {goal:g}{unit}", None)
    v = max(values)
    return Headline(metric, v, f"<= {goal:g}{unit}", v <= goal)


def _engine_dtype(engine: str, dtype: str) -> Callable[[Row], bool]:
    def pred(r: Row) -> bool:
        got = str(r.get("dtype"))
        return r.get("engine") == engine and _DTYPE_NAMES.get(got, got) == dtype

    return pred


def headlines(part: str, rows: list[Row]) -> list[Headline]:
    """The goals the issues set for each part, read from its rows (missing keys: n/a)."""
    if part == "kernels":
        # The goals are for the fused ops; the GEMV ("linear") is judged by generate.
        def fused(r: Row) -> bool:
            return r.get("op") != "linear"

        return [
            _at_least("min fused-op speedup, decode (<= 8 tokens)",
                      _vals(rows, "speedup", lambda r: fused(r) and (_num(r, "tokens") or 0) <= 8), 2.0, "x"),
            _at_least("min fused-op speedup, prefill (> 8 tokens)",
                      _vals(rows, "speedup", lambda r: fused(r) and (_num(r, "tokens") or 0) > 8), 1.0, "x"),
        ]
    if part == "generate":
        out = []
        for dtype, goal in (("float32", 70.0), ("bfloat16", 130.0)):
            pym = _vals(rows, "decode_tokens_per_s", _engine_dtype("pymesh", dtype))
            out.append(_at_least(f"pymesh decode tok/s {dtype}", pym, goal, " tok/s", agg=max))
        fp32 = _vals(rows, "decode_tokens_per_s", _engine_dtype("pymesh", "float32"))
        for dtype, goal in (("q4_1", 3.0), ("q8_0", 1.8)):  # issue 15: quantized decode vs fp32
            q = _vals(rows, "decode_tokens_per_s", _engine_dtype("pymesh", dtype))
            ratio = [max(q) / max(fp32)] if q and fp32 else []
            out.append(_at_least(f"pymesh {dtype} vs fp32 decode", ratio, goal, "x"))
        llama = _vals(rows, "decode_tokens_per_s", lambda r: r.get("engine") == "llama.cpp")
        q41 = _vals(rows, "decode_tokens_per_s", lambda r: r.get("engine") == "pymesh" and r.get("weights") == "gguf file")
        if llama and q41:
            out.append(_at_least("pymesh GGUF vs llama.cpp decode", [max(q41) / max(llama)], 1.0, "x"))
        return out
    if part == "transport":
        def quic(r: Row) -> bool:
            return r.get("transport") == "pymesh-quic"

        q1452 = _vals(rows, "mb_per_s", lambda r: quic(r) and _num(r, "packet_size") == 1452)
        a1452 = _vals(rows, "mb_per_s", lambda r: r.get("transport") == "aioquic-asyncio"
                      and _num(r, "packet_size") == 1452)
        ratio = [max(q1452) / max(a1452)] if q1452 and a1452 and max(a1452) > 0 else []
        return [
            _at_most("pymesh-quic rtt median", _vals(rows, "rtt_us_median", quic), 300.0, " us"),
            _at_least("quic MB/s vs aioquic @1452", ratio, 1.2, "x"),
            _at_least("pymesh-quic MB/s @16K", _vals(rows, "mb_per_s", lambda r: quic(r)
                      and (_num(r, "packet_size") or 0) >= 16000), 500.0, " MB/s", agg=max),
            _at_least("pymesh-tcp MB/s", _vals(rows, "mb_per_s", lambda r: r.get("transport") == "pymesh-tcp"),
                      1000.0, " MB/s", agg=max),
        ]
    if part == "dht":
        return [_at_most("median rounds @1000 nodes",
                         _vals(rows, "median_rounds", lambda r: _num(r, "nodes") == 1000), 4.0),
                _at_least("min success rate", _vals(rows, "success_rate"), 0.99)]
    if part == "swarm":
        return [
            _at_least("decode ratio to single process", _vals(rows, "ratio"), 0.85, "x"),
            # Petals 2.2 on this machine, same model and shape, side by side on 2026-12-07: 11.3-12.1 tok/s
            _at_least("decode tok/s (3x Petals 11.7)", _vals(rows, "decode_tokens_per_s"), 35.0, " tok/s", agg=max),
            _at_most("TTFT, 128-token prompt", _vals(rows, "ttft_s"), 0.2, " s"),
        ]
    if part == "hops":
        def fit(transport: str) -> Callable[[Row], bool]:
            return lambda r: r.get("kind") == "fit" and r.get("transport") == transport

        return [_at_most(f"cost of each added hop, {t}", _vals(rows, "per_hop_ms", fit(t)), goal, " ms")
                for t, goal in (("tcp", 0.5), ("quic", 1.0))]
    if part == "verify":
        def speed(mode: str) -> Callable[[Row], bool]:
            return lambda r: r.get("kind") == "speed" and r.get("verify") == mode

        first_p1 = _vals(rows, "first_detected", lambda r: r.get("kind") == "detection" and _num(r, "p") == 1.0)
        return [
            _at_most("decode cost of the default (sample)", [100 * v for v in _vals(rows, "cost", speed("sample"))],
                     5.0, " %"),
            _at_least("p=1 caught in the first session", first_p1, 1.0),
            _at_most("honest workers convicted", _vals(rows, "false_positives",
                                                       lambda r: r.get("kind") == "detection"), 0.0),
        ]
    if part == "nat":
        s = next((r for r in rows if r.get("kind") == "summary"), {})
        punched = s.get("punch_every_eim_case")
        return [
            Headline("EIM cases hole-punched", None if punched is None else float(punched), "all", punched),
            _at_least("relayed / direct throughput", _vals(rows, "relayed_min_throughput_x"), 0.5, "x"),
            _at_most("relayed / direct round trip", _vals(rows, "relayed_max_rtt_x"), 2.0, "x"),
        ]
    return []


def summary_table(results: list[PartResult], *, quick: bool = False) -> Any:
    from rich.table import Table
    from rich.text import Text

    title = "benchmark summary" + (" (--quick: fewer repetitions, noisier)" if quick else "")
    table = Table(title=title, title_justify="left")
    for col, justify in (("part", "left"), ("headline", "left"), ("measured", "right"),
                         ("goal", "right"), ("met", "left"), ("time", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in results:
        if r.error is not None:
            table.add_row(r.part, Text(r.error, style="yellow" if r.error == "not available" else "red"),
                          "-", "-", "-", f"{r.seconds:.0f}s")
            continue
        lines = headlines(r.part, r.rows) or [Headline("rows", float(len(r.rows)), "-", None)]
        for i, h in enumerate(lines):
            met = Text("n/a", style="dim") if h.met is None else (
                Text("yes", style="green") if h.met else Text("no", style="red"))
            table.add_row(r.part if i == 0 else "", h.metric,
                          "-" if h.measured is None else f"{h.measured:.3g}", h.goal, met,
                          f"{r.seconds:.0f}s" if i == 0 else "")
    return table
