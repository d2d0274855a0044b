"""Private swarms on the command line (issue 11, item 10): ``pymesh identity show`` and
``--allow-peers FILE`` on every role that joins (worker, client, monitor, demo). In-process:
the parser and the options each command builds, no swarm."""

from __future__ import annotations

from pathlib import Path

import pytest

from pymesh.cli.main import build_parser, main
from pymesh.proto.allowlist import PeerAllowlist
from pymesh.proto.identity import Identity


def test_identity_show_prints_the_peer_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "worker.key"
    ident = Identity.load_or_create(key)
    assert main(["identity", "show", str(key)]) == 0
    assert capsys.readouterr().out.strip() == ident.peer_id.to_text()
    before = key.read_bytes()
    assert main(["identity", "show", str(tmp_path / "absent.key")]) == 1
    assert "cannot be read" in capsys.readouterr().err
    (tmp_path / "junk.key").write_text("junk")
    assert main(["identity", "show", str(tmp_path / "junk.key")]) == 1
    assert "not a PEM private key" in capsys.readouterr().err
    assert key.read_bytes() == before   # showing never rewrites the key


def test_the_printed_id_round_trips_through_an_allowlist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = [tmp_path / f"n{i}.key" for i in range(3)]
    lines = []
    for k in keys:
        Identity.load_or_create(k)
        main(["identity", "show", str(k)])
        lines.append(capsys.readouterr().out)
    allow_file = tmp_path / "allow.txt"
    allow_file.write_text("# my nodes\n" + "".join(lines))
    allow = PeerAllowlist.load(allow_file)
    assert all(allow.allows(Identity.load(k).peer_id) for k in keys) and len(allow) == 3


@pytest.mark.parametrize("command", [
    ["worker", "--bootstrap", "127.0.0.1:1", "--layers", "0-1"],
    ["client", "--bootstrap", "127.0.0.1:1"],
    ["monitor", "--bootstrap", "127.0.0.1:1"],
    ["demo"],
])
def test_every_role_takes_allow_peers(command: list[str], tmp_path: Path) -> None:
    from pymesh.cli.common import allow_peers_of

    peer = Identity.generate().peer_id
    f = tmp_path / "allow.txt"
    f.write_text(f"{peer}\n")
    args = build_parser(command[0]).parse_args([*command, "--allow-peers", str(f)])
    allow = allow_peers_of(args)
    assert allow is not None and allow.allows(peer)
    assert allow_peers_of(build_parser(command[0]).parse_args(command)) is None


def test_a_bad_allowlist_stops_the_command_before_it_starts(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "allow.txt"
    f.write_text("not-a-peer\n")
    rc = main(["monitor", "--bootstrap", "127.0.0.1:1", "--once", "--allow-peers", str(f)])
    err = capsys.readouterr().err
    assert rc == 1 and str(f) in err and "line 1" in err


def test_demo_private_swarm_lists_its_own_nodes_and_the_file(tmp_path: Path) -> None:
    from pymesh.demo.swarm import LocalSwarm

    outsider = Identity.generate().peer_id
    with LocalSwarm(workdir=tmp_path / "swarm") as swarm:
        allow = swarm.make_private(["worker0", "worker1", "client"], PeerAllowlist.of([outsider]))
        assert len(allow) == 4 and allow.allows(outsider)
        assert swarm.allow_file is not None and PeerAllowlist.load(swarm.allow_file) == allow
        # the keys made ahead are the ones the nodes use
        assert allow.allows(swarm.identity("client").peer_id)
        assert swarm._identity("worker1")[1] in allow
