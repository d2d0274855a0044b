"""Verified inference inside one process: a bootstrap node, echo workers (output = input,
so every honest worker agrees exactly) and one that lies, in one ``trio.run``.

Each kind of liar is caught on the step it lies, convicted with evidence written beside the
blocklist, and routed around; the session's outputs stay the honest ones. With only two
providers of a span nobody is convicted and the answer is marked unverified.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch
import trio

from pymesh.client.blocklist import Blocklist
from pymesh.client.session import InferenceSession
from pymesh.client.swarm import Swarm
from pymesh.net.dht import DHTNode
from pymesh.proto.identity import Identity, PeerID
from pymesh.settings import ClientSettings, Settings, WorkerSettings
from pymesh.worker.server import Worker, WorkerOptions

pytestmark = pytest.mark.timeout(120)

SETTINGS = Settings(
    worker=WorkerSettings(skip_throughput=True, throughput=10.0, next_hop_timeout=2.0, step_wait=3.0),
    client=ClientSettings(discovery_timeout=10.0, step_timeout=10.0, probe_after=1.0, probe_timeout=1.0,
                          rpc_timeout=3.0, verify="sample", verify_rate=0.0),
    record_ttl=30.0, heartbeat=1.0, dht_timeout=0.5, transport_timeout=10.0,
)
STEPS = 6


def _liar(mode: str, p: float = 1.0) -> Settings:
    return dataclasses.replace(SETTINGS, worker=dataclasses.replace(
        SETTINGS.worker, test_faults=True, test_corrupt=p, test_corrupt_mode=mode, test_corrupt_seed=7,
        throughput=10_000.0))  # announced as the fastest: routes choose it


async def _swarm_run(tmp: Path, spans: list[tuple[tuple[int, int], Settings]], *, verify: str = "sample",
                     rate: float = 0.0, honest_answer: bool = True) -> dict[str, object]:
    """Start the workers, run one session of STEPS steps, return what happened."""
    client_settings = dataclasses.replace(SETTINGS, client=dataclasses.replace(SETTINGS.client, verify=verify,
                                                                                verify_rate=rate))
    async with trio.open_nursery() as nursery, \
            DHTNode(Identity.generate(), host="127.0.0.1", port=0, config=SETTINGS.dht_config()) as boot:
        bootstrap = [f"127.0.0.1:{boot.port}"]
        workers: list[Worker] = []
        for (start, stop), settings in spans:
            w = Worker(WorkerOptions(bootstrap, layers=(start, stop), host="127.0.0.1", transport="tcp",
                                     cache_tokens=256, settings=settings))
            workers.append(await nursery.start(w.serve))
        inputs = [torch.randn(1, 3 if k == 0 else 1, 8, generator=torch.Generator().manual_seed(k))
                  for k in range(STEPS)]
        blocklist = Blocklist(tmp / "blocklist.json")
        async with Swarm(bootstrap, "echo", transport="tcp", settings=client_settings, blocklist=blocklist) as swarm:
            async with InferenceSession(swarm, 0, 6, max_tokens=STEPS + 2) as session:
                outputs = [await session.step(x) for x in inputs]
                report = session.verifier.report
                route = [o.peer for o in session.route]
            convicted = dict(swarm.convicted)
        nursery.cancel_scope.cancel()
    for k, (x, y) in enumerate(zip(inputs, outputs)):
        assert torch.equal(x, y) == honest_answer, f"step {k}: the output is not the expected one"
    return {"workers": workers, "report": report, "route": route, "convicted": convicted,
            "blocklist": _loaded(tmp / "blocklist.json")}


def _loaded(path: Path) -> Blocklist:
    b = Blocklist(path)
    b.load()
    return b


def _peer(r: dict[str, object], i: int) -> PeerID:
    return r["workers"][i].peer_id  # type: ignore[index,no-any-return]


@pytest.mark.parametrize("mode", ["noise", "equivocate", "receipt"])
def test_a_liar_is_caught_on_its_first_step_convicted_and_routed_around(tmp_path: Path, mode: str) -> None:
    """Blocks 2-3: the liar and two honest spares (a third provider to settle the vote); the
    other spans have a spare each, so every hop can be checked."""
    liar = _liar(mode)
    r = trio.run(_swarm_run, tmp_path, [((0, 2), SETTINGS), ((2, 4), liar), ((2, 4), SETTINGS), ((2, 4), SETTINGS),
                                        ((4, 6), SETTINGS), ((0, 2), SETTINGS), ((4, 6), SETTINGS)])
    bad = _peer(r, 1)
    report = r["report"]
    assert bad in r["convicted"]  # type: ignore[operator]
    assert bad not in r["route"]  # type: ignore[operator]
    assert [c["peer"] for c in report.convicted] == [str(bad)]  # type: ignore[attr-defined]
    # caught on its first step (step 0): equivocation and a lying receipt by the receipts,
    # noise by the forced check of the first step through an unchecked worker
    assert report.convicted[0]["first_bad_step"] == 0  # type: ignore[attr-defined]
    entry = r["blocklist"].entries()[bad]  # type: ignore[attr-defined]
    assert entry.evidence and Path(entry.evidence).exists()
    ev = json.loads(Path(entry.evidence).read_text())
    assert ev["peer"] == str(bad) and ev["receipts"]
    assert not report.unverified  # type: ignore[attr-defined]


def test_with_only_two_providers_a_disagreement_bans_nobody_and_marks_the_answer_unverified(tmp_path: Path) -> None:
    r = trio.run(functools.partial(_swarm_run, tmp_path, [((0, 2), SETTINGS), ((2, 4), _liar("noise")),
                                                          ((2, 4), SETTINGS), ((4, 6), SETTINGS)],
                                   verify="sample", honest_answer=False))
    report = r["report"]
    assert report.mismatches >= 1  # type: ignore[attr-defined]
    assert r["convicted"] == {}
    assert report.disagreements and report.unverified  # type: ignore[attr-defined]
    assert r["blocklist"].entries() == {}  # type: ignore[attr-defined]


def test_honest_workers_are_never_flagged_with_every_hop_step_checked(tmp_path: Path) -> None:
    r = trio.run(functools.partial(_swarm_run, tmp_path, [((0, 2), SETTINGS), ((0, 2), SETTINGS), ((2, 4), SETTINGS),
                                                          ((2, 4), SETTINGS), ((4, 6), SETTINGS), ((4, 6), SETTINGS)],
                                   verify="all"))
    report = r["report"]
    assert report.checks == 3 * STEPS and report.mismatches == 0  # type: ignore[attr-defined]
    assert r["convicted"] == {} and not report.unverified  # type: ignore[attr-defined]
    assert report.receipts_checked == 3 * STEPS  # type: ignore[attr-defined]


def test_verify_off_sends_no_receipts_and_checks_nothing(tmp_path: Path) -> None:
    r = trio.run(functools.partial(_swarm_run, tmp_path, [((0, 2), SETTINGS), ((2, 4), SETTINGS), ((4, 6), SETTINGS)],
                                   verify="off"))
    report = r["report"]
    assert report.checks == 0 and report.receipts_checked == 0  # type: ignore[attr-defined]
    assert sum(w.service.counters.get("receipts_signed", 0) for w in r["workers"]) == 0  # type: ignore[attr-defined]


def test_a_hop_nobody_can_check_costs_no_gathering(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One provider per span: every step's check finds no checker. It must say so without
    first gathering the hop's stored inputs (that work grows with the session: a long session
    slowed down step after step), and the answer is marked unverified."""
    from pymesh.client import verify

    gathered: list[int] = []
    real = verify.Verifier._boundary

    async def counting(self: verify.Verifier, boundary: int, steps: "range | list[int]") -> object:
        gathered.append(len(steps))
        return await real(self, boundary, steps)

    monkeypatch.setattr(verify.Verifier, "_boundary", counting)
    r = trio.run(functools.partial(_swarm_run, tmp_path, [((0, 2), SETTINGS), ((2, 4), SETTINGS), ((4, 6), SETTINGS)],
                                   verify="sample"))
    report = r["report"]
    assert gathered == [], f"stored tensors gathered for checks nobody could run: {gathered}"
    assert report.checks == 0 and report.unverified  # type: ignore[attr-defined]
