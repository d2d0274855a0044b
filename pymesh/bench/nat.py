"""NAT traversal benchmark (issue 16): one hop over direct, hole-punched and relayed paths.

``pymesh bench nat [--json] [--transport quic,tcp] [--relay-bandwidth MBPS] [--quick]``

Builds a network-namespace topology (pymesh/bench/netns.py; needs root, iproute2 and nftables):
two relays, a public server and a public client on one bridge; a server behind an
endpoint-independent-mapping NAT ("eim"), one behind a symmetric NAT, and a second client behind
an EIM NAT. Every process runs in its namespace (pymesh/bench/nat_agent.py): relays as
``pymesh relay`` runs them, servers reserving at both relays as workers behind NAT do. The same
server code is then reached, in one run, per transport:

- direct: public client -> public server (the baseline: same links, transport and MTU);
- punched: public client -> EIM server, and NAT'ed client -> EIM server (QUIC hole punching);
- relayed: public client -> the same EIM server with punching off at the client, and public
  client -> symmetric-NAT server (its relays see two mappings, so it offers no punching).

Per case: the path the connection took, the time to establish it (dial, circuit, handshakes,
punching), the median round trip of 8 KB echoes, one-way MB/s of bulk messages, and hop tokens/s
(greedy-decode-shaped calls carrying a 576-float hidden state each way; no model runs), with
ratios to the direct row of the same transport. Links are veth pairs with no added delay or loss
(no netem): ratios show what the relay's extra process and TCP leg cost, not WAN latency.
The relays keep their shipped bandwidth quotas unless ``--relay-bandwidth`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import select
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pymesh.bench.nat_swarm import CASES as SWARM_CASES
from pymesh.bench.nat_swarm import render_rows as render_swarm
from pymesh.bench.nat_swarm import start_swarm, swarm_rows
from pymesh.bench.netns import NetnsError, Topology, netns_available
from pymesh.errors import PymeshError

RELAY_PORT = 9100
AGENT = [sys.executable, "-m", "pymesh.bench.nat_agent"]

Row = dict[str, Any]


class NatBenchUnavailable(PymeshError):
    """Namespaces or nftables cannot be used here; the message says what is missing."""


@dataclass(frozen=True)
class Case:
    case: str          # short id
    nat: str           # who sits where
    server: str        # key into the started servers
    client: str        # host the client runs on
    punch: bool        # whether the client may hole-punch


CASES = (
    Case("direct", "public -> public", "direct", "client", False),
    Case("eim", "public -> EIM", "eim", "client", True),
    Case("eim-eim", "EIM -> EIM", "eim", "homeclient", True),
    Case("eim-nopunch", "public -> EIM, no punch", "eim", "client", False),
    Case("symmetric", "public -> symmetric", "sym", "client", True),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--transport", default="quic,tcp",
                        help="comma-separated transports the client dials with (default quic,tcp: hole punching "
                             "is QUIC only; relayed circuits are TLS over TCP, so tcp's direct row is their "
                             "like-for-like baseline)")
    parser.add_argument("--rtt-calls", type=int, default=None, help="8 KB echoes per case (default 200, 50 quick)")
    parser.add_argument("--tokens", type=int, default=None, help="hidden-state calls per case (default 200, 50 quick)")
    parser.add_argument("--bulk-calls", type=int, default=None, help="bulk messages per case (default 8, 3 quick)")
    parser.add_argument("--bulk-mib", type=float, default=4.0, help="size of each bulk message in MiB (default 4)")
    parser.add_argument("--packet-size", type=int, default=None,
                        help="QUIC packet size (default: the settings', what a swarm uses)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="run every case this many times, interleaved; speed figures from each case's best "
                             "round, setup time the median (default 3, 1 quick)")
    parser.add_argument("--swarm", action="store_true",
                        help="also run each hop through a real swarm: bootstrap, `pymesh relay` nodes and echo "
                             "workers with --reachability auto, found through the DHT (adds about a minute)")
    parser.add_argument("--relay-bandwidth", type=float, default=None,
                        help="relay bandwidth cap in MB/s, per peer and in all (0: none; default: the relay's "
                             "shipped quotas)")


def unavailable() -> str | None:
    """Why this part cannot run here, or None."""
    ok, why = netns_available()
    return None if ok else f"pymesh bench nat needs network namespaces and nftables: {why}"


class _Procs:
    """The agents started in the topology; stderr of each goes to a temporary file."""

    def __init__(self, topo: Topology, tmp: Path) -> None:
        self.topo = topo
        self.tmp = tmp
        self.n = 0

    def start(self, host: str, *args: str) -> tuple[subprocess.Popen[str], Path]:
        self.n += 1
        err_path = self.tmp / f"{host}-{self.n}.err"
        with open(err_path, "w") as err:
            proc = self.topo.popen(host, [*AGENT, *args], stdout=subprocess.PIPE, stderr=err, text=True)
        return proc, err_path

    @staticmethod
    def ready(proc: subprocess.Popen[str], err_path: Path, what: str, timeout: float = 60.0) -> dict[str, Any]:
        out: IO[str] | None = proc.stdout
        assert out is not None
        readable, _, _ = select.select([out], [], [], timeout)
        line = out.readline() if readable else ""
        if not line:
            proc.kill()
            proc.wait(5)
            raise RuntimeError(f"bench nat: the {what} did not start within {timeout:.0f} s; its stderr:\n"
                               + err_path.read_text(errors="replace")[-3000:])
        obj: dict[str, Any] = json.loads(line)
        return obj


def _counts(args: argparse.Namespace) -> tuple[int, int, int]:
    quick = bool(getattr(args, "quick", False))
    return (args.rtt_calls or (50 if quick else 200), args.tokens if args.tokens is not None else (50 if quick else 200),
            args.bulk_calls or (3 if quick else 8))


def run_rows(args: argparse.Namespace, progress: Any) -> list[Row]:
    why = unavailable()
    if why is not None:
        raise NatBenchUnavailable(why)
    transports = [t.strip() for t in args.transport.split(",") if t.strip()]
    bad = [t for t in transports if t not in ("quic", "tcp")]
    if bad or not transports:
        raise NatBenchUnavailable(f"--transport {args.transport!r}: use quic, tcp or quic,tcp")
    rtt_calls, tokens, bulk_calls = _counts(args)
    ps = ["--packet-size", str(args.packet_size)] if args.packet_size else []
    rounds = args.rounds or (1 if getattr(args, "quick", False) else 3)
    n_swarm = len(transports) * len(SWARM_CASES) * rounds if args.swarm else 0
    task = progress.add_task("nat: building the topology",
                             total=1 + len(transports) * len(CASES) * rounds + n_swarm)
    swarm: list[Row] = []
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="pymesh-bench-nat-") as tmp, Topology() as topo:
        for name in ("relay1", "relay2", "server", "client", "bootstrap"):
            topo.add_public_host(name)
        topo.add_home("eimhome", nat="eim", hosts=["eimserver"])
        topo.add_home("symhome", nat="symmetric", hosts=["symserver"])
        topo.add_home("clienthome", nat="eim", hosts=["homeclient"])
        procs = _Procs(topo, Path(tmp))
        relays = []
        bw = [] if args.relay_bandwidth is None else ["--bandwidth", str(args.relay_bandwidth)]
        for r in ("relay1", "relay2"):
            proc, err = procs.start(r, "relay", "--port", str(RELAY_PORT), *ps, *bw)
            relays.append((r, proc, err))
        relay_args: list[str] = []
        relay_cap = None
        for r, proc, err in relays:
            info = procs.ready(proc, err, f"relay on {r}")
            relay_args += ["--relay", f"{info['peer']}@{topo.ip(r)}:{RELAY_PORT}"]
            relay_cap = info["peer_bandwidth"] / 1e6
        progress.advance(task)
        for transport in transports:
            servers = _start_servers(topo, procs, transport, relay_args, ps)
            runs: dict[str, list[Row]] = {c.case: [] for c in CASES}
            for rnd in range(rounds):   # interleaved: a burst of other load hits every case alike
                for case in CASES:
                    progress.update(task, description=f"nat {transport} round {rnd + 1}/{rounds}: {case.nat}")
                    runs[case.case].append(_run_case(topo, procs, case, servers[case.server], transport, ps,
                                                     rtt_calls, tokens, bulk_calls, args.bulk_mib, relay_cap))
                    progress.advance(task)
            rows += [_best(runs[c.case]) for c in CASES]
            for proc, _ in servers.values():
                proc.kill()
                proc.wait(5)
        if args.swarm:
            sw = start_swarm(topo, Path(tmp), args.relay_bandwidth)
            try:
                for transport in transports:
                    swarm += swarm_rows(sw, transport, tokens, rounds, progress, task)
            finally:
                for name in list(sw.procs)[::-1]:
                    sw.stop(name)
    return _with_ratios(rows, swarm)


def _start_servers(topo: Topology, procs: _Procs, transport: str, relay_args: list[str],
                   ps: list[str]) -> dict[str, tuple[subprocess.Popen[str], dict[str, Any]]]:
    specs = {"direct": ("server", []), "eim": ("eimserver", relay_args), "sym": ("symserver", relay_args)}
    started = {}
    for key, (host, extra) in specs.items():
        port = topo.free_port()
        punch = ["--punch"] if extra and transport == "quic" else []
        started[key] = (host, port, *procs.start(host, "server", "--port", str(port), "--transport", transport,
                                                 *extra, *punch, *ps))
    out = {}
    for key, (host, port, proc, err) in started.items():
        info = procs.ready(proc, err, f"{key} server on {host}")
        info["addr"] = f"{topo.ip(host)}:{port}"
        info["host"] = host
        out[key] = (proc, info)
    return out


def _run_case(topo: Topology, procs: _Procs, case: Case, server: tuple[subprocess.Popen[str], dict[str, Any]],
              transport: str, ps: list[str], rtt_calls: int, tokens: int, bulk_calls: int, bulk_mib: float,
              relay_cap: float | None) -> Row:
    _, info = server
    argv = [*AGENT, "client", "--transport", transport, "--peer", info["peer"], "--addr", info["addr"],
            "--rtt-calls", str(rtt_calls), "--tokens", str(tokens), "--bulk-calls", str(bulk_calls),
            "--bulk-mib", str(bulk_mib), *ps]
    if info["reach"] is not None:
        argv += ["--reach", json.dumps(info["reach"])]
    if case.punch and transport == "quic":
        argv.append("--punch")
    timeout = 60.0 + bulk_calls * bulk_mib * 2 + (rtt_calls + tokens) * 0.1
    try:
        res = topo.run(case.client, argv, timeout=timeout)
    except NetnsError as exc:
        raise RuntimeError(f"bench nat: the client for {case.nat} ({transport}) failed: {exc}") from None
    got: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    reach = info["reach"]
    tried = transport == "quic" and case.punch and reach is not None and reach["mode"] == "punch"
    if reach is None:
        punch = "-"
    elif transport != "quic":
        punch = "off (tcp)"
    elif reach["mode"] != "punch":
        punch = "not offered"
    elif not case.punch:
        punch = "off"
    else:
        punch = str(got.get("punch", "not tried"))
    relayed = got["path"] == "relayed"
    return {
        "kind": "hop", "case": case.case, "nat": case.nat, "transport": transport,
        "conn_transport": got["conn_transport"], "path": got["path"], "punch": punch, "punch_tried": tried,
        "punch_error": got.get("punch_error"), "mtu": got["mtu"], "packet_size": got["packet_size"],
        "establish_s": round(got["establish_s"], 4), "rtt_ms_p50": round(got["rtt_ms_p50"], 3),
        "rtt_ms_p90": round(got["rtt_ms_p90"], 3), "throughput_MBps": round(got["throughput_MBps"], 2),
        "tokens_per_s": None if got["tokens_per_s"] is None else round(got["tokens_per_s"], 1),
        "relay_cap_MBps": relay_cap if relayed else None,
        "rtt_calls": rtt_calls, "tokens": tokens, "bulk_calls": bulk_calls, "bulk_mib": bulk_mib,
    }


def _best(runs: list[Row]) -> Row:
    """One row from a case's rounds: each speed figure from its least disturbed round, the median
    setup time, and every round's path (``path``: the one they all took, or each that occurred)."""
    row = dict(runs[0])
    paths = [r["path"] for r in runs]
    row.update(paths=paths, rounds=len(runs),
               path=paths[0] if len(set(paths)) == 1 else "/".join(sorted(set(paths))),
               punch="/".join(dict.fromkeys(r["punch"] for r in runs)),
               establish_s=round(statistics.median(r["establish_s"] for r in runs), 4),
               rtt_ms_p50=min(r["rtt_ms_p50"] for r in runs), rtt_ms_p90=min(r["rtt_ms_p90"] for r in runs),
               throughput_MBps=max(r["throughput_MBps"] for r in runs))
    toks = [r["tokens_per_s"] for r in runs if r["tokens_per_s"] is not None]
    row["tokens_per_s"] = max(toks) if toks else None
    return row


