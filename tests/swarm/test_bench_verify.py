"""``pymesh bench verify``: its predictions and summaries (pure), and a smoke run on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pymesh.bench.verify import convicted_peers, detection_row, predicted, render, report_of, speed_rows


def _enumerated(p: float, rate: float, n: int, first: bool) -> float:
    """P(caught) by brute force over which steps are sampled and which corrupted."""
    import itertools

    total = 0.0
    for checked in itertools.product([False, True], repeat=n):
        if first and not checked[0]:
            continue
        pc = 1.0
        for j, c in enumerate(checked):
            pc *= 1.0 if first and j == 0 else (rate if c else 1 - rate)
        last = max((j for j, c in enumerate(checked) if c), default=-1)
        for bad in itertools.product([False, True], repeat=n):
            pb = 1.0
            for b in bad:
                pb *= p if b else 1 - p
            if any(bad[: last + 1]):
                total += pc * pb
    return total


def test_predictions() -> None:
    assert predicted(1.0, 0.1, 16, first=True) == pytest.approx(1.0)
    assert predicted(1.0, 0.1, 1, first=False) == pytest.approx(0.1)
    assert predicted(0.02, 1.0, 10, first=False) == pytest.approx(1 - 0.98 ** 10)
    assert predicted(0.5, 0.1, 0, first=True) == 0.0
    for p, rate, n, first in [(0.1, 0.1, 6, False), (0.1, 0.1, 6, True), (0.3, 0.25, 5, True), (0.02, 0.5, 4, False)]:
        assert predicted(p, rate, n, first) == pytest.approx(_enumerated(p, rate, n, first)), (p, rate, n, first)
    # comparing every step since the last check catches more than comparing the sampled ones only
    assert predicted(0.1, 0.1, 32, first=False) > 1 - 0.99 ** 32


def _session(trial: int, session: int, convicted: bool, steps: int, fp: list[str] | None = None,
             through: bool = True) -> dict[str, Any]:
    return {"kind": "session", "trial": trial, "session": session, "through_bad": through, "convicted": convicted,
            "steps": steps, "false_positives": fp or [], "checks": 3, "mismatches": int(convicted),
            "unverified": False, "error": None}


def test_detection_row_splits_first_and_later_sessions() -> None:
    sessions = [_session(1, 1, True, 1),
                _session(2, 1, False, 16), _session(2, 2, True, 7),
                _session(3, 1, False, 16), _session(3, 2, False, 16, fp=["honest"]),
                _session(4, 1, False, 16, through=False)]
    row = detection_row(0.1, 0.1, 16, sessions)
    assert row["trials"] == 4 and row["sessions"] == 6 and row["sessions_through_bad"] == 5
    assert row["first_sessions"] == 3 and row["first_detected"] == pytest.approx(1 / 3, abs=1e-4)
    assert row["later_sessions"] == 2 and row["later_detected"] == 0.5
    assert row["first_predicted"] == pytest.approx(predicted(0.1, 0.1, 16, True), abs=1e-4)
    assert row["steps_to_detection_mean"] == 4.0 and row["steps_to_detection_max"] == 7
    assert row["trials_convicting"] == 2 and row["false_positives"] == 1 and row["mismatches"] == 2


def test_speed_rows_cost_against_off() -> None:
    def run(rate: float, checks: int = 0) -> dict[str, Any]:
        return {"tokens_per_s": rate, "checks": checks, "mismatches": 0, "convicted": [], "error": None}

    rows = speed_rows({"off": [run(100), run(90), run(110)], "sample": [run(96, 2)] * 3, "all": [run(40, 9)]}, 0.1)
    by = {r["verify"]: r for r in rows}
    assert [r["verify"] for r in rows] == ["off", "sample", "all"]
    assert by["off"]["cost"] == 0.0 and by["sample"]["cost"] == pytest.approx(0.04)
    assert by["all"]["cost"] == pytest.approx(0.6) and by["all"]["rate"] == 1.0 and by["sample"]["rate"] == 0.1
    assert by["sample"]["checks"] == 6
    extra = speed_rows({"off": [run(100)], "sample@0.05": [run(98)], "sample@0.0": [run(99)], "sample": [run(96)]},
                       0.1)
    assert [(r["verify"], r["rate"]) for r in extra] == [("off", 0.0), ("sample", 0.1), ("sample", 0.0),
                                                        ("sample", 0.05)]
    assert extra[2]["cost"] == pytest.approx(0.01)
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(render(rows + [detection_row(1.0, 0.1, 16, [_session(1, 1, True, 1)])]))
    text = console.export_text()
    assert "sample" in text and "4.0%" in text and "100%" in text


def test_report_of_reads_objects_dicts_and_nothing() -> None:
    class Report:
        def to_json(self) -> dict[str, Any]:
            return {"checks": 2, "convicted": [{"peer": "abc", "why": "x"}]}

    class Stats:
        verification: Any = None

    s = Stats()
    assert report_of(s) == {}
    s.verification = Report()
    assert convicted_peers(report_of(s)) == ["abc"]
    s.verification = {"checks": 1, "convicted": ["def", 3]}
    assert convicted_peers(report_of(s)) == ["def"]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bench_verify_smoke(tiny6_dir: Path) -> None:
    """Two spans, verify off and all, one detection session with a worker corrupting every step."""
    env = {**os.environ, "PYMESH_THREADS": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "pymesh", "-q", "bench", "verify", "--json", "--model-path", str(tiny6_dir),
         "--workers", "2", "--spares", "1", "--prompt-tokens", "8", "--new-tokens", "4", "--detect-tokens", "4", "--repeats", "1",
         "--modes", "off,all", "--rates", "1", "--sessions", "1"],
        capture_output=True, text=True, timeout=110, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout[res.stdout.index("["):])
    speed = {r["verify"]: r for r in rows if r["kind"] == "speed"}
    assert set(speed) == {"off", "all"} and all(r["tokens_per_s"] > 0 for r in speed.values())
    assert speed["off"]["checks"] == 0 and speed["all"]["convicted"] == 0
    (det,) = [r for r in rows if r["kind"] == "detection"]
    assert det["p"] == 1.0 and det["sessions"] == 1 and det["false_positives"] == 0
