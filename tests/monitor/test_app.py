"""The monitor's poll step against an in-memory stand-in for the DHT node (no sockets)."""

from __future__ import annotations

import io

import pytest
import trio
from rich.console import Console

from pymesh.monitor.app import MonitorOptions, SwarmPoller
from pymesh.monitor.state import MonitorState, RecordLike
from pymesh.monitor.view import render
from pymesh.proto.addr import parse_addr

from pymesh.proto.records import WorkerRecord

from .test_view import PEERS, FakeRecord


class FakeNode:
    def __init__(self, records: list[WorkerRecord]) -> None:
        self.records = records
        self.fail: Exception | None = None
        self.bootstrap_up = True

    async def list_records(self, model_id: str | None = None) -> list[WorkerRecord]:
        if self.fail is not None:
            raise self.fail
        return [r for r in self.records if model_id is None or r.model_id == model_id]

    async def ping(self, addr: object) -> bool:
        if not self.bootstrap_up:
            await trio.sleep_forever()
        return True


def options() -> MonitorOptions:
    return MonitorOptions(bootstrap=[parse_addr("127.0.0.1:9000")], poll_timeout=1.0, rtt_timeout=0.2)


@pytest.mark.timeout(20)
def test_poll_measures_rtt_and_survives_a_failed_poll() -> None:
    node = FakeNode([FakeRecord(PEERS[0], "m", 0, 4), FakeRecord(PEERS[1], "m", 4, 8, port=9200)])

    async def pinger(rec: RecordLike) -> float | None:
        if rec.port == 9200:
            await trio.sleep_forever()  # this worker never answers: RTT stays blank
        return 3.5

    async def main() -> None:
        poller = SwarmPoller(node, options(), pinger)
        st = await poller.poll(MonitorState(bootstrap="127.0.0.1:9000"))
        rtt = {w.peer: w.rtt_ms for w in st.workers}
        assert rtt == {PEERS[0]: 3.5, PEERS[1]: None}
        assert st.bootstrap_ok is True and st.error is None
        # The DHT fails and the bootstrap stops answering: last known workers stay, error shown.
        node.fail = OSError("network unreachable")
        node.bootstrap_up = False
        st = await poller.poll(st)
        assert st.error == "listing records failed: network unreachable"
        assert st.bootstrap_ok is False
        assert len(st.workers) == 2
        assert not [e for e in st.events if e.kind == "left"]
        console = Console(record=True, width=200, file=io.StringIO())
        console.print(render(st))
        out = console.export_text()
        assert "UNREACHABLE" in out and "network unreachable" in out

    trio.run(main)


class FakeNodeContext:
    def __init__(self, node: FakeNode) -> None:
        self.node = node

    async def __aenter__(self) -> FakeNode:
        return self.node

    async def __aexit__(self, *exc: object) -> None:
        return None


@pytest.mark.timeout(30)
def test_live_loop_redraws_from_trio_and_reports_changes() -> None:
    from pymesh.monitor.app import monitor_loop

    node = FakeNode([FakeRecord(PEERS[0], "m", 0, 4), FakeRecord(PEERS[1], "m", 4, 8)])
    polls = {"n": 0}
    original = node.list_records

    async def list_records(model_id: str | None = None) -> list[WorkerRecord]:
        polls["n"] += 1
        if polls["n"] == 2:
            node.records = node.records[:1]  # the second worker's record expires
        return await original(model_id)

    node.list_records = list_records  # type: ignore[method-assign]

    async def no_ping(rec: RecordLike) -> float | None:
        return 2.0

    console = Console(record=True, width=200, file=io.StringIO(), force_terminal=True)
    opts = options()
    opts.interval = 0.01
    state = trio.run(lambda: monitor_loop(opts, console=console, node_factory=lambda ident: FakeNodeContext(node),
                                          pinger_factory=lambda: no_ping, max_polls=3, screen=False))
    assert state.polls == 3
    assert [e.kind for e in state.events] == ["joined", "joined", "left"]
    assert state.gaps("m") == [(4, 7)]
    text = console.export_text()
    assert "gaps: 4-7" in text and "record expired" in text and "2.0ms" in text
