"""Automatic placement: workers without --layers split the model, and move to fill a gap."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.swarm.conftest import LocalProcs, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _spans(procs: LocalProcs, model_dir: Path) -> dict[str, tuple[int, int]]:
    from pymesh.client.swarm import Swarm
    from pymesh.model.fingerprint import model_id

    async def main() -> dict[str, tuple[int, int]]:
        async with Swarm([procs.bootstrap_addr], model_id(model_dir), settings=procs.settings) as swarm:
            recs = await swarm.records()
            return {str(r.peer_id): (r.start, r.stop) for r in recs if r.state == "online"}

    return trio.run(main)


def _wait_cover(procs: LocalProcs, model_dir: Path, peers: set[str], timeout: float) -> dict[str, tuple[int, int]]:
    """Wait until the online records of ``peers`` (and only those) cover blocks 0-5."""
    deadline = time.monotonic() + timeout
    spans: dict[str, Any] = {}
    while time.monotonic() < deadline:
        spans = {p: s for p, s in _spans(procs, model_dir).items() if p in peers}
        covered = {b for (a, z) in spans.values() for b in range(a, z)}
        if covered == set(range(6)) and set(spans) == peers:
            return spans
        time.sleep(1.0)
    raise AssertionError(f"blocks 0-5 not covered by {len(peers)} workers within {timeout} s: {spans}")


def test_workers_without_layers_cover_the_model_and_fill_gaps(tmp_path: Path, tiny6_dir: Path) -> None:
    procs = LocalProcs(tmp_path)
    try:
        procs.start_bootstrap()
        args = ("--model-path", str(tiny6_dir), "--max-blocks", "3")
        a = procs.start_worker(*args, name="auto-a")
        b = procs.start_worker(*args, name="auto-b")
        wait_ready([a, b], timeout=120)
        for w in (a, b):
            assert "Worker announcing layers" in w.text()
        spans = _wait_cover(procs, tiny6_dir, {a.peer_id or "", b.peer_id or ""}, 60)
        assert sorted(spans.values()) == [(0, 3), (3, 6)]
        # A third worker joins (it doubles one half), then the worker alone on the other
        # half leaves: one of the two on the doubled half moves over.
        c = procs.start_worker(*args, name="auto-c")
        wait_ready([c], timeout=120)
        time.sleep(2)
        spans = _spans(procs, tiny6_dir)
        c_span = spans.get(c.peer_id or "")
        assert c_span is not None
        leaver = next(w for w in (a, b) if spans.get(w.peer_id or "") != c_span)
        stayers = {w.peer_id or "" for w in (a, b, c) if w is not leaver}
        stay = [w for w in (a, b, c) if w is not leaver]
        seen = {w.name: len(w.text()) for w in stay}
        assert leaver.stop() == 0
        spans = _wait_cover(procs, tiny6_dir, stayers, 60)
        moved = [w for w in stay if "Worker moving from layers" in w.text()[seen[w.name]:]]
        assert moved, "the gap was filled but no worker logged a move"
    finally:
        procs.stop_all()
