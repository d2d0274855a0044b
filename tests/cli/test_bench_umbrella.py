"""``pymesh bench`` over all parts, with stand-in part modules (no real benchmark runs)."""

from __future__ import annotations

import argparse
import json
import types
from pathlib import Path
from typing import Any

import pytest
from rich.table import Table

from pymesh.cli import bench


def fake_part(name: str, rows: list[dict[str, Any]], *, fail: bool = False) -> types.ModuleType:
    mod = types.ModuleType(f"pymesh.bench.{name}")
    seen: dict[str, Any] = {}

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--reps", type=int, default=7)

    def run_rows(args: argparse.Namespace, progress: Any) -> list[dict[str, Any]]:
        seen["quick"] = args.quick
        seen["reps"] = args.reps
        task = progress.add_task(f"{name}", total=1)
        progress.advance(task)
        if fail:
            raise RuntimeError(f"{name} exploded")
        return rows

    def render(rows: list[dict[str, Any]]) -> Table:
        t = Table(title=f"table of {name}")
        t.add_column(f"column of {name}")
        for _ in rows:
            t.add_row("x")
        return t

    mod.add_arguments, mod.run_rows, mod.render, mod.seen = add_arguments, run_rows, render, seen  # type: ignore[attr-defined]
    return mod


ROWS = {
    "kernels": [
        {"op": "rms_norm", "tokens": 1, "hidden": 576, "dtype": "float32", "ref_us": 10.0, "fused_us": 2.0, "speedup": 5.0},
        {"op": "rms_norm", "tokens": 512, "hidden": 576, "dtype": "float32", "ref_us": 100.0, "fused_us": 125.0, "speedup": 0.8},
    ],
    "dht": [{"nodes": 1000, "success_rate": 1.0, "median_rounds": 3, "p95_rounds": 4, "messages_per_lookup": 30.0}],
    "swarm": [{"transport": "quic", "workers": 3, "ttft_s": 0.15, "decode_tokens_per_s": 60.0,
               "single_process_tokens_per_s": 65.0, "ratio": 0.92}],
}


@pytest.fixture
def parts(monkeypatch: pytest.MonkeyPatch) -> dict[str, types.ModuleType]:
    mods = {name: fake_part(name, rows) for name, rows in ROWS.items()}
    mods["transport"] = fake_part("transport", [], fail=True)
    monkeypatch.setenv("COLUMNS", "200")
    # "generate" stays missing: the umbrella must say so and go on.
    monkeypatch.setattr(bench, "_module", lambda part: mods.get(part))
    return mods


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p.parse_args(argv)


def test_all_parts_json_out_and_summary(parts: dict[str, types.ModuleType], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "rows.json"
    code = bench.run(parse(["--json", "--quick", "--out", str(out_file)]))
    assert code == 1  # the transport part failed
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert rows == json.loads(out_file.read_text())
    assert {r["part"] for r in rows} == {"kernels", "dht", "swarm"}
    assert len(rows) == 4
    # Each part got --quick and its own defaults.
    assert parts["kernels"].seen == {"quick": True, "reps": 7}
    err = captured.err
    assert "column of kernels" in err and "benchmark summary" in err
    assert "bench generate: not available in this build" in err
    assert "transport exploded" in err
    # Kernel goals: decode speedup 5 >= 2 met; prefill 0.8 < 1 not met.
    kern = bench.headlines("kernels", ROWS["kernels"])
    assert [(h.measured, h.met) for h in kern] == [(5.0, True), (0.8, False)]
    # The GEMV rows do not count towards the fused ops' goals.
    gemv = {"op": "linear", "tokens": 1, "hidden": "576x576", "dtype": "float32", "speedup": 0.5}
    assert bench.headlines("kernels", ROWS["kernels"] + [gemv])[0].measured == 5.0


def test_headlines_read_goals_and_tolerate_missing_keys() -> None:
    sw = bench.headlines("swarm", ROWS["swarm"])
    assert [h.met for h in sw] == [True, True, True]
    assert bench.headlines("dht", ROWS["dht"])[0].met is True
    gen = bench.headlines("generate", [
        {"engine": "pymesh", "dtype": "float32", "decode_tokens_per_s": 71.0, "prefill_s": 0.1},
        {"engine": "transformers", "dtype": "float32", "decode_tokens_per_s": 25.0, "prefill_s": 0.2},
    ])
    assert (gen[0].measured, gen[0].met) == (71.0, True)
    assert gen[1].met is None  # no bf16 row
    tr = bench.headlines("transport", [
        {"transport": "pymesh-quic", "packet_size": 1452, "rtt_us_median": 250, "rtt_us_p99": 400, "mb_per_s": 90},
        {"transport": "aioquic-asyncio", "packet_size": 1452, "rtt_us_median": 470, "rtt_us_p99": 900, "mb_per_s": 60},
    ])
    assert tr[0].met is True and tr[1].measured == pytest.approx(1.5) and tr[1].met is True
    assert bench.headlines("swarm", [{"nothing": 1}])[0].met is None


def test_single_part_rows_untagged(parts: dict[str, types.ModuleType], capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.run(parse(["dht", "--json"])) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == ROWS["dht"]
    assert bench.run(parse(["generate"])) == 2
