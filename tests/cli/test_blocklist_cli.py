"""``pymesh blocklist list|add|remove`` and the swarm-client flags --verify, --verify-rate and
--blocklist (in process: pymesh.cli.main.main with PYMESH_HOME in a temporary folder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pymesh.cli.common import blocklist_of, swarm_client_settings
from pymesh.cli.main import build_parser, main
from pymesh.client.blocklist import Blocklist, Evidence, write_evidence
from pymesh.errors import ConfigError
from pymesh.proto.identity import PeerID
from pymesh.settings import load_settings

P1 = PeerID(bytes([1]) * 32)
P2 = PeerID(bytes([2]) * 32)


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PYMESH_HOME", str(tmp_path))
    return tmp_path


def test_list_add_remove(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["blocklist", "list"]) == 0
    assert "no workers" in capsys.readouterr().out
    bl = Blocklist(home / "blocklist.json")
    ev = write_evidence(bl.evidence_folder, Evidence(P1, "spot_check", "differs", tensors={"out": torch.ones(2)}))
    bl.add(P1, "spot check: differs \x1b[31m", ev, now=1_700_000_000.0)
    assert main(["blocklist", "add", P2.to_text(), "--why", "by hand"]) == 0
    capsys.readouterr()
    assert main(["blocklist", "list"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith(P1.to_text()))
    assert "2023-11-14 22:13:20Z" in row and "spot check: differs \\x1b[31m" in row and str(ev) in row
    assert "\x1b" not in out and P2.to_text() in out and "2 worker(s)" in out
    assert main(["blocklist", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["peer"] for e in listed] == [P1.to_text(), P2.to_text()] and listed[0]["evidence"] == str(ev)
    assert main(["blocklist", "remove", P1.to_text()]) == 0
    assert main(["blocklist", "remove", P1.to_text()]) == 1
    assert "is not on the blocklist" in capsys.readouterr().err
    assert set(Blocklist(home / "blocklist.json").load()) == {P2}


def test_explicit_path_and_errors_are_one_line(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "elsewhere" / "bl.json"
    assert main(["blocklist", "--blocklist", str(other), "add", P1.to_text()]) == 0
    assert set(Blocklist(other).load()) == {P1} and not (home / "blocklist.json").exists()
    other.write_text("{\"nope\": 1}")
    assert main(["blocklist", "--blocklist", str(other), "list"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pymesh blocklist: error: blocklist") and str(other) in err[0]
    assert main(["blocklist", "remove", "not-a-peer"]) == 1
    assert main(["blocklist", "--blocklist", "none", "list"]) == 1
    assert main(["blocklist"]) == 1
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["client", "serve"])
def test_swarm_client_flags(home: Path, command: str) -> None:
    base = [command, "--bootstrap", "127.0.0.1:9", "--model-path", "m"]
    args = build_parser(command).parse_args(base)
    args.settings = load_settings()
    s = swarm_client_settings(args)
    assert (s.client.verify, s.client.verify_rate) == ("sample", 0.05)
    bl = blocklist_of(args)
    assert bl is not None and bl.path == home / "blocklist.json"
    args = build_parser(command).parse_args([*base, "--verify", "all", "--verify-rate", "0.5",
                                             "--blocklist", str(home / "x.json")])
    args.settings = load_settings()
    s = swarm_client_settings(args)
    assert (s.client.verify, s.client.verify_rate) == ("all", 0.5)
    assert blocklist_of(args).path == home / "x.json"  # type: ignore[union-attr]
    args = build_parser(command).parse_args([*base, "--blocklist", "none", "--verify-rate", "1.5"])
    assert blocklist_of(args) is None
    with pytest.raises(ConfigError, match="--verify-rate 1.5"):
        swarm_client_settings(args)
    with pytest.raises(SystemExit):
        build_parser(command).parse_args([*base, "--verify", "sometimes"])


@pytest.mark.timeout(300)
def test_a_client_process_never_routes_through_a_blocklisted_worker(tmp_path: Path) -> None:
    """Real processes (bootstrap, two echo workers for the same layers, TCP): `pymesh client`
    with --blocklist naming one of them routes through the other, whichever is listed; with
    both listed it finds no route and says so."""
    import os
    import subprocess
    import sys

    from pymesh.demo.swarm import LocalSwarm

    with LocalSwarm(workdir=tmp_path / "swarm") as swarm:
        swarm.start_bootstrap()
        for _ in range(2):
            swarm.start_worker(layers=(0, 1), transport="tcp", model_name="echo")
        swarm.wait_for_workers(swarm.workers, timeout=120)
        a, b = (w.peer_id for w in swarm.workers)
        base = [sys.executable, "-m", "pymesh", "client", "--bootstrap", swarm.bootstrap_addr, "--chain", "0-1",
                "--transport", "tcp", "--hidden-size", "64", "--rounds", "2", "--json"]
        env = {**os.environ, "PYMESH_DISCOVERY_TIMEOUT": "4"}
        path = tmp_path / "bl.json"
        for listed, other in ((a, b), (b, a)):
            path.unlink(missing_ok=True)
            Blocklist(path).add(listed, "convicted in a test")
            res = subprocess.run([*base, "--blocklist", str(path)], capture_output=True, text=True, timeout=120,
                                 env=env)
            assert res.returncode == 0, res.stderr[-2000:]
            assert [h["peer"] for h in json.loads(res.stdout)["route"]] == [other.to_text()]
        Blocklist(path).add(a, "convicted in a test")          # b is listed already: both are now
        res = subprocess.run([*base, "--blocklist", str(path)], capture_output=True, text=True, timeout=120, env=env)
        assert res.returncode == 1 and "layer 0" in res.stderr and "Traceback" not in res.stderr
