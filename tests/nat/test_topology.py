"""The emulated NATs of tests/nat/netns.py behave as specified: reachability, what the public side
sees, inbound filtering, endpoint-independent vs symmetric mapping, UDP hole punching, and
teardown. Every socket operation in udp_tool.py has a timeout; every wait here is bounded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Callable

import pytest

from tests.nat.conftest import Server, read_json_line, require_netns, tool, tool_popen
from tests.nat.netns import PREFIX, Topology, _list_namespaces, remove_stale_namespaces

Serve = Callable[..., Server]


def _ip(addr: str) -> str:
    return addr.rpartition(":")[0]


def test_public_hosts_reach_each_other(standard_nat_topology: Topology, serve: Serve) -> None:
    topo = standard_nat_topology
    srv = serve(topo, "relay1")
    port = topo.free_port()
    udp = tool(topo, "bootstrap", "query", "--bind", str(port), "--to", srv.udp_addr())
    tcp = tool(topo, "bootstrap", "query", "--tcp", "--bind", str(port), "--to", srv.tcp_addr())
    assert udp["seen"] == {srv.udp_addr(): f"{topo.ip('bootstrap')}:{port}"}
    assert tcp["seen"] == {srv.tcp_addr(): f"{topo.ip('bootstrap')}:{port}"}


@pytest.mark.parametrize("home", ["alice", "carol"])
def test_home_host_is_seen_at_its_routers_public_ip(standard_nat_topology: Topology, serve: Serve,
                                                    home: str) -> None:
    topo = standard_nat_topology
    srv = serve(topo, "bootstrap")
    port = topo.free_port()
    udp = tool(topo, home, "query", "--bind", str(port), "--to", srv.udp_addr())
    tcp = tool(topo, home, "query", "--tcp", "--bind", str(port), "--to", srv.tcp_addr())
    router_ip = topo.homes[home].public_ip
    assert topo.ip(home).startswith("10.78.")
    assert _ip(udp["seen"][srv.udp_addr()]) == router_ip
    assert _ip(tcp["seen"][srv.tcp_addr()]) == router_ip
    sources = {_ip(e.get("udp") or e["tcp"]) for e in srv.events()}
    assert sources == {router_ip}


def test_unsolicited_inbound_does_not_reach_home_host(standard_nat_topology: Topology, serve: Serve) -> None:
    topo = standard_nat_topology
    alice = topo.homes["alice"]
    observer = serve(topo, "bootstrap")
    listener = serve(topo, "alice")  # UDP and TCP listeners on the home host itself
    # A live mapping: alice's socket talks to the observer, so router:port forwards replies from it.
    mapped_port = topo.free_port()
    punch = tool_popen(topo, "alice", "punch", "--bind", str(mapped_port), "--observer", observer.udp_addr(),
                       "--seconds", "3")
    assert read_json_line(punch)["mapped"] == f"{alice.public_ip}:{mapped_port}"
    assert punch.stdin is not None
    punch.stdin.write(f"{topo.ip('relay2')}:9\n")  # something to send to; relay2 never answers
    punch.stdin.flush()
    targets = [f"{alice.public_ip}:{p}" for p in (mapped_port, listener.udp, listener.tcp)]
    pokes = [
        tool_popen(topo, "relay1", "poke", *[a for t in targets for a in ("--to", t)]),
        # the observer's host, but not the observer's port: port-dependent filtering drops it
        tool_popen(topo, "bootstrap", "poke", "--bind", str(topo.free_port()), "--to", targets[0]),
        # public hosts have no route to private addresses
        tool_popen(topo, "relay2", "poke", "--to", f"{topo.ip('alice')}:{listener.udp}"),
    ]
    results = [p.communicate(timeout=20)[0] for p in pokes]
    out, err = punch.communicate(timeout=20)
    got = read_last_json(out, err)
    relay1, boot, relay2 = (json.loads(r.strip().splitlines()[-1])["tcp"] for r in results)
    assert all(v != "connected" for v in relay1.values()), relay1
    assert boot[targets[0]] != "connected"
    private = f"{topo.ip('alice')}:{listener.udp}"
    assert "unreachable" in relay2[private + "/udp"].lower(), relay2
    assert got["received"] == [], got
    assert listener.events() == []
    # the positive control: the observer's reply did come in through the same router
    assert got["mapped"] == f"{alice.public_ip}:{mapped_port}"


def test_router_forwards_no_new_inbound_connection_to_its_lan(nat_topology: Topology) -> None:
    """Even a public host that routes the LAN prefix through the router (same L2 segment) gets nothing
    through: the router's forward chain admits only LAN -> WAN and conntrack replies."""
    topo = nat_topology
    topo.add_public_host("attacker")
    home = topo.add_home("victim", nat="eim")
    listener = tool_popen(topo, "victim", "serve", "--udp", "5000", "--tcp", "5001", "--seconds", "10")
    assert read_json_line(listener) == {"ready": True}
    topo.run("attacker", ["ip", "route", "add", home.lan, "via", home.public_ip])
    target = f"{topo.ip('victim')}"
    tcp = tool(topo, "attacker", "poke", "--to", f"{target}:5000", "--to", f"{target}:5001")["tcp"]
    assert all(v != "connected" for v in tcp.values()), tcp
    listener.terminate()
    out, _ = listener.communicate(timeout=10)
    assert out.strip() == "", out  # no datagram, no connection
    # the positive control: the other direction works through the same router
    srv = tool_popen(topo, "attacker", "serve", "--udp", "5000", "--tcp", "5001", "--seconds", "10")
    assert read_json_line(srv) == {"ready": True}
    seen = tool(topo, "victim", "query", "--bind", "6000", "--to", f"{topo.ip('attacker')}:5000")["seen"]
    assert seen == {f"{topo.ip('attacker')}:5000": f"{home.public_ip}:6000"}


