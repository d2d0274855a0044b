"""``pymesh monitor --once`` against a real local swarm: a bootstrap and 2 echo-mode workers."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from pymesh.demo.swarm import LocalSwarm

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("pymesh.net.rpc") is None,
    reason="workers need the RPC transport (pymesh/net/rpc.py), not on main yet",
)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_monitor_once_lists_echo_workers() -> None:
    with LocalSwarm(env={"PYMESH_RECORD_TTL": "20", "PYMESH_HEARTBEAT": "2"}, grace=5.0) as swarm:
        swarm.start_bootstrap()
        a = swarm.start_worker(model_name="echo-mon", layers=(0, 3), extra_args=["--threads", "1"])
        b = swarm.start_worker(model_name="echo-mon", layers=(4, 7), transport="tcp",
                               extra_args=["--threads", "1"])
        swarm.wait_for_workers([a, b], timeout=90)
        out = subprocess.run(
            [sys.executable, "-m", "pymesh", "monitor", "--once", "--bootstrap", swarm.bootstrap_addr,
             "--timeout", "20"],
            capture_output=True, text=True, timeout=90, env=dict(os.environ, COLUMNS="200"),
        )
        assert out.returncode == 0, out.stderr[-3000:]
        text = out.stdout
        assert a.peer_id.short() in text and b.peer_id.short() in text
        assert "0-3" in text and "4-7" in text
        assert "coverage echo-mon" in text
        assert "all 8 blocks covered" in text
        assert "2 live / 2 records" in text
        assert "reachable" in text and "UNREACHABLE" not in text
        for w in (a, b):  # a speaks QUIC, b TCP: both get a round trip measured
            rows = [line for line in text.splitlines() if w.peer_id.short() in line and "online" in line]
            assert rows and re.search(r"\d+\.\dms", rows[0]), f"no RTT for {w.name}:\n{text}"
        out = subprocess.run(
            [sys.executable, "-m", "pymesh", "monitor", "--once", "--json", "--bootstrap",
             swarm.bootstrap_addr, "--timeout", "20"],
            capture_output=True, text=True, timeout=90,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        data = json.loads(out.stdout)
        spans = {w["peer"]: (w["start"], w["stop"], w["transports"]) for w in data["workers"]}
        assert spans == {str(a.peer_id): (0, 4, ["quic"]), str(b.peer_id): (4, 8, ["tcp"])}
        assert data["models"]["echo-mon"]["gaps"] == []
        # One worker stops: it announces offline, and the next snapshot shows the gap.
        swarm.stop_worker(b)
        out = subprocess.run(
            [sys.executable, "-m", "pymesh", "monitor", "--once", "--bootstrap", swarm.bootstrap_addr,
             "--timeout", "20"],
            capture_output=True, text=True, timeout=90, env=dict(os.environ, COLUMNS="200"),
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert "gaps: 4-7" in out.stdout, out.stdout
