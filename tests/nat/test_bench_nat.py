"""``pymesh bench nat --json --swarm`` with tiny counts: every case takes the path its NATs allow
(direct between public hosts, hole-punched to an EIM server over QUIC, relayed to a symmetric
one and wherever punching is off or the transport is TCP), rows carry every measurement with
ratios to the direct row, and the summary reads the goals from them; the same holds through a
real swarm (bootstrap, `pymesh relay`, echo workers with --reachability auto). Speed is never
asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.nat.conftest import require_netns

pytestmark = pytest.mark.timeout(180)

PATHS = {  # (transport, case) -> the path the connection must take
    ("quic", "direct"): "direct", ("quic", "eim"): "punched", ("quic", "eim-eim"): "punched",
    ("quic", "eim-nopunch"): "relayed", ("quic", "symmetric"): "relayed",
    ("tcp", "direct"): "direct", ("tcp", "eim"): "relayed", ("tcp", "eim-eim"): "relayed",
    ("tcp", "eim-nopunch"): "relayed", ("tcp", "symmetric"): "relayed",
}


def test_bench_nat_json_reports_the_path_each_case_takes() -> None:
    require_netns()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    res = subprocess.run([sys.executable, "-m", "pymesh", "bench", "nat", "--json", "--transport", "quic,tcp",
                          "--rtt-calls", "10", "--tokens", "10", "--bulk-calls", "1", "--bulk-mib", "0.25", "--rounds", "1", "--swarm"],
                         capture_output=True, text=True, timeout=170, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = json.loads(res.stdout)
    hops = [r for r in rows if r["kind"] == "hop"]
    assert {(r["transport"], r["case"]): r["path"] for r in hops} == PATHS, hops
    for r in hops:
        assert r["rounds"] == 1 and r["paths"] == [r["path"]], r
        assert r["conn_transport"] == ("tcp" if r["path"] == "relayed" else r["transport"]), r
        assert r["establish_s"] > 0 and r["rtt_ms_p50"] > 0 and r["throughput_MBps"] > 0 and r["tokens_per_s"] > 0
        assert r["mtu"] == 1500 and (r["packet_size"] is None) == (r["transport"] == "tcp")
        direct = next(d for d in hops if d["case"] == "direct" and d["transport"] == r["transport"])
        assert r["rtt_x"] == pytest.approx(r["rtt_ms_p50"] / direct["rtt_ms_p50"], rel=0.01)
        assert r["throughput_x"] == pytest.approx(r["throughput_MBps"] / direct["throughput_MBps"], rel=0.01)
    by = {(r["transport"], r["case"]): r for r in hops}
    assert by["quic", "eim"]["punch"] == by["quic", "eim-eim"]["punch"] == "ok"
    assert by["quic", "symmetric"]["punch"] == "not offered"     # its two relays saw two mappings
    assert by["quic", "eim-nopunch"]["punch"] == "off" and by["quic", "direct"]["punch"] == "-"
    summary = rows[-1]
    assert summary["kind"] == "summary" and summary["punch_every_eim_case"] is True and summary["eim_cases"] == 4
    assert summary["eim_attempts"] == summary["eim_attempts_punched"] == 4   # 2 cases, hop and swarm
    relayed = [r for r in hops if r["path"] == "relayed"]
    assert summary["relayed_min_throughput_x"] == min(r["throughput_x"] for r in relayed)
    assert summary["relayed_max_rtt_x"] == max(r["rtt_x"] for r in relayed)
    assert summary["relayed_rtt_goal_met"] == (summary["relayed_max_rtt_x"] <= 2.0)
    assert "hole punching succeeded in every EIM case: yes" in res.stderr   # the table went to stderr
    # through a real swarm: echo workers found via the DHT, behind NATs they detected themselves
    swarm = {(r["transport"], r["case"]): r for r in rows if r["kind"] == "swarm"}
    assert {k: r["path"] for k, r in swarm.items()} == {k: p for k, p in PATHS.items() if k[1] != "eim-nopunch"}
    assert all(r["tokens_per_s"] > 0 and r["establish_s"] > 0 and r["paths"] == [r["path"]]
               for r in swarm.values())


def _hop(case: str, transport: str, path: str, rtt: float, mbps: float, **kw: object) -> dict[str, object]:
    return {"kind": "hop", "case": case, "nat": case, "transport": transport, "path": path, "punch": "ok",
            "establish_s": 0.01, "rtt_ms_p50": rtt, "rtt_ms_p90": rtt * 2, "throughput_MBps": mbps,
            "tokens_per_s": 1000.0 / rtt, "relay_cap_MBps": None, **kw}


def test_rounds_merge_and_the_summary_reads_every_round() -> None:
    from pymesh.bench import nat

    merged = nat._best([_hop("eim", "quic", "punched", 2.0, 10.0, establish_s=0.3),
                        _hop("eim", "quic", "relayed", 1.0, 5.0, establish_s=0.1),
                        _hop("eim", "quic", "punched", 3.0, 20.0, establish_s=0.2)])
    assert merged["paths"] == ["punched", "relayed", "punched"] and merged["path"] == "punched/relayed"
    assert (merged["rtt_ms_p50"], merged["throughput_MBps"], merged["establish_s"]) == (1.0, 20.0, 0.2)
    rows = nat._with_ratios([nat._best([_hop("direct", "quic", "direct", 1.0, 100.0)]), merged,
                             nat._best([_hop("symmetric", "quic", "relayed", 1.5, 40.0)])], [])
    s = rows[-1]
    assert s["kind"] == "summary" and s["punch_every_eim_case"] is False   # one round fell back to the relay
    assert (s["eim_attempts"], s["eim_attempts_punched"]) == (3, 2)
    assert s["relayed_min_throughput_x"] == 0.2 and s["relayed_throughput_goal_met"] is False
    assert s["relayed_max_rtt_x"] == 1.5 and s["relayed_rtt_goal_met"] is True
