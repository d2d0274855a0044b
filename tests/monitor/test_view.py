"""The monitor's pure state update and view, rendered into rich's recording console."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from pymesh.monitor.state import MonitorState, update
from pymesh.monitor.view import GAP_CELL, render
from pymesh.proto.identity import Identity, PeerID
from pymesh.proto.records import WorkerRecord

PEERS = [Identity.from_seed(bytes([i + 1]) * 32).peer_id.to_text() for i in range(8)]


def FakeRecord(peer: str, model_id: str, start: int, stop: int, **fields: Any) -> WorkerRecord:  # noqa: N802
    """An unsigned WorkerRecord (the view never checks signatures) with test defaults."""
    defaults: dict[str, Any] = dict(host="127.0.0.1", port=9100, block_ms=1.5, tokens_per_s=20.0,
                                    cache_tokens_free=4000, cache_tokens_total=8192, timestamp=1000.0)
    defaults.update(fields)
    return WorkerRecord(peer_id=PeerID.from_text(peer), model_id=model_id, start=start, stop=stop, **defaults)


def text_of(state: MonitorState, width: int = 200) -> str:
    console = Console(record=True, width=width, color_system=None)
    console.print(render(state))
    return console.export_text()


def test_full_coverage_single_model() -> None:
    recs = [
        FakeRecord(PEERS[0], "smol@abc", 0, 10, port=9100, tokens_per_s=30.0),
        FakeRecord(PEERS[1], "smol@abc", 10, 20, port=9102, tokens_per_s=25.0, sessions=2),
        FakeRecord(PEERS[2], "smol@abc", 20, 30, port=9104, tokens_per_s=40.0),
    ]
    st = update(MonitorState(bootstrap="127.0.0.1:9000"), recs, now=1010.0, bootstrap_ok=True,
                rtts_ms={PEERS[0]: 0.42})
    out = text_of(st)
    assert "all 30 blocks covered; bottleneck 25.0 tok/s" in out
    assert GAP_CELL not in out
    assert "3 live / 3 records" in out
    assert "reachable" in out and "UNREACHABLE" not in out
    assert "95.0 tok/s" in out  # sum of spans
    for span in ("0-9", "10-19", "20-29"):
        assert span in out
    assert "127.0.0.1:9102" in out
    assert PEERS[1][:10] in out
    assert "0.4ms" in out  # RTT of the first worker; others unmeasured
    assert "10s" in out  # age of the records
    assert "4000/8192" in out
    # The first poll reports every live worker as joined.
    assert out.count("joined") == 3


def test_gaps_are_listed_and_marked() -> None:
    recs = [
        FakeRecord(PEERS[0], "smol@abc", 0, 10),
        FakeRecord(PEERS[1], "smol@abc", 20, 30),
    ]
    st = update(MonitorState(), recs, now=1000.0, bootstrap_ok=False)
    out = text_of(st)
    assert "gaps: 10-19 (10 of 30 blocks unserved)" in out
    assert out.count(GAP_CELL) == 10
    assert "UNREACHABLE" in out
    assert st.gaps("smol@abc") == [(10, 19)]


def test_offline_worker_leaves_gap_and_tail_is_remembered() -> None:
    st = update(MonitorState(), [FakeRecord(PEERS[0], "m", 0, 5), FakeRecord(PEERS[1], "m", 5, 8)], now=1.0)
    assert st.gaps("m") == []
    # The tail worker announces offline, then its record expires: blocks 5-7 stay a gap.
    st = update(st, [FakeRecord(PEERS[0], "m", 0, 5), FakeRecord(PEERS[1], "m", 5, 8, state="offline")], now=2.0)
    assert st.gaps("m") == [(5, 7)]
    assert [e.kind for e in st.events][-1] == "left"
    assert "announced offline" in st.events[-1].text
    st = update(st, [FakeRecord(PEERS[0], "m", 0, 5)], now=3.0)
    assert st.gaps("m") == [(5, 7)]
    out = text_of(st)
    assert "gaps: 5-7 (3 of 8 blocks unserved)" in out


def test_events_joined_left_moved_state() -> None:
    st = update(MonitorState(), [FakeRecord(PEERS[0], "m", 0, 10), FakeRecord(PEERS[1], "m", 10, 20)], now=10.0)
    st = update(
        st,
        [
            FakeRecord(PEERS[0], "m", 0, 15, timestamp=11.0),               # moved
            FakeRecord(PEERS[2], "m", 15, 20, state="joining"),            # joined
        ],                                                                 # PEERS[1] left
        now=20.0,
    )
    new = [e for e in st.events if e.time == 20.0]
    kinds = {e.peer: (e.kind, e.text) for e in new}
    assert kinds[PEERS[0]] == ("moved", "0-9 -> 0-14")
    assert kinds[PEERS[1]][0] == "left" and "record expired" in kinds[PEERS[1]][1]
    assert kinds[PEERS[2]][0] == "joined"
    st = update(st, [FakeRecord(PEERS[0], "m", 0, 15), FakeRecord(PEERS[2], "m", 15, 20)], now=30.0)
    assert st.events[-1].kind == "state" and st.events[-1].text == "joining -> online"
    out = text_of(st)
    for word in ("moved", "left", "joined", "state"):
        assert word in out
    # A poll with no change adds no events.
    n = len(st.events)
    st = update(st, [FakeRecord(PEERS[0], "m", 0, 15), FakeRecord(PEERS[2], "m", 15, 20)], now=40.0)
    assert len(st.events) == n


def test_several_models_each_get_a_map() -> None:
    recs = [
        FakeRecord(PEERS[0], "smol@abc", 0, 30, tokens_per_s=10.0),
        FakeRecord(PEERS[1], "tiny@def", 0, 2, tokens_per_s=100.0),
        FakeRecord(PEERS[2], "tiny@def", 3, 4, tokens_per_s=100.0),
    ]
    st = update(MonitorState(), recs, now=5.0)
    assert st.models() == ["smol@abc", "tiny@def"]
    out = text_of(st)
    assert "coverage smol@abc" in out and "coverage tiny@def" in out
    assert "all 30 blocks covered" in out
    assert "gaps: 2 (1 of 4 blocks unserved)" in out
    # The model filter keeps one model (by name, with or without fingerprint).
    only = update(MonitorState(model_filter="tiny"), recs, now=5.0)
    assert only.models() == ["tiny@def"]
    assert "smol" not in text_of(only)


def test_shading_follows_throughput_and_known_block_count() -> None:
    recs = [
        FakeRecord(PEERS[0], "m", 0, 2, tokens_per_s=100.0),
        FakeRecord(PEERS[1], "m", 2, 4, tokens_per_s=10.0),
    ]
    # The model's config says 6 blocks: the two no one announced are gaps.
    st = update(MonitorState(), recs, now=1.0, model_blocks={"m": 6})
    assert st.block_throughput("m") == [100.0, 100.0, 10.0, 10.0, 0.0, 0.0]
    out = text_of(st)
    assert "██░░××" in out
    # Two workers on the same blocks add up.
    st2 = update(st, recs + [FakeRecord(PEERS[2], "m", 2, 4, tokens_per_s=10.0)], now=2.0)
    assert st2.block_throughput("m")[2] == 20.0


def test_newest_record_per_peer_and_rtt_kept() -> None:
    recs = [FakeRecord(PEERS[0], "m", 0, 4, timestamp=5.0), FakeRecord(PEERS[0], "m", 0, 8, timestamp=6.0)]
    st = update(MonitorState(), recs, now=7.0, rtts_ms={PEERS[0]: 1.25})
    assert len(st.workers) == 1 and st.workers[0].stop == 8
    st = update(st, recs, now=8.0)  # no new measurement: keep the old one
    assert st.workers[0].rtt_ms == 1.25
    st = update(st, recs, now=9.0, rtts_ms={PEERS[0]: None})  # no answer this time
    assert st.workers[0].rtt_ms is None


def test_empty_swarm_and_error_line() -> None:
    st = update(MonitorState(bootstrap="10.0.0.1:9000"), [], now=1.0, bootstrap_ok=False,
                error="bootstrap 10.0.0.1:9000 did not answer")
    out = text_of(st)
    assert "no worker records in the DHT yet" in out
    assert "last poll failed: bootstrap 10.0.0.1:9000 did not answer" in out
    assert "none yet" in out


def test_signed_worker_record_renders() -> None:
    from pymesh import PROTOCOL_VERSION

    ident = Identity.generate()
    rec = WorkerRecord(
        version=PROTOCOL_VERSION, model_id="smol@abc", start=0, stop=30, host="127.0.0.1", port=9100,
        transports=("quic",), state="online", block_ms=1.0, tokens_per_s=12.5, cache_tokens_free=100,
        cache_tokens_total=200, sessions=1,
    ).signed(ident)
    assert rec.verify()
    st = update(MonitorState(), [rec], now=rec.timestamp + 3)
    out = text_of(st)
    assert ident.peer_id.short() in out
    assert "all 30 blocks covered" in out
    assert "3s" in out


def test_snapshot_is_plain_json() -> None:
    import json

    from pymesh.monitor.state import snapshot

    recs = [FakeRecord(PEERS[0], "m@x", 0, 4, tokens_per_s=10.0), FakeRecord(PEERS[1], "m@x", 6, 8)]
    st = update(MonitorState(bootstrap="127.0.0.1:9000"), recs, now=1004.0, bootstrap_ok=True,
                rtts_ms={PEERS[0]: 1.5})
    data = json.loads(json.dumps(snapshot(st)))
    assert data["models"]["m@x"] == {"blocks": 8, "gaps": [[4, 5]], "bottleneck_tokens_per_s": 0.0,
                                     "live_workers": 2}
    assert [(w["peer"], w["start"], w["stop"], w["rtt_ms"], w["age_s"]) for w in data["workers"]] == [
        (PEERS[0], 0, 4, 1.5, 4.0), (PEERS[1], 6, 8, None, 4.0)]
    assert data["bootstrap_ok"] is True and len(data["events"]) == 2
