"""The monitor tells workers behind NAT apart (their record's reach), without dialing their host."""

from __future__ import annotations

from pymesh.monitor.state import WorkerView
from pymesh.proto.identity import Identity
from pymesh.proto.reach import Reach, RelayAddr
from pymesh.proto.records import WorkerRecord


def test_reach_mode_reaches_the_view() -> None:
    ident = Identity.generate()
    base = dict(model_id="m@0123456789ab", start=0, stop=2, host="127.0.0.1", port=9)
    relay = RelayAddr(bytes(32), "10.0.0.1", 9100)
    views = [WorkerView.from_record(WorkerRecord(**base, reach=r).signed(ident))  # type: ignore[arg-type]
             for r in (None, Reach("relay", (relay,)), Reach("punch", (relay,), ("10.0.0.9", 9)))]
    assert [v.reach for v in views] == ["direct", "relay", "punch"]
