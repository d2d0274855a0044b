"""Killed and stalled processes in a real swarm (tiny 4-block Llama, span 0-1 served three
times, 2-3 twice, both transports). Complements tests/swarm (which kills and stalls the
*middle* or *last* hop once, over QUIC, through the Python API) with: the *first* hop killed
twice in one answer over TCP, the last hop stalled, a client killed mid-answer (its session
must expire on the worker), and the bootstrap killed and restarted under a live swarm.
The tests run in file order and share the swarm; the bootstrap test comes last.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.e2e.helpers import error_line
from tests.e2e.helpers import worker_info as _info
from tests.swarm.conftest import LocalProcs, assert_same_tokens, reference_run, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PROMPT = "In the middle of the night the radio"


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("e2e-tiny4"), num_hidden_layers=4, name="e2etiny4", seed=5)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory, tiny4: Path) -> Iterator[LocalProcs]:
    procs = LocalProcs(tmp_path_factory.mktemp("e2e-faults"), PYMESH_STEP_TIMEOUT="5", PYMESH_SESSION_IDLE="15")
    try:
        procs.start_bootstrap()
        spans = [(0, 1), (0, 1), (0, 1), (2, 3), (2, 3)]
        workers = [procs.start_worker("--layers", f"{a}-{b}", "--model-path", str(tiny4), "--transport", "both",
                                      name=f"f{a}{b}-{i}")
                   for i, (a, b) in enumerate(spans)]
        wait_ready(workers, timeout=120)
        procs.workers = workers  # type: ignore[attr-defined]
        yield procs
    finally:
        procs.stop_all()


def _active_hop(swarm: LocalProcs, stats: Any, start: int) -> Any:
    """The live worker serving the hop that starts at ``start`` now (the stats' route is the
    one the session opened with; after a recovery, ask the workers who holds a session)."""
    active = next(h["peer"] for h in stats.route if h["start"] == start)
    first = next(w for w in swarm.workers if w.peer_id == active)  # type: ignore[attr-defined]
    if first.alive():
        return first
    for w in swarm.workers:  # type: ignore[attr-defined]
        if w.alive() and w.name.startswith(f"f{start}") and _info(w)["sessions"] > 0:
            return w
    raise AssertionError(f"no live worker for block {start} holds a session")


def _generate_with_faults(swarm: LocalProcs, tiny4: Path, n: int, faults: list[tuple[int, int, int]],
                          transport: str = "quic") -> tuple[list[int], Any, list[Any]]:
    """Generate ``n`` tokens; after token ``at`` send ``sig`` to the route's hop starting at
    block ``start``, for each ``(at, start, sig)``. Stopped victims are continued at the end."""
    from pymesh.client.api import SwarmClient
    from pymesh.model.sampling import SamplingParams

    got: list[int] = []
    victims: list[Any] = []
    todo = {at: (start, sig) for at, start, sig in faults}
    try:
        with SwarmClient([swarm.bootstrap_addr], tiny4, transport=transport, settings=swarm.settings) as client:
            for token in client.generate(PROMPT, SamplingParams(max_new_tokens=n)):
                got.append(token)
                if len(got) in todo:
                    start, sig = todo[len(got)]
                    stats = client.last_stats
                    assert stats is not None
                    victim = _active_hop(swarm, stats, start)
                    victim.signal(sig)
                    victims.append(victim)
            stats = client.last_stats
    finally:
        for v in victims:
            v.signal(signal.SIGCONT)
    return got, stats, victims


def test_first_hop_killed_twice_over_tcp(swarm: LocalProcs, tiny4: Path) -> None:
    """Two successive SIGKILLs of the first hop in one answer, over TCP; a third worker
    for blocks 0-1 takes over the second time."""
    n = 30
    ref, gaps = reference_run(tiny4, PROMPT, n)
    assert len(ref) > 14, "the reference should not stop early"
    got, stats, victims = _generate_with_faults(swarm, tiny4, n, [(4, 0, signal.SIGKILL), (11, 0, signal.SIGKILL)],
                                                transport="tcp")
    assert len(victims) == 2 and victims[0] is not victims[1]
    for v in victims:
        assert v.popen.wait(10) is not None
    assert_same_tokens(got, ref, gaps, "first hop SIGKILLed twice mid-generation (TCP)")
    assert len(stats.recoveries) >= 2, stats.recoveries
    assert len({(r["step"], r["blamed"]) for r in stats.recoveries}) == len(stats.recoveries), \
        f"a recovery was reported twice: {stats.recoveries}"
    assert next(h["peer"] for h in stats.route if h["start"] == 0) not in {v.peer_id for v in victims}


def test_last_hop_stalled_mid_generation(swarm: LocalProcs, tiny4: Path) -> None:
    n = 20
    ref, gaps = reference_run(tiny4, PROMPT, n)
    t0 = time.monotonic()
    got, stats, victims = _generate_with_faults(swarm, tiny4, n, [(3, 2, signal.SIGSTOP)])
    victim = victims[0]
    assert_same_tokens(got, ref, gaps, "last hop SIGSTOPped mid-generation")
    assert stats.recoveries
    assert next(h["peer"] for h in stats.route if h["start"] == 2) != victim.peer_id
    assert time.monotonic() - t0 < 90, "recovery from a stall took far longer than the 5 s step timeout"


def test_killed_client_session_expires(swarm: LocalProcs, tiny4: Path) -> None:
    """A CLI client SIGKILLed mid-answer: the workers free its session (idle expiry, 15 s here)."""
    live = [w for w in swarm.workers if w.alive()]  # type: ignore[attr-defined]
    client = subprocess.Popen([sys.executable, "-m", "pymesh", "client", "--bootstrap", swarm.bootstrap_addr,
                               "--model-path", str(tiny4), "--prompt", PROMPT, "--max-tokens", "400"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=swarm.env)
    try:
        deadline = time.monotonic() + 90
        busy: list[Any] = []
        while time.monotonic() < deadline and not busy:
            busy = [w for w in live if _info(w)["sessions"] > 0]
            if client.poll() is not None:
                pytest.fail("the client finished before it could be killed; raise --max-tokens")
            time.sleep(0.3)
        assert busy, "no worker ever showed the client's session"
    finally:
        client.kill()
        client.wait(10)
        if client.stdout is not None:
            client.stdout.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        left = {w.name: _info(w)["sessions"] for w in busy}
        if not any(left.values()):
            break
        time.sleep(0.5)
    assert not any(left.values()), f"sessions of a dead client still held after 60 s: {left}"
    info = _info(busy[0])
    assert info["free"] == info["total"]


def test_bootstrap_killed(swarm: LocalProcs, tiny4: Path) -> None:
    """Without its bootstrap the swarm still answers a client that joins through a worker's
    DHT port; a client given only the dead bootstrap fails in bounded time, without a traceback."""
    n = 6
    ref, gaps = reference_run(tiny4, PROMPT, n)
    boot = swarm.procs[0]
    boot.signal(signal.SIGKILL)
    boot.popen.wait(10)
    live = [w for w in swarm.workers if w.alive()]  # type: ignore[attr-defined]
    assert len(live) >= 2
    res = subprocess.run([sys.executable, "-m", "pymesh", "client", "--bootstrap", f"127.0.0.1:{live[0].port + 1}",
                          "--model-path", str(tiny4), "--prompt", PROMPT, "--max-tokens", str(n), "--json"],
                         capture_output=True, text=True, timeout=120, env=swarm.env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_tokens(json.loads(res.stdout.strip().splitlines()[-1])["tokens"], ref, gaps, "via a worker's DHT")
    t0 = time.monotonic()
    dead = swarm.client("--model-path", str(tiny4), "--prompt", PROMPT, "--max-tokens", "3", timeout=120)
    assert dead.returncode != 0
    assert time.monotonic() - t0 < 90
    assert "Traceback" not in dead.stderr
    error_line(dead.stderr)


def test_restarted_bootstrap_learns_the_swarm(swarm: LocalProcs, tiny4: Path) -> None:
    assert not swarm.procs[0].alive(), "runs after test_bootstrap_killed"
    n = 6
    ref, gaps = reference_run(tiny4, PROMPT, n)
    port = swarm.bootstrap_addr.rsplit(":", 1)[1]
    again = swarm.spawn("bootstrap2", ["bootstrap", "--host", "127.0.0.1", "--port", port])
    again.wait_for("bootstrap address", 60)
    deadline = time.monotonic() + 30  # 30 heartbeats of the workers
    out = None
    while time.monotonic() < deadline and out is None:
        res = swarm.client("--model-path", str(tiny4), "--prompt", PROMPT, "--max-tokens", str(n), "--json",
                           timeout=120, PYMESH_DISCOVERY_TIMEOUT="3")
        if res.returncode == 0:
            out = json.loads(res.stdout.strip().splitlines()[-1])
        else:
            time.sleep(1)
    assert out is not None, "the swarm never became reachable through the restarted bootstrap"
    assert_same_tokens(out["tokens"], ref, gaps, "through the restarted bootstrap")


def test_dead_bootstrap_error_names_the_bootstrap(tiny4: Path, tmp_path: Path) -> None:
    from tests.e2e.helpers import pymesh_run
    from tests.swarm.conftest import free_port

    port = free_port()
    res = pymesh_run("client", "--bootstrap", f"127.0.0.1:{port}", "--model-path", str(tiny4), "--prompt", "hi",
                     "--max-tokens", "2", timeout=120)
    assert res.returncode != 0
    line = error_line(res.stderr)
    assert f"127.0.0.1:{port}" in line and "start a worker" not in line, line
