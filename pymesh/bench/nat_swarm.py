"""``pymesh bench nat --swarm``: the same hops through a real swarm (pymesh/bench/nat.py builds the
topology): a bootstrap node, two ``pymesh relay`` nodes and echo-mode ``pymesh worker`` processes
(``--reachability auto``: each learns by dial-back whether it is behind NAT, reserves at the
relays it finds in the DHT and says so in its record). A client (``InferenceSession``) finds each
worker through the DHT and runs decode-shaped steps, one 576-float token each, through it.

Rows (kind "swarm"), each case run --rounds times: case, nat, transport, the path the hop took, setup time (DHT
lookup, connection, first step), median step time and tokens/s. Child processes use short
DHT/heartbeat timers (as the swarm tests do) so a run takes seconds.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pymesh.bench.netns import NetnsError, Topology

BOOT_PORT, RELAY_PORT = 9000, 9200
AGENT = [sys.executable, "-m", "pymesh.bench.nat_agent"]
PYMESH = [sys.executable, "-m", "pymesh"]
#: short timers for the child processes (a bench run, not a deployment)
ENV = {"PYMESH_HEARTBEAT": "1", "PYMESH_RECORD_TTL": "5", "PYMESH_DHT_TIMEOUT": "1", "PYMESH_THREADS": "1",
       "PYMESH_SKIP_THROUGHPUT": "1", "PYMESH_DISCOVERY_TIMEOUT": "10", "PYMESH_STEP_TIMEOUT": "15",
       "PYMESH_TRANSPORT_TIMEOUT": "10", "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1",
       "PYTHONUNBUFFERED": "1"}
#: (case, who sits where, worker host or None for the previous worker, client host)
CASES = (
    ("direct", "public -> public", "server", "client"),
    ("eim", "public -> EIM", "eimserver", "client"),
    ("eim-eim", "EIM -> EIM", "eimserver", "homeclient"),
    ("symmetric", "public -> symmetric", "symserver", "client"),
)

Row = dict[str, Any]


class SwarmProcs:
    def __init__(self, topo: Topology, root: Path) -> None:
        self.topo = topo
        self.root = root
        self.env = {**os.environ, **ENV, "PYMESH_HOME": str(root / "home")}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.boot = f"{topo.ip('bootstrap')}:{BOOT_PORT}"

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def start(self, name: str, host: str, *args: str) -> None:
        with open(self.log(name), "ab") as out:
            self.procs[name] = self.topo.popen(host, [*PYMESH, *args], stdout=out, stderr=subprocess.STDOUT,
                                               env=self.env)

    def wait_log(self, name: str, needle: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log(name).read_text(errors="replace")
            if needle in text:
                return text
            if self.procs[name].poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"bench nat --swarm: {name} did not log {needle!r} within {timeout:.0f} s; its log "
                           f"({self.log(name)}) ends:\n" + self.log(name).read_text(errors="replace")[-3000:])

    def stop(self, name: str) -> None:
        p = self.procs.pop(name, None)
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def start_swarm(topo: Topology, root: Path, relay_bandwidth: float | None) -> SwarmProcs:
    sw = SwarmProcs(topo, root)
    sw.start("bootstrap", "bootstrap", "bootstrap", "--host", topo.ip("bootstrap"), "--port", str(BOOT_PORT),
             "--identity", str(root / "boot.key"))
    sw.wait_log("bootstrap", "bootstrap address")
    bw: list[str] = []
    if relay_bandwidth is not None:
        mbps = str(relay_bandwidth if relay_bandwidth > 0 else 1e6)
        bw = ["--relay-bandwidth", mbps, "--relay-peer-bandwidth", mbps]
    for r in ("relay1", "relay2"):
        sw.start(f"{r}-swarm", r, "relay", "--bootstrap", sw.boot, "--host", topo.ip(r), "--port", str(RELAY_PORT),
                 "--identity", str(root / f"{r}.key"), *bw)
    for r in ("relay1", "relay2"):
        sw.wait_log(f"{r}-swarm", "relay ")
    return sw


def swarm_rows(sw: SwarmProcs, transport: str, tokens: int, rounds: int, progress: Any, task: Any) -> list[Row]:
    """One row per case: echo workers on the server hosts, a client per case and round (speed
    figures from the best round, the median setup time, every round's path)."""
    workers = {}
    for host in dict.fromkeys(h for _, _, h, _ in CASES):
        name = f"worker-{host}-{transport}"
        port = sw.topo.free_port()
        sw.start(name, host, "worker", "--bootstrap", sw.boot, "--host", "0.0.0.0", "--port", str(port),
                 "--identity", str(sw.root / f"{name}.key"), "--layers", "0-0", "--model-name", f"echo-{host}",
                 "--transport", transport)
        workers[host] = name
    for host, name in workers.items():
        text = sw.wait_log(name, "Worker bootstrapped", timeout=90)
        if host != "server":
            text = sw.wait_log(name, "behind NAT: reachable via", timeout=60)
        if re.search(r"reachable directly|reachability: public", text) and host != "server":
            raise RuntimeError(f"bench nat --swarm: the worker on {host} thinks it is public; see {sw.log(name)}")
    runs: dict[str, list[dict[str, Any]]] = {case: [] for case, _, _, _ in CASES}
    for rnd in range(rounds):   # interleaved, as the hop cases
        for case, nat, host, client in CASES:
            progress.update(task, description=f"nat --swarm {transport} round {rnd + 1}/{rounds}: {nat}")
            argv = [*AGENT, "swarm-client", "--transport", transport, "--addr", sw.boot, "--model-name",
                    f"echo-{host}", "--tokens", str(tokens)]
            try:
                res = sw.topo.run(client, argv, timeout=120.0)
            except NetnsError as exc:
                raise RuntimeError(f"bench nat --swarm: the client for {nat} ({transport}) failed: {exc}") from None
            runs[case].append(json.loads(res.stdout.strip().splitlines()[-1]))
            progress.advance(task)
    rows = []
    for case, nat, _, _ in CASES:
        got = runs[case]
        paths = [g["route"][0].get("path") if g["route"] else None for g in got]
        rows.append({"kind": "swarm", "case": case, "nat": nat, "transport": transport,
                     "path": paths[0] if len(set(paths)) == 1 else "/".join(sorted(map(str, set(paths)))),
                     "paths": paths, "rounds": len(got),
                     "establish_s": round(statistics.median(g["establish_s"] for g in got), 3),
                     "step_ms_p50": round(min(g["step_ms_p50"] for g in got), 3),
                     "tokens_per_s": round(max(g["tokens_per_s"] for g in got), 1), "tokens": tokens})
    for name in workers.values():
        sw.stop(name)
    return rows


def render_rows(rows: list[Row]) -> Any:
    from rich.table import Table

    table = Table(title="nat --swarm: the same hop through a real swarm (echo worker found via the DHT, "
                        "InferenceSession steps of one 576-float token)", title_justify="left")
    for col in ("hop (client -> worker)", "transport", "path"):
        table.add_column(col, no_wrap=True)
    for col in ("setup s", "step ms p50", "tok/s (x)"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["nat"], r["transport"], str(r["path"]), f"{r['establish_s']:.3f}", f"{r['step_ms_p50']:.3f}",
                      f"{r['tokens_per_s']:.0f} ({r['tokens_x']:.2f})" if r.get("tokens_x") else
                      f"{r['tokens_per_s']:.0f}")
    return table
