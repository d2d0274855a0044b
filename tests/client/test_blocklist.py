"""Convictions that last: BanBook.convict, Swarm.convict, the blocklist file and evidence files.

No sockets: the Swarm's DHT is a fixed set of records (tests.client.test_swarm.OfflineSwarm) and
time is trio's virtual clock. The blocklist parser is fuzzed with hypothesis (bounded examples).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import trio
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from pymesh.client.bans import BanBook, BanCause
from pymesh.client.blocklist import (MAX_BLOCKLIST_BYTES, Blocklist, BlocklistError, Evidence, parse_blocklist,
                                     read_evidence, write_evidence)
from pymesh.client.routing import NoRouteError
from pymesh.client.swarm import Swarm
from pymesh.proto.records import WorkerRecord
from tests.client.test_swarm import BOOT, OfflineSwarm, peer, record, settings, virtual


def test_banbook_conviction_never_ends_nor_is_replaced_or_lifted() -> None:
    now = [0.0]
    book = BanBook(lambda: now[0], 10.0)
    ban = book.convict(peer(1), "equivocated")
    assert ban.until == math.inf and ban.cause is BanCause.CONVICTED and not ban.cause.liftable
    assert book.ban(peer(1), "timed out", BanCause.TIMEOUT).cause is BanCause.CONVICTED
    assert book.ban(peer(1), "wrong shape", BanCause.WRONG_ANSWER).why == "equivocated"
    newer = WorkerRecord(peer_id=peer(1), model_id="m", start=0, stop=2, host="h", port=1, timestamp=1e12)
    assert book.see([newer]) == []                   # a new incarnation lifts nothing
    now[0] = 1e9
    assert set(book.active()) == {peer(1)} and set(book.convicted()) == {peer(1)}
    book.ban(peer(2), "timed out", BanCause.TIMEOUT)
    # waiting for bans to end never waits for a conviction
    assert book.earliest_end([peer(1)]) is None
    assert book.earliest_end([peer(1), peer(2)]) == 1e9 + 10.0
    assert book.convict(peer(1), "again").why == "equivocated"


async def _route_peers(s: Swarm) -> list[Any]:
    return [o.peer for o in await s.find_route(0, 4)]


RECORDS = [record(1, 0, 2), record(2, 0, 2), record(3, 2, 4)]


def _evidence(n: int = 1) -> Evidence:
    g = torch.Generator().manual_seed(n)
    return Evidence(peer(n), "spot_check", "output differs from two other providers",
                    receipts=[b"\x01\x02signed", b"\xff" * 40],
                    tensors={"input": torch.randn(1, 3, 8, generator=g),
                             "output": torch.randn(1, 3, 8, generator=g).to(torch.bfloat16)},
                    detail={"step": 4, "span": [0, 2], "max_abs_err": 0.7, "tolerance": 0.01,
                            "checkers": [peer(2).to_text(), peer(5).to_text()]})


def test_convicted_worker_is_never_routed_again_and_survives_a_restart(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    bl_path = tmp_path / "home" / "blocklist.json"

    async def main() -> None:
        s = OfflineSwarm(RECORDS, blocklist=Blocklist(bl_path))
        assert s.load_blocklist() == 0
        bad = (await _route_peers(s))[0]
        other = peer(2) if bad == peer(1) else peer(1)
        with caplog.at_level(logging.WARNING, logger="pymesh.client.swarm"):
            ev_path = s.convict(bad, "spot check: output differs", _evidence(1 if bad == peer(1) else 2))
        assert ev_path is not None and ev_path.parent == bl_path.parent / "evidence" and ev_path.exists()
        line = next(r.getMessage() for r in caplog.records if "convicted" in r.getMessage())
        assert bad.short() in line and "spot check: output differs" in line and str(ev_path) in line
        assert s.convicted == {bad: "spot check: output differs"}
        assert s.convict(bad, "second proof") is None          # one conviction, one evidence file
        for _ in range(3):
            assert (await _route_peers(s))[0] == other
            await trio.sleep(3600)                             # bans of any length would have ended
        entry = Blocklist(bl_path).load()[bad]
        assert entry.why == "spot check: output differs" and entry.evidence == str(ev_path)

        # a restart: a new Swarm with the same blocklist file convicts it on start
        s2 = OfflineSwarm(RECORDS, blocklist=Blocklist(bl_path))
        assert s2.load_blocklist() == 1 and s2.convicted == {}
        assert s2.bans.active()[bad].until == math.inf
        assert (await _route_peers(s2))[0] == other

    virtual(main)


def test_only_convicted_providers_fail_at_the_discovery_timeout_instead_of_waiting_forever() -> None:
    async def main() -> None:
        s = OfflineSwarm([record(1, 0, 2), record(3, 2, 4)], settings=settings(discovery_timeout=5.0))
        s.convict(peer(1), "equivocation")
        t0 = trio.current_time()
        with pytest.raises(NoRouteError, match="layer 0") as exc:
            await s.find_route(0, 4)
        assert trio.current_time() - t0 <= 1.0, "convictions do not end: no reason to wait for them"
        assert "convicted of wrong outputs" in str(exc.value) and "pymesh blocklist list" in str(exc.value)
        # a provider banned for a while besides the convicted one: wait for its ban to end
        s2 = OfflineSwarm([record(1, 0, 2), record(2, 0, 2), record(3, 2, 4)], settings=settings(discovery_timeout=5.0))
        s2.convict(peer(1), "equivocation")
        s2.ban(peer(2), "timed out", BanCause.TIMEOUT)
        assert (await _route_peers(s2))[0] == peer(2)

    virtual(main)


def test_start_convicts_listed_peers_and_a_malformed_blocklist_fails_before_any_socket(tmp_path: Path) -> None:
    path = tmp_path / "blocklist.json"
    path.write_text('{"not a peer": {}}')

    async def main() -> None:
        with pytest.raises(BlocklistError, match=str(path)):
            async with Swarm(BOOT, "m", blocklist=Blocklist(path)):
                pass

    trio.run(main)


def test_evidence_files_round_trip(tmp_path: Path) -> None:
    ev = _evidence()
    p1 = write_evidence(tmp_path, ev, now=1_700_000_000.25)
    p2 = write_evidence(tmp_path, ev, now=1_700_000_000.25)     # same second: a second file
    assert p1 != p2 and p1.name.startswith("20231114T221320.250000Z-" + ev.peer.short())
    doc = json.loads(p1.read_text())
    assert doc["peer"] == ev.peer.to_text() and doc["kind"] == "spot_check"
    assert doc["receipts"] == [r.hex() for r in ev.receipts] and (tmp_path / doc["tensors"]).exists()
    back = read_evidence(p1)
    assert (back.peer, back.kind, back.why, back.receipts, back.detail) == \
        (ev.peer, ev.kind, ev.why, ev.receipts, ev.detail)
    for name, t in ev.tensors.items():
        assert back.tensors[name].dtype == t.dtype and torch.equal(back.tensors[name], t)
    bare = write_evidence(tmp_path, Evidence(peer(3), "equivocation", "two receipts for step 2"))
    assert json.loads(bare.read_text())["tensors"] is None and read_evidence(bare).tensors == {}
    assert not list(tmp_path.glob(".*.tmp"))                    # atomic writes leave no temporaries
    (tmp_path / doc["tensors"]).write_bytes(b"garbage")
    with pytest.raises(BlocklistError, match="safetensors"):
        read_evidence(p1)


def test_convict_without_a_blocklist_keeps_the_ban_and_writes_nothing(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        s = OfflineSwarm(RECORDS)
        with caplog.at_level(logging.WARNING, logger="pymesh.client.swarm"):
            assert s.convict(peer(1), "receipt contradicts its tensor", _evidence()) is None
        assert peer(1) in s.current_bans() and "spot_check evidence not written" in caplog.text

    virtual(main)


def test_add_remove_and_entries_added_by_another_client_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "bl.json"
    a, b = Blocklist(path), Blocklist(path)
    assert a.load() == {} and not path.exists()
    a.add(peer(1), "why one", tmp_path / "e1.json", now=100.0)
    b.add(peer(2), "why two", None, now=200.0)               # b never loaded a's entry itself
    assert set(Blocklist(path).load()) == {peer(1), peer(2)}
    assert a.remove(peer(1)) is True and a.remove(peer(1)) is False
    left = Blocklist(path).load()
    assert set(left) == {peer(2)} and left[peer(2)].when == 200.0 and left[peer(2)].evidence is None


@pytest.mark.parametrize("text,match", [
    ("[]", "not a JSON object"),
    ("{", "not valid JSON"),
    ('{"' + peer(1).to_text() + '": 5}', "is not an object"),
    ('{"' + peer(1).to_text() + '": {"why": 3}}', "'why' must be a string"),
    ('{"' + peer(1).to_text() + '": {"why": "x", "when": NaN}}', "finite number"),
    ('{"' + peer(1).to_text() + '": {"why": "x", "when": 1' + "0" * 400 + '}}', "finite number"),
    ('{"' + peer(1).to_text() + '": {"why": "x", "evidence": []}}', "'evidence' must be a string"),
    ("[" * 100_000, "not valid JSON"),
])
def test_malformed_blocklists_are_one_error_naming_the_file(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bl.json"
    path.write_text(text)
    with pytest.raises(BlocklistError, match=match) as info:
        Blocklist(path).load()
    assert str(path) in str(info.value)


def test_oversized_blocklist_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "bl.json"
    path.write_bytes(b" " * (MAX_BLOCKLIST_BYTES + 1))
    with pytest.raises(BlocklistError, match="larger than"):
        Blocklist(path).load()


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=60),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=60), inner,
                                                                                   max_size=4),
                     max_leaves=12)
_entry = st.fixed_dictionaries({}, optional={"why": _json, "when": _json, "evidence": _json})
_peer_key = st.sampled_from([peer(n).to_text() for n in range(1, 4)]) | st.text(max_size=60)


@hsettings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(_peer_key, _entry | _json, max_size=4) | _json)
def test_fuzzed_blocklist_documents_parse_or_raise_blocklist_error(doc: Any) -> None:
    try:
        entries = parse_blocklist(doc)
    except BlocklistError:
        return
    for p, e in entries.items():
        assert e.peer == p and isinstance(e.why, str) and math.isfinite(e.when)


@hsettings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_fuzzed_blocklist_bytes_parse_or_raise_blocklist_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "bl.json"
    path.write_bytes(data)
    try:
        Blocklist(path).load()
    except BlocklistError as exc:
        assert str(path) in str(exc)


_ADD_MANY = """
import sys
from pathlib import Path
from pymesh.client.blocklist import Blocklist
from pymesh.proto.identity import PeerID
first = int(sys.argv[2])
for n in range(first, first + 10):
    Blocklist(Path(sys.argv[1])).add(PeerID(bytes([n]) * 32), f"conviction {n}")
"""


def test_clients_adding_at_once_lose_no_entry(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "bl.json"
    procs = [subprocess.Popen([sys.executable, "-c", _ADD_MANY, str(path), str(1 + 10 * i)]) for i in range(4)]
    assert [p.wait(60) for p in procs] == [0] * 4
    assert set(Blocklist(path).load()) == {peer(n) for n in range(1, 41)}
