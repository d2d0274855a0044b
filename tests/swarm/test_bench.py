"""Smoke test: ``pymesh bench swarm --json`` runs on a tiny model and prints its row schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pymesh.bench.swarm_sessions import SESSION_KEYS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_bench_swarm_emits_its_schema(tiny6_dir: Path) -> None:
    env = {**os.environ, "PYMESH_THREADS": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "pymesh", "-q", "bench", "swarm", "--json", "--model-path", str(tiny6_dir),
         "--workers", "2", "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1", "--threads", "1",
         "--sessions", "1,3"],
        capture_output=True, text=True, timeout=220, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    all_rows = json.loads(res.stdout[res.stdout.index("["):])
    rows = [r for r in all_rows if "sessions" not in r]
    assert [r["transport"] for r in rows] == ["quic", "tcp"]
    for r in rows:
        assert {"transport", "workers", "ttft_s", "decode_tokens_per_s", "single_process_tokens_per_s",
                "ratio"} <= set(r)
        assert r["workers"] == 2 and r["ttft_s"] > 0 and r["decode_tokens_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["decode_tokens_per_s"] / r["single_process_tokens_per_s"], rel=0.02)
    sessions = [r for r in all_rows if "sessions" in r]
    assert [(r["transport"], r["sessions"]) for r in sessions] == [
        ("single-process", 1), ("single-process-batched", 3), ("quic", 1), ("quic", 3), ("tcp", 1), ("tcp", 3)]
    for r in sessions:
        assert set(SESSION_KEYS) <= set(r) and r["model"] == tiny6_dir.name
        assert r["workers"] == (0 if r["transport"].startswith("single") else 2)
        assert r["aggregate_tokens_per_s"] > 0 and r["per_session_tokens_per_s_p50"] > 0 and r["ttft_s_p50"] > 0
    # N sessions of 4 tokens each: the aggregate counts all of them, so it exceeds one session's rate
    # over the whole run; it cannot exceed N x the fastest possible session (tokens / time to first token)
    for r in sessions:
        assert r["aggregate_tokens_per_s"] <= r["sessions"] * 4 / r["ttft_s_p50"] * 1.0001
