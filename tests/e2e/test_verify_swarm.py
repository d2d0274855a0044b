"""Verified inference across real processes: a `pymesh worker` started to lie on purpose
(PYMESH_TEST_FAULTS=1 PYMESH_TEST_CORRUPT=1: noise on every output) among honest workers of
the same span, met by the `pymesh client` CLI.

Tiny 4-block Llama: block 0 served once, 1-2 three times, 3 twice. The liar (1-2) announces by
far the highest throughput (PYMESH_THROUGHPUT), so routing picks it; of the honest two, one is
clearly the cheaper (the checker) and the other the referee. The liar sits mid-route, so the
last hop (and its checker, at the first step's check) sees its output before it is convicted.
The tests run in file order:

1. with verification off the liar's noise reaches the answer (the fault is real);
2. with the default (sample) the liar is checked before its first output is used, convicted
   by the third provider, routed around, the answer equals the single-process one, and the
   client's blocklist keeps it with its evidence;
3. a later client with that blocklist never routes through it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.swarm.conftest import LocalProcs, assert_same_tokens, reference_run, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PROMPT = "The old lighthouse keeper wrote"
N = 12


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("verify-tiny4"), num_hidden_layers=4, name="vtiny4", seed=11)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory, tiny4: Path) -> Iterator[LocalProcs]:
    procs = LocalProcs(tmp_path_factory.mktemp("e2e-verify"))
    try:
        procs.start_bootstrap()
        model = ["--model-path", str(tiny4)]
        head = procs.start_worker("--layers", "0", *model, name="v0")
        tails = [procs.start_worker("--layers", "3", *model, name=f"v3-{i}") for i in range(2)]
        # announced tokens/s for the span: liar 100000 (cost ~0), checker 20 (25 ms per
        # block), referee 5 (100 ms per block): loopback RTT noise cannot reorder them
        liar = procs.start_worker("--layers", "1-2", *model, name="v12-liar", PYMESH_TEST_FAULTS="1",
                                  PYMESH_TEST_CORRUPT="1", PYMESH_TEST_CORRUPT_SEED="3", PYMESH_THROUGHPUT="100000")
        checker = procs.start_worker("--layers", "1-2", *model, name="v12-checker", PYMESH_THROUGHPUT="20")
        referee = procs.start_worker("--layers", "1-2", *model, name="v12-referee", PYMESH_THROUGHPUT="5")
        wait_ready([head, liar, checker, referee, *tails], timeout=120)
        procs.head, procs.liar, procs.honest = head, liar, [checker, referee]  # type: ignore[attr-defined]
        procs.blocklist = procs.root / "blocklist.json"  # type: ignore[attr-defined]
        yield procs
    finally:
        procs.stop_all()


def _hop12(out: dict[str, Any]) -> str:
    return next(h["peer"] for h in out["route"] if h["start"] == 1)


def test_the_liar_corrupts_the_answer_when_nobody_checks(swarm: Any, tiny4: Path) -> None:
    ref, _ = reference_run(tiny4, PROMPT, N)
    out = swarm.client_json("--model-path", str(tiny4), "--prompt", PROMPT, "--max-tokens", str(N),
                            "--verify", "off", "--blocklist", "none")
    assert _hop12(out) == swarm.liar.peer_id, "routing should prefer the liar (it announces the most throughput)"
    assert out["tokens"] != ref, "the liar's noise did not change the answer: the test proves nothing"
    assert out["verification"]["checks"] == 0 and out["convicted"] == {}


def test_the_liar_is_checked_before_use_convicted_and_blocklisted(swarm: Any, tiny4: Path) -> None:
    from pymesh.client.blocklist import read_evidence

    ref, gaps = reference_run(tiny4, PROMPT, N)
    res = swarm.client("--model-path", str(tiny4), "--prompt", PROMPT, "--max-tokens", str(N), "--json",
                       "--blocklist", str(swarm.blocklist))
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert_same_tokens(out["tokens"], ref, gaps, "answer after the liar was convicted")
    assert "recomputed" not in res.stderr, "the liar's output was used before its check"
    v = out["verification"]
    assert v["mode"] == "sample" and v["checks"] >= 1 and v["mismatches"] >= 1, v
    assert [c["peer"] for c in v["convicted"]] == [swarm.liar.peer_id], v
    assert v["disagreements"] == [], "honest workers disagreed (a checker kept state computed from the liar's output?)"
    assert list(out["convicted"]) == [swarm.liar.peer_id]
    assert _hop12(out) in {w.peer_id for w in swarm.honest}
    assert v["recomputed"] == []
    # the blocklist names it, with evidence anyone can re-run
    ls = subprocess.run([sys.executable, "-m", "pymesh", "blocklist", "--blocklist", str(swarm.blocklist), "list",
                         "--json"], capture_output=True, text=True, timeout=60, env=swarm.env)
    assert ls.returncode == 0, ls.stderr
    entries = json.loads(ls.stdout)
    assert [e["peer"] for e in entries] == [swarm.liar.peer_id], entries
    ev = read_evidence(Path(entries[0]["evidence"]))
    assert ev.peer.to_text() == swarm.liar.peer_id and ev.tensors, ev.why


def test_a_later_client_with_the_blocklist_never_routes_through_the_liar(swarm: Any, tiny4: Path) -> None:
    ref, gaps = reference_run(tiny4, PROMPT, N)
    out = swarm.client_json("--model-path", str(tiny4), "--prompt", PROMPT, "--max-tokens", str(N),
                            "--blocklist", str(swarm.blocklist))
    assert_same_tokens(out["tokens"], ref, gaps, "answer of a client that blocklisted the liar")
    assert _hop12(out) != swarm.liar.peer_id
    assert out["convicted"] == {} and out["verification"]["mismatches"] == 0, out["verification"]