def _with_ratios(rows: list[Row], swarm: list[Row]) -> list[Row]:
    for r in swarm:
        base = next((d for d in swarm if d["case"] == "direct" and d["transport"] == r["transport"]), None)
        r["tokens_x"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3) if base else None
    for r in rows:
        base = next((d for d in rows if d["case"] == "direct" and d["transport"] == r["transport"]), None)
        r["rtt_x"] = round(r["rtt_ms_p50"] / base["rtt_ms_p50"], 3) if base else None
        r["throughput_x"] = round(r["throughput_MBps"] / base["throughput_MBps"], 3) if base else None
        r["tokens_x"] = (round(r["tokens_per_s"] / base["tokens_per_s"], 3)
                         if base and r["tokens_per_s"] and base["tokens_per_s"] else None)
    return rows + swarm + [summary(rows + swarm)]


def summary(rows: list[Row]) -> Row:
    """The issue's goals read from the hop rows."""
    hops = [r for r in rows if r.get("kind") == "hop"]
    eim = [r for r in rows
           if r.get("kind") in ("hop", "swarm") and r["case"] in ("eim", "eim-eim") and r["transport"] == "quic"]
    relayed = [r for r in hops if "relayed" in r["paths"]]
    tput = [r["throughput_x"] for r in relayed if r["throughput_x"] is not None]
    rtt = [r["rtt_x"] for r in relayed if r["rtt_x"] is not None]
    return {
        "kind": "summary",
        "punch_every_eim_case": all(p == "punched" for r in eim for p in r["paths"]) if eim else None,
        "eim_cases": len(eim),
        "eim_attempts": sum(len(r["paths"]) for r in eim),
        "eim_attempts_punched": sum(p == "punched" for r in eim for p in r["paths"]),
        "relayed_min_throughput_x": min(tput) if tput else None,
        "relayed_throughput_goal_met": min(tput) >= 0.5 if tput else None,
        "relayed_max_rtt_x": max(rtt) if rtt else None,
        "relayed_rtt_goal_met": max(rtt) <= 2.0 if rtt else None,
        "relay_cap_MBps": next((r["relay_cap_MBps"] for r in relayed if r["relay_cap_MBps"]), None),
        "links": "veth pairs, no added delay or loss (no netem)",
    }


