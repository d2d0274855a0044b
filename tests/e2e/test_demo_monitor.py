"""``pymesh demo`` (non-interactive, one short prompt), ``pymesh monitor --once`` against a
running swarm, and ``pymesh bench --quick --json`` (opt-in: it takes minutes)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator

import pytest

from tests.e2e.helpers import generate_json, pymesh_run
from tests.swarm.conftest import LocalProcs, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_demo_answers_like_generate_and_leaves_nothing(smollm2_dir: Path, tmp_path: Path) -> None:
    prompt = "What is the capital of France?"
    res = pymesh_run("demo", "--prompt", prompt, "--max-tokens", "12", "--workers", "2", "--timeout", "150",
                     timeout=280, PYMESH_HOME=str(tmp_path), COLUMNS="200")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    answer = next((ln.split("swarm>", 1)[1].strip() for ln in res.stdout.splitlines() if "swarm>" in ln), None)
    assert answer is not None, res.stdout[-3000:]
    ref = generate_json(smollm2_dir, prompt, 12, chat=True)
    assert answer == ref["text"].strip()
    pids = [int(p) for p in re.findall(r"pid (\d+)", res.stdout)]
    assert len(pids) == 3, f"expected the bootstrap's and two workers' pids in:\n{res.stdout[-3000:]}"
    assert not [p for p in pids if _alive(p)], "demo left child processes running"
    assert "stopped 3 processes" in res.stdout


@pytest.fixture(scope="module")
def tiny_swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalProcs, Path]]:
    from tests.model.tiny import make_tiny_model

    folder = make_tiny_model(tmp_path_factory.mktemp("e2e-mon-model"), num_hidden_layers=4, name="e2emon", seed=9)
    procs = LocalProcs(tmp_path_factory.mktemp("e2e-mon"))
    try:
        procs.start_bootstrap()
        workers = [procs.start_worker("--layers", "0-1", "--model-path", str(folder), name="mon01"),
                   procs.start_worker("--layers", "3-3", "--model-path", str(folder), "--transport", "tcp",
                                      name="mon33")]
        wait_ready(workers, timeout=120)
        procs.workers = workers  # type: ignore[attr-defined]
        yield procs, folder
    finally:
        procs.stop_all()


def test_monitor_once_shows_workers_and_the_gap(tiny_swarm: tuple[LocalProcs, Path]) -> None:
    procs, folder = tiny_swarm
    res = pymesh_run("monitor", "--bootstrap", procs.bootstrap_addr, "--once", "--model", "e2emon", "--blocks", "4", timeout=90,
                     COLUMNS="220")
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    for w in procs.workers:  # type: ignore[attr-defined]
        assert w.peer_id[:10] in out, f"{w.name} missing from the monitor:\n{out}"
        assert f"{w.port}" in out
    assert "e2emon" in out
    assert re.search(r"\b2\b", out), "block 2 is served by nobody: the gap should be listed"
    assert "0-1" in out and ("3-3" in out or "3 " in out)


def test_client_names_the_gap(tiny_swarm: tuple[LocalProcs, Path]) -> None:
    procs, folder = tiny_swarm
    res = procs.client("--model-path", str(folder), "--prompt", "hi", "--max-tokens", "2", timeout=120,
                       PYMESH_DISCOVERY_TIMEOUT="4")
    assert res.returncode == 1
    assert "layer 2" in res.stderr.splitlines()[-1], res.stderr[-2000:]


def test_transport_mismatch_is_named(tiny_swarm: tuple[LocalProcs, Path]) -> None:
    """Blocks 2-3 served only over TCP (runs after the gap tests: it closes the gap)."""
    procs, folder = tiny_swarm
    w = procs.start_worker("--layers", "2-2", "--model-path", str(folder), "--transport", "tcp", name="mon22")
    wait_ready([w], timeout=120)
    res = procs.client("--model-path", str(folder), "--prompt", "hi", "--max-tokens", "2", "--transport", "quic",
                       timeout=120, PYMESH_DISCOVERY_TIMEOUT="4")
    assert res.returncode == 1
    line = res.stderr.splitlines()[-1]
    assert "layer 2" in line, line
    assert "tcp" in line or "transport" in line, line


@pytest.mark.skipif(os.environ.get("PYMESH_E2E_BENCH") != "1",
                    reason="pymesh bench --quick takes minutes on a shared CPU; set PYMESH_E2E_BENCH=1 to run it")
@pytest.mark.timeout(900)
def test_bench_quick_json(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    res = pymesh_run("bench", "--quick", "--json", "--out", str(out), timeout=880)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = json.loads(res.stdout)
    assert isinstance(rows, list) and rows
    assert all(isinstance(r, dict) and "part" in r for r in rows)
    assert {r["part"] for r in rows} == {"kernels", "generate", "transport", "dht", "swarm"}
    assert json.loads(out.read_text()) == rows
