"""The monitor shows each worker's quantization (issue 15): in the model cell of the worker
table, and each quantization of a model gets its own coverage map (a client routes through
one quantization only)."""

from __future__ import annotations

from pymesh.monitor.state import MonitorState, update
from tests.monitor.test_view import PEERS, FakeRecord, text_of


def test_worker_table_and_maps_show_the_quantization() -> None:
    recs = [
        FakeRecord(PEERS[0], "smol@abc", 0, 30, tokens_per_s=10.0),
        FakeRecord(PEERS[1], "smol@abc:q4_1", 0, 15, tokens_per_s=30.0),
        FakeRecord(PEERS[2], "smol@abc:q8_0", 0, 30, tokens_per_s=20.0),
    ]
    st = update(MonitorState(), recs, now=5.0)
    assert st.models() == ["smol@abc", "smol@abc:q4_1", "smol@abc:q8_0"]
    out = text_of(st, width=240)
    assert "coverage smol@abc:q4_1" in out and "coverage smol@abc:q8_0" in out
    assert f"{PEERS[1][:10]} │ smol q4_1 " in out and f"{PEERS[2][:10]} │ smol q8_0 " in out, out
    assert f"{PEERS[0][:10]} │ smol      │" in out, out
    # --model by name or by base id keeps every quantization of the model
    for wanted in ("smol", "smol@abc"):
        assert len(update(MonitorState(model_filter=wanted), recs, now=5.0).models()) == 3
    assert update(MonitorState(model_filter="smol@abc:q8_0"), recs, now=5.0).models() == ["smol@abc:q8_0"]
