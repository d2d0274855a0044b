"""Child-process supervision used by ``pymesh demo``: no process outlives the supervisor."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from pymesh.demo.procs import DemoError, Supervisor, free_port, pid_exists

SLEEPER = "import time; print('up', flush=True); time.sleep(120)"
STUBBORN = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('up', flush=True); time.sleep(120)"
)
# A child that starts a grandchild of its own and then sleeps.
PARENT = (
    "import subprocess, sys, time; "
    "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
    "print(p.pid, flush=True); time.sleep(120)"
)


def _wait_for_output(path: Path, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text()
        if text.strip():
            return text
        time.sleep(0.05)
    raise AssertionError(f"{path} stayed empty")


@pytest.mark.timeout(60)
def test_stop_all_leaves_no_process_behind(tmp_path: Path) -> None:
    with Supervisor(tmp_path, grace=1.0) as sup:
        a = sup.spawn("sleeper", [sys.executable, "-c", SLEEPER])
        b = sup.spawn("stubborn", [sys.executable, "-c", STUBBORN])
        c = sup.spawn("parent", [sys.executable, "-c", PARENT])
        _wait_for_output(a.log_path)
        _wait_for_output(b.log_path)
        grandchild = int(_wait_for_output(c.log_path).split()[0])
        pids = sup.pids() + [grandchild]
        assert all(pid_exists(p) for p in pids)
        sup.check_alive()
    deadline = time.monotonic() + 10
    while any(pid_exists(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [p for p in pids if pid_exists(p)] == []


@pytest.mark.timeout(60)
def test_a_dead_child_is_reported_with_its_log(tmp_path: Path) -> None:
    with Supervisor(tmp_path, grace=1.0) as sup:
        child = sup.spawn("crasher", [sys.executable, "-c", "print('boom: bad flag'); raise SystemExit(4)"])
        child.popen.wait(timeout=20)
        with pytest.raises(DemoError) as info:
            sup.check_alive()
    msg = str(info.value)
    assert "crasher" in msg and "status 4" in msg and "boom: bad flag" in msg


def test_free_port_gives_a_bindable_pair() -> None:
    import socket

    port = free_port(2)
    for p in (port, port + 1):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", p))
        s.close()
