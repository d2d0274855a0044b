"""Smoke test: ``pymesh bench swarm --json`` runs on a tiny model and prints its row schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_bench_swarm_emits_its_schema(tiny6_dir: Path) -> None:
    env = {**os.environ, "PYMESH_THREADS": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "pymesh", "-q", "bench", "swarm", "--json", "--model-path", str(tiny6_dir),
         "--workers", "2", "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1", "--threads", "1"],
        capture_output=True, text=True, timeout=220, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout[res.stdout.index("["):])
    assert [r["transport"] for r in rows] == ["quic", "tcp"]
    for r in rows:
        assert {"transport", "workers", "ttft_s", "decode_tokens_per_s", "single_process_tokens_per_s",
                "ratio"} <= set(r)
        assert r["workers"] == 2 and r["ttft_s"] > 0 and r["decode_tokens_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["decode_tokens_per_s"] / r["single_process_tokens_per_s"], rel=0.02)
