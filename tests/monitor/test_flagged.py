"""Flagged workers: the monitor marks the workers on a client blocklist (pure state and view,
the poll re-reading the file through pymesh.cli.monitor.BlocklistWatch; no sockets)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from pymesh.cli.monitor import BlocklistWatch
from pymesh.client.blocklist import Blocklist, BlocklistError
from pymesh.monitor.app import MonitorOptions, SwarmPoller
from pymesh.monitor.state import MonitorState, snapshot, update
from pymesh.proto.addr import parse_addr
from pymesh.proto.identity import PeerID

from .test_app import FakeNode
from .test_view import PEERS, FakeRecord, text_of

RECS = [FakeRecord(PEERS[0], "smol@abc", 0, 10), FakeRecord(PEERS[1], "smol@abc", 10, 20, port=9102)]


def test_flagged_worker_is_marked_in_row_header_event_and_json() -> None:
    why = "spot check: output differs from two providers \x1b[2J[/]"
    st = update(MonitorState(), RECS, now=1010.0, flagged={PEERS[1]: why})
    out = text_of(st, width=260)
    row = next(line for line in out.splitlines() if PEERS[1][:10] in line and "127.0.0.1:9102" in line)
    assert "FLAGGED" in row
    assert "FLAGGED" not in next(line for line in out.splitlines() if PEERS[0][:10] in line and ":9100" in line)
    listed = next(line for line in out.splitlines() if PEERS[1][:10] in line and "10-19" in line
                  and "127.0.0.1" not in line)
    assert "spot check: output differs from two providers" in listed
    assert "1 flagged worker(s)" in out
    assert "\x1b" not in out                                    # escaped, never sent to the terminal
    assert [e.peer for e in st.events if e.kind == "flagged"] == [PEERS[1]]
    assert "\\x1b[2J[/]" in st.flagged[PEERS[1]]               # escaped, and not read as rich markup
    rows = {w["peer"]: w["flagged"] for w in snapshot(st)["workers"]}
    assert rows == {PEERS[0]: None, PEERS[1]: st.flagged[PEERS[1]]}
    # the next poll without a new list keeps the flags and repeats no event
    st2 = update(st, RECS, now=1012.0)
    assert st2.flagged == st.flagged and [e.kind for e in st2.events].count("flagged") == 1
    # a worker convicted later is flagged then, with an event
    st3 = update(st2, RECS, now=1014.0, flagged={PEERS[1]: why, PEERS[0]: "equivocation"})
    assert [e.peer for e in st3.events if e.kind == "flagged"] == [PEERS[1], PEERS[0]]
    assert "FLAGGED" not in text_of(update(st3, RECS, now=1016.0, flagged={}), width=260)


@pytest.mark.timeout(20)
def test_poll_rereads_the_blocklist_file_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "blocklist.json"
    watch = BlocklistWatch(path)
    assert watch() == {}                                      # no file yet: nobody flagged
    opts = MonitorOptions(bootstrap=[parse_addr("127.0.0.1:9000")], poll_timeout=1.0, rtt_timeout=0.2,
                          flagged=watch)

    async def main() -> None:
        poller = SwarmPoller(FakeNode(list(RECS)), opts, None)
        st = await poller.poll(MonitorState())
        assert st.flagged == {}
        Blocklist(path).add(PeerID.from_text(PEERS[0]), "receipt contradicts its tensor")
        st = await poller.poll(st)
        assert st.flagged == {PEERS[0]: "receipt contradicts its tensor"}
        path.write_text("{ not json")                          # a broken rewrite: the last list stays
        st = await poller.poll(st)
        assert st.flagged == {PEERS[0]: "receipt contradicts its tensor"}

    trio.run(main)
    with pytest.raises(BlocklistError):
        BlocklistWatch(path)()