def read_last_json(out: str, err: str) -> dict[str, Any]:
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines, f"no output; stderr: {err!r}"
    obj: dict[str, Any] = json.loads(lines[-1])
    return obj


def test_eim_keeps_one_mapping_symmetric_one_per_destination(standard_nat_topology: Topology,
                                                             serve: Serve) -> None:
    topo = standard_nat_topology
    servers = [serve(topo, h) for h in ("bootstrap", "relay1", "relay2")]
    to = [a for s in servers for a in ("--to", s.udp_addr())]
    eim_port, sym_port = topo.free_port(), topo.free_port()
    eim = tool(topo, "alice", "query", "--bind", str(eim_port), *to)["seen"]
    sym = tool(topo, "carol", "query", "--bind", str(sym_port), *to)["seen"]
    assert set(eim.values()) == {f"{topo.homes['alice'].public_ip}:{eim_port}"}, eim
    assert {_ip(a) for a in sym.values()} == {topo.homes["carol"].public_ip}, sym
    # fully-random ports: three destinations share a port by chance with probability ~5e-5
    assert len(set(sym.values())) == 3, sym


def _punch(topo: Topology, a: str, b: str, observer: Server, seconds: float) -> tuple[dict[str, Any], ...]:
    """Both hosts learn their mapping from the observer, swap them, and send to each other at once."""
    procs = [tool_popen(topo, h, "punch", "--bind", str(topo.free_port()), "--observer", observer.udp_addr(),
                        "--seconds", str(seconds)) for h in (a, b)]
    mapped = [read_json_line(p)["mapped"] for p in procs]
    assert all(mapped), mapped
    for proc, peer in zip(procs, reversed(mapped)):
        assert proc.stdin is not None
        proc.stdin.write(peer + "\n")
        proc.stdin.flush()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=seconds + 15)
        results.append(read_last_json(out, err))
    return tuple(results)


def test_hole_punching_works_between_eim_nats(standard_nat_topology: Topology, serve: Serve) -> None:
    topo = standard_nat_topology
    observer = serve(topo, "bootstrap")
    a, b = _punch(topo, "alice", "bob", observer, seconds=1.5)
    assert a["punched_from"] == [b["mapped"]], (a, b)
    assert b["punched_from"] == [a["mapped"]], (a, b)


def test_hole_punching_fails_when_one_side_is_symmetric(standard_nat_topology: Topology, serve: Serve) -> None:
    topo = standard_nat_topology
    observer = serve(topo, "bootstrap")
    a, c = _punch(topo, "alice", "carol", observer, seconds=1.5)
    assert a["sent"] > 10 and c["sent"] > 10
    assert a["received"] == [] and c["received"] == [], (a, c)


def test_hosts_on_one_lan_reach_each_other(nat_topology: Topology) -> None:
    topo = nat_topology
    home = topo.add_home("flat", nat="eim", hosts=2)
    assert [h.name for h in home.hosts] == ["flat1", "flat2"]
    srv = tool_popen(topo, "flat2", "serve", "--udp", "5000", "--tcp", "5001", "--seconds", "10")
    assert read_json_line(srv) == {"ready": True}
    seen = tool(topo, "flat1", "query", "--bind", "6000", "--to", f"{topo.ip('flat2')}:5000")["seen"]
    assert seen == {f"{topo.ip('flat2')}:5000": f"{topo.ip('flat1')}:6000"}  # no NAT inside the LAN


def test_topology_is_removed_on_exit_even_after_a_failure() -> None:
    require_netns()
    topo = Topology()
    with pytest.raises(RuntimeError, match="boom"):
        with topo:
            topo.add_public_host("solo")
            topo.add_home("home", nat="symmetric")
            sleeper = topo.popen("home", [sys.executable, "-c", "import time; time.sleep(60)"])
            assert len(topo.namespaces()) == 4  # pub, solo, home-gw, home
            raise RuntimeError("boom")
    assert sleeper.poll() is not None
    assert [ns for ns in _list_namespaces() if ns.startswith(topo.prefix + "-")] == []
    assert topo.namespaces() == []


def test_namespaces_of_dead_runs_are_removed() -> None:
    require_netns()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=10)
    assert not os.path.exists(f"/proc/{dead.pid}")
    stale = f"{PREFIX}{dead.pid}x1-pub"
    mine = f"{PREFIX}{os.getpid()}x999-pub"
    for ns in (stale, mine):
        subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True, timeout=10)
    try:
        removed = remove_stale_namespaces()
        names = _list_namespaces()
        assert stale in removed and stale not in names
        assert mine in names  # this process's namespaces are never swept
    finally:
        for ns in (stale, mine):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
