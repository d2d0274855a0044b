"""``pymesh bench hops``: the least-squares slope and interval medians (pure), and a smoke run
of ``--echo --quick`` through 1 and 2 echo workers that checks the JSON schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pymesh.bench.hops import FIT_KEYS, POINT_KEYS, HopsPlan, Timing, fit_line, interval_p50_ms, rows_of, worker_counts
from pymesh.errors import ConfigError
from pymesh.settings import Settings


def test_fit_line_recovers_slope_and_intercept() -> None:
    slope, intercept = fit_line([1, 2, 3, 5], [12.0, 14.0, 16.0, 20.0]) or (0.0, 0.0)
    assert slope == pytest.approx(2.0) and intercept == pytest.approx(10.0)
    noisy = fit_line([1, 2, 3, 5], [11.0, 15.0, 15.0, 21.0])
    assert noisy is not None and noisy == pytest.approx((20.5 / 8.75, 15.5 - 2.75 * 20.5 / 8.75))
    assert fit_line([2, 2], [1.0, 3.0]) is None and fit_line([1], [1.0]) is None


def test_interval_median_pools_runs_and_ignores_a_stall() -> None:
    # two runs; intervals 0.01 0.01 0.5 (a stall) and 0.02 0.01: median 0.01 s
    assert interval_p50_ms([[0.0, 0.01, 0.02, 0.52], [1.0, 1.02, 1.03]]) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        interval_p50_ms([[1.0]])


def test_worker_counts() -> None:
    assert worker_counts("5,1,3,3") == [1, 3, 5]
    for bad in ("0,2", "x", ""):
        with pytest.raises(ConfigError, match="--workers"):
            worker_counts(bad)


def test_rows_of_ratio_and_fit() -> None:
    plan = HopsPlan(None, "m", 30, 8, [0] * 4, n=3, repeats=1, transports=["tcp"], dtype="float32", threads=1,
                    settings=Settings())
    # ms per token: 10 with 1 worker, 12 with 2, 16 with 4: slope 2, intercept 8
    # the workers' own step time 9 ms whatever N: outside it 1, 3, 7 ms (slope 2 as well)
    measured = {w: {"tcp": Timing([[0.0, ms / 1000, 2 * ms / 1000]], [0.1], [9.0])}
                for w, ms in ((1, 10), (2, 12), (4, 16))}
    single = Timing([[0.0, 0.008, 0.016]], [0.05])
    rows = rows_of(plan, measured, single)
    points = [r for r in rows if r["kind"] == "point"]
    assert [r["workers"] for r in points] == [1, 2, 4] and all(set(r) == set(POINT_KEYS) for r in points)
    assert points[0]["ratio"] == pytest.approx(0.8) and points[0]["tokens_per_s"] == pytest.approx(100.0)
    assert [r["outside_ms"] for r in points] == pytest.approx([1.0, 3.0, 7.0])
    (fit,) = [r for r in rows if r["kind"] == "fit"]
    assert set(fit) == set(FIT_KEYS)
    assert fit["per_hop_ms"] == pytest.approx(2.0) and fit["intercept_ms"] == pytest.approx(8.0)
    assert fit["outside_per_hop_ms"] == pytest.approx(2.0)
    # without the workers' figures (none read) the outside columns stay empty
    bare = rows_of(plan, {1: {"tcp": Timing([[0.0, 0.01]], [0.1])}, 2: {"tcp": Timing([[0.0, 0.02]], [0.1])}}, Timing())
    assert bare[0]["worker_step_ms"] is None and bare[0]["ratio"] is None and bare[-1]["outside_per_hop_ms"] is None


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bench_hops_echo_emits_its_schema() -> None:
    env = {**os.environ, "PYMESH_THREADS": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "pymesh", "-q", "bench", "hops", "--json", "--quick", "--echo", "--workers", "1,2",
         "--prompt-tokens", "8", "--new-tokens", "6", "--repeats", "1", "--verify", "off"],
        capture_output=True, text=True, timeout=110, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout[res.stdout.index("["):])
    points = [r for r in rows if r["kind"] == "point"]
    fits = [r for r in rows if r["kind"] == "fit"]
    assert [(r["transport"], r["workers"]) for r in points] == [("tcp", 1), ("tcp", 2), ("quic", 1), ("quic", 2)]
    for r in points:
        assert set(r) == set(POINT_KEYS) and (r["mode"], r["model"], r["verify"]) == ("echo", "echo", "off")
        assert r["ms_per_token_p50"] > 0 and r["ttft_s"] > 0 and r["ratio"] is None
        # echo workers compute nothing, but their step clock still runs (the thread hand-off)
        assert r["worker_step_ms"] is not None and r["worker_step_ms"] >= 0
        assert r["outside_ms"] == pytest.approx(r["ms_per_token_p50"] - r["worker_step_ms"], abs=2e-3)
        assert r["tokens_per_s"] == pytest.approx(1000 / r["ms_per_token_p50"], rel=0.01)
    assert [r["transport"] for r in fits] == ["tcp", "quic"]
    for f in fits:
        assert set(f) == set(FIT_KEYS) and f["workers_fitted"] == [1, 2]
        one, two = (r["ms_per_token_p50"] for r in points if r["transport"] == f["transport"])
        # two points: the line goes through both
        assert f["per_hop_ms"] == pytest.approx(two - one, abs=2e-3)
        assert f["intercept_ms"] == pytest.approx(2 * one - two, abs=2e-3)