def render(rows: list[Row]) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    hops = [r for r in rows if r.get("kind") == "hop"]
    first = hops[0] if hops else {}
    table = Table(title=f"nat: one hop, direct / hole-punched / relayed (veth links, MTU {first.get('mtu')}, "
                        f"QUIC packets {first.get('packet_size')} B, no added delay)", title_justify="left")
    table.add_column("hop (client -> server)", no_wrap=True)
    table.add_column("dial/conn", no_wrap=True)
    table.add_column("path", no_wrap=True)
    table.add_column("punch", no_wrap=True)
    for col in ("setup s", "RTT ms (x)", "MB/s (x)", "tok/s (x)"):
        table.add_column(col, justify="right", no_wrap=True)

    def f(v: Any, spec: str = ".2f") -> str:
        return "-" if v is None else format(v, spec)

    for r in hops:
        table.add_row(r["nat"], f"{r['transport']}/{r['conn_transport']}", r["path"], r["punch"],
                      f(r["establish_s"], ".3f"), f"{f(r['rtt_ms_p50'], '.3f')} ({f(r['rtt_x'])})",
                      f"{f(r['throughput_MBps'], '.1f')} ({f(r['throughput_x'])})",
                      f"{f(r['tokens_per_s'], '.0f')} ({f(r['tokens_x'])})")
    s = next((r for r in rows if r.get("kind") == "summary"), None) or summary(rows)

    def verdict(ok: bool | None) -> Text:
        return Text("n/a", style="dim") if ok is None else Text("yes", "green") if ok else Text("no", "red")

    lines = [
        Text.assemble("hole punching succeeded in every EIM case: ", verdict(s["punch_every_eim_case"]),
                      f" ({s['eim_attempts_punched']} of {s['eim_attempts']} QUIC connections to an EIM server, "
                      "all rounds, swarm included)"),
        Text.assemble(f"relayed throughput >= 0.5x direct: {f(s['relayed_min_throughput_x'])}x  ",
                      verdict(s["relayed_throughput_goal_met"])),
        Text.assemble(f"relayed round trip <= 2x direct: {f(s['relayed_max_rtt_x'])}x  ",
                      verdict(s["relayed_rtt_goal_met"])),
        Text("(x): against the direct row of the same transport. dial/conn: the transport the client dialed with / "
             "the one the connection runs on (relayed circuits are TLS over TCP). RTT: median of 8 KB echoes. "
             "tok/s: one hop, one 576-float hidden state each way per token (SmolLM2's width), echoed, no model. "
             "Relays: "
             + ("no bandwidth cap" if not s.get("relay_cap_MBps") or s["relay_cap_MBps"] >= 1e6 else
                f"{s['relay_cap_MBps']:.0f} MB/s per peer (their token buckets let a 0.25 s burst through)"),
             style="dim"),
    ]
    swarm = [r for r in rows if r.get("kind") == "swarm"]
    return Group(table, *lines, *([render_swarm(swarm)] if swarm else []))
