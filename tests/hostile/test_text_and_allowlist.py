"""Hostile text in records (issue 11, item 8) and private swarms in the monitor (item 10).

A record's signer chooses its model id, host and transport names. The monitor must show
them without crashing on rich markup (``[/]``), without passing escape sequences to the
terminal, and without drawing a coverage map as large as a record's ``stop`` claims; log
lines must escape control characters. With ``--allow-peers`` the monitor shows, and pings,
only the listed signers. No sockets: the view is rendered into rich's recording console
and the poller runs against an in-memory stand-in for the DHT node.

Measure (the rows of the closing note): ``python -m tests.hostile.test_text_and_allowlist``.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from rich.console import Console

from pymesh.monitor.app import MonitorOptions, SwarmPoller
from pymesh.monitor.state import MonitorState, RecordLike, update
from pymesh.monitor.view import render
from pymesh.proto.addr import parse_addr
from pymesh.proto.identity import Identity

PEERS = [Identity.from_seed(bytes([i + 40]) * 32).peer_id for i in range(4)]
OSC_TITLE = "\x1b]0;owned\x07"          # sets the terminal's title
CSI_CLEAR = "\x1b[2J\x1b[H"             # clears the screen
C1_CSI = "\x9b31m"                      # one-byte CSI (8-bit terminals)
BIDI = "\u202e"                         # right-to-left override


@dataclass(frozen=True)
class HostileRecord:
    """What the monitor reads of a record (RecordLike), with any text its signer liked.

    Not a WorkerRecord on purpose: the view must hold even for records that reach it
    by a path that did not parse them strictly."""

    peer_id: Any
    model_id: str
    start: int
    stop: int
    host: str = "127.0.0.1"
    port: int = 9100
    transports: tuple[str, ...] = ("quic",)
    state: str = "online"
    block_ms: float = 1.0
    tokens_per_s: float = 10.0
    cache_tokens_free: int = 100
    cache_tokens_total: int = 200
    sessions: int = 0
    timestamp: float = 1000.0


def screen_of(state: MonitorState) -> str:
    """What a real terminal would receive (colours on), as one string."""
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, color_system="truecolor", width=200)
    console.print(render(state))
    return out.getvalue()


def text_of(state: MonitorState) -> str:
    console = Console(record=True, width=200, color_system=None, file=io.StringIO())
    console.print(render(state))
    return console.export_text()


def test_markup_in_record_fields_is_shown_not_interpreted() -> None:
    # Before the fix: rich.errors.MarkupError ("closing tag '[/]' ... has nothing to close").
    recs = [HostileRecord(PEERS[0], "evil[/]@abc", 0, 4, host="[/]", transports=("quic[/]", "[bold]")),
            HostileRecord(PEERS[1], "[link=http://x]m[/link]", 0, 2, host="[red]h[/red]")]
    state = update(MonitorState(bootstrap="127.0.0.1:9000"), recs, now=1001.0)
    out = text_of(state)
    assert "evil[/]" in out and "quic[/]" in out and "[link=http://x]m[/link]" in out
    assert "[/]:9100" in out


def test_terminal_escapes_in_records_never_reach_the_terminal() -> None:
    evil = f"m{OSC_TITLE}{CSI_CLEAR}{C1_CSI}{BIDI}x"
    recs = [HostileRecord(PEERS[0], evil, 0, 4, host=f"h{CSI_CLEAR}", transports=(f"q{OSC_TITLE}",))]
    state = update(MonitorState(bootstrap="127.0.0.1:9000"), recs, now=1001.0)
    screen = screen_of(state)
    for seq in ("\x1b]", "\x07", "\x1b[2J", "\x1b[H", "\x9b", BIDI):
        assert seq not in screen, f"{seq!r} reached the terminal"
    # ...and they are shown escaped, so an operator sees what was attempted.
    assert "\\x1b]0;owned\\x07" in text_of(state)


def test_a_huge_span_does_not_make_a_huge_coverage_map() -> None:
    recs = [HostileRecord(PEERS[0], "m", 0, 8), HostileRecord(PEERS[1], "m", 0, 2 ** 20)]
    state = update(MonitorState(), recs, now=1001.0)
    assert len(state.block_throughput("m")) == 8
    assert [w.peer for w in state.workers] == [PEERS[0].to_text()] and state.ignored == 1
    out = text_of(state)
    assert len(out) < 20_000 and "1 records ignored" in out
    # With the block count known (--blocks), a span past it is ignored too.
    state = update(MonitorState(), [HostileRecord(PEERS[2], "m", 0, 40)], now=1001.0,
                   model_blocks={"m": 30})
    assert not state.workers and len(state.block_throughput("m")) == 30


def test_many_models_draw_a_bounded_number_of_maps() -> None:
    recs = [HostileRecord(Identity.from_seed(bytes([i + 1, 7]) * 16).peer_id, f"model{i}", 0, 4)
            for i in range(40)]
    out = text_of(update(MonitorState(), recs, now=1001.0))
    assert out.count("coverage model") <= 8 and "32 more models" in out


def test_log_lines_escape_control_characters() -> None:
    from pymesh.cli.main import SafeFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(SafeFormatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("tests.hostile.text")
    logger.addHandler(handler)
    try:
        logger.warning("record for %s from %s", f"m{OSC_TITLE}\nINFO forged line", f"h{CSI_CLEAR}")
        try:
            raise ValueError(f"peer said {CSI_CLEAR}")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "\x1b" not in text and "\x07" not in text
    assert "\nINFO forged line" not in text and "\\x0aINFO forged line" in text
    assert "Traceback" in text


def test_monitor_shows_and_pings_only_listed_signers() -> None:
    from pymesh.proto.allowlist import PeerAllowlist

    listed, stranger = PEERS[0], PEERS[1]
    recs = [HostileRecord(listed, "m", 0, 4, port=9100), HostileRecord(stranger, "m", 0, 4, port=9200)]
    pinged: list[int] = []

    class Node:
        async def list_records(self, model_id: str | None = None) -> list[RecordLike]:
            return list(recs)

    async def pinger(rec: RecordLike) -> float | None:
        pinged.append(rec.port)
        return 1.0

    async def main() -> MonitorState:
        opts = MonitorOptions(bootstrap=[parse_addr("127.0.0.1:9000")], poll_timeout=1.0, rtt_timeout=0.5,
                              allow_peers=PeerAllowlist.of([listed]))
        state = MonitorState(allow_peers=frozenset(p.to_text() for p in PeerAllowlist.of([listed])))
        return await SwarmPoller(Node(), opts, pinger).poll(state)

    state = trio.run(main)
    assert [w.peer for w in state.workers] == [listed.to_text()] and state.ignored == 1
    assert pinged == [9100], "the monitor dialled a host that an unlisted signer named"
    assert stranger.to_text()[:10] not in text_of(state)


def test_a_default_model_name_from_a_hostile_folder_is_sanitised(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    from pymesh.errors import ConfigError
    from pymesh.model.fingerprint import model_id
    from pymesh.proto.records import is_valid_model_id
    from tests.model.tiny import make_tiny_model

    tiny = make_tiny_model(tmp_path)
    hostile = tmp_path / "evil[b]\x1b]0;t\x07 model@x"
    tiny.rename(hostile)
    with caplog.at_level(logging.INFO, logger="pymesh.model.fingerprint"):
        mid = model_id(hostile)
    assert is_valid_model_id(mid) and mid.startswith("evil-b-0-t-model-x@")
    assert "not a valid model name" in caplog.text
    with pytest.raises(ConfigError, match="only ASCII letters"):
        model_id(hostile, "bad name[/]")


@pytest.fixture(scope="module")
def private_swarm() -> Any:
    """Bootstrap and two echo workers (TCP) on loopback, started with ``--allow-peers`` listing
    both workers and a ``client`` key (LocalSwarm.make_private, as ``pymesh demo --allow-peers``)."""
    from pymesh.demo.swarm import LocalSwarm

    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        swarm.make_private(["worker0", "worker1", "client"])
        for span in ((0, 1), (2, 3)):
            swarm.start_worker(layers=span, transport="tcp", model_name="echo")
        swarm.wait_for_workers(swarm.workers, timeout=120)
        yield swarm


@pytest.mark.timeout(400)
def test_a_private_swarm_serves_listed_clients_only(private_swarm: Any) -> None:
    """Real processes: the CLI flag reaches the workers; a listed key gets its echo chain, a
    fresh key is refused by the allowlist and fails at once, naming itself and --identity."""
    import json
    import os
    import subprocess
    import sys

    swarm = private_swarm
    assert swarm.allow_file is not None
    base = [sys.executable, "-m", "pymesh", "-v", "client", "--bootstrap", swarm.bootstrap_addr, "--chain", "0-3",
            "--transport", "tcp", "--hidden-size", "64", "--rounds", "2", "--json",
            "--allow-peers", str(swarm.allow_file)]
    env = {**os.environ, "PYMESH_DISCOVERY_TIMEOUT": "6", "PYMESH_BAN_SECONDS": "30"}
    listed = subprocess.run([*base, "--identity", str(swarm.workdir / "client.key")], capture_output=True,
                            text=True, timeout=180, env=env)
    assert listed.returncode == 0, listed.stderr[-2000:]
    route = [hop["peer"] for hop in json.loads(listed.stdout)["route"]]
    assert route == [w.peer_id.to_text() for w in swarm.workers]
    stranger = subprocess.run(base, capture_output=True, text=True, timeout=180, env=env)
    assert stranger.returncode != 0
    assert "allowlist" in stranger.stderr and "--identity" in stranger.stderr, stranger.stderr[-2000:]
    assert "banned after failures" not in stranger.stderr, stranger.stderr[-2000:]


# ---- measurement: python -m tests.hostile.test_text_and_allowlist ---------------------------------
def measure() -> list[tuple[str, str, str]]:
    """(attack, outcome, figure) on this tree; run it on the commit before the fix for 'before'."""
    rows: list[tuple[str, str, str]] = []
    recs = [HostileRecord(PEERS[0], "evil[/]", 0, 4, host="[/]")]
    try:
        text_of(update(MonitorState(), recs, now=1001.0))
        rows.append(("'[/]' in model id and host", "rendered", "0 crashes"))
    except Exception as exc:  # the 'before' outcome
        rows.append(("'[/]' in model id and host", f"monitor crashed: {type(exc).__name__}", "1 crash / poll"))
    recs = [HostileRecord(PEERS[0], f"m{OSC_TITLE}{CSI_CLEAR}", 0, 4, host=f"h{CSI_CLEAR}")]
    screen = screen_of(update(MonitorState(), recs, now=1001.0))
    n = sum(screen.count(s) for s in ("\x1b]", "\x1b[2J", "\x1b[H"))
    rows.append(("OSC/CSI in model id and host", "escapes reached the terminal" if n else "shown escaped",
                 f"{n} raw sequences on screen"))
    recs = [HostileRecord(PEERS[0], "m", 0, 8), HostileRecord(PEERS[1], "m", 0, 2 ** 20)]
    t0 = time.perf_counter()
    state = update(MonitorState(), recs, now=1001.0)
    cells = len(state.block_throughput("m"))
    size = len(text_of(state))
    rows.append(("record with stop=2^20", f"{cells} coverage cells", f"{size} chars drawn, "
                 f"{time.perf_counter() - t0:.2f} s per poll"))
    return rows


if __name__ == "__main__":
    for attack, outcome, figure in measure():
        print(f"| {attack} | {outcome} | {figure} |")
