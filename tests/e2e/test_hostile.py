"""Hostile input at every network surface of a running swarm (real processes on loopback).

A tiny 3-block Llama: bootstrap + worker A (blocks 0-1) + worker B (block 2), both
transports. Each attack is followed by a check that the node still serves normally.
Heartbeats are slow here (30 s) so what an attacker leaves in a node's store stays
visible long enough to look at.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import trio

from tests.e2e.helpers import call as _call
from tests.e2e.helpers import generate_json, rss_kib, tcp_garbage, udp_garbage
from tests.e2e.helpers import with_rpc as _rpc
from tests.e2e.krpc_client import RawKRPC, record_fields
from tests.swarm.conftest import LocalProcs, free_port, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PROMPT = "A quiet harbour at dawn"


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("e2e-tiny3"), num_hidden_layers=3, name="e2etiny3", seed=11)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory, tiny3: Path) -> Iterator[LocalProcs]:
    procs = LocalProcs(tmp_path_factory.mktemp("e2e-hostile"), PYMESH_HEARTBEAT="30", PYMESH_RECORD_TTL="120",
                       PYMESH_STEP_TIMEOUT="8")
    try:
        procs.start_bootstrap()
        a = procs.start_worker("--layers", "0-1", "--model-path", str(tiny3), "--transport", "both",
                               "--cache-tokens", "2000", name="hostA")
        b = procs.start_worker("--layers", "2-2", "--model-path", str(tiny3), "--transport", "both", name="hostB")
        wait_ready([a, b], timeout=120)
        procs.workers = [a, b]  # type: ignore[attr-defined]
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def reference(tiny3: Path) -> list[int]:
    return generate_json(tiny3, PROMPT, 6)["tokens"]


def _serves(swarm: LocalProcs, tiny3: Path, reference: list[int], transport: str = "quic") -> None:
    for w in swarm.workers:  # type: ignore[attr-defined]
        assert w.alive(), f"{w.name} died:\n{w.text()[-3000:]}"
    assert swarm.procs[0].alive(), "the bootstrap died"
    out = swarm.client_json("--model-path", str(tiny3), "--prompt", PROMPT, "--max-tokens", "6",
                            "--transport", transport)
    assert out["tokens"] == reference


def _h(*shape: int, dtype: Any = None) -> Any:
    import torch

    from pymesh.model.blobs import tensor_to_blob

    return tensor_to_blob(torch.zeros(*shape, dtype=dtype or torch.float32))


def test_udp_garbage_at_every_port(swarm: LocalProcs, tiny3: Path, reference: list[int]) -> None:
    boot_port = int(swarm.bootstrap_addr.rsplit(":", 1)[1])
    ports = [boot_port]
    for w in swarm.workers:  # type: ignore[attr-defined]
        ports += [w.port, w.port + 1]  # QUIC, DHT
    for p in ports:
        assert udp_garbage(p, count=240, seed=p) > 200
    time.sleep(0.5)
    _serves(swarm, tiny3, reference)


def test_tcp_garbage_huge_lengths_and_idle_connections(swarm: LocalProcs, tiny3: Path, reference: list[int]) -> None:
    a = swarm.workers[0]  # type: ignore[attr-defined]
    payloads = [os.urandom(4096), b"\x16\x03\x01\xff\xff" + os.urandom(2000), b"\xff" * 64,
                (2**31 - 1).to_bytes(4, "big") * 8, b"\x00" * 16, os.urandom(1 << 20), b""]
    tcp_garbage(a.port, payloads)
    # 40 connections that never say anything, held open while a real client runs over TCP
    idle = [socket.create_connection(("127.0.0.1", a.port), timeout=5) for _ in range(40)]
    try:
        _serves(swarm, tiny3, reference, transport="tcp")
    finally:
        for s in idle:
            s.close()
    _serves(swarm, tiny3, reference, transport="tcp")


def test_silent_tcp_connections_are_closed(swarm: LocalProcs) -> None:
    """A peer that connects and never completes the handshake is cut within the
    handshake/idle timeout (10 s here), not held forever."""
    a = swarm.workers[0]  # type: ignore[attr-defined]
    socks = [socket.create_connection(("127.0.0.1", a.port), timeout=5) for _ in range(2)]
    socks[1].sendall(b"\x16\x03\x01\x00")  # the start of a TLS record, then silence
    t0 = time.monotonic()
    try:
        for s in socks:
            s.settimeout(max(1.0, 40 - (time.monotonic() - t0)))
            try:
                assert s.recv(100) == b""
            except ConnectionResetError:
                pass
    finally:
        for s in socks:
            s.close()
    assert time.monotonic() - t0 < 40


ABUSE = [
    ("pm.open", {}, "bad_request"),
    ("pm.open", {"sid": b"x", "max_tokens": 2**62}, "bad_request"),
    ("pm.open", {"sid": b"x", "max_tokens": 8, "batch": 2**31}, "bad_request"),
    ("pm.open", {"sid": b"x", "max_tokens": -1}, "bad_request"),
    ("pm.open", {"sid": 5, "max_tokens": 8}, "bad_request"),
    ("pm.open", {"sid": b"x" * 65, "max_tokens": 8}, "bad_request"),
    ("pm.open", {"sid": b"x", "max_tokens": b"8"}, "bad_request"),
    ("pm.open", {"sid": b"x", "max_tokens": 8, "model": "other@0123456789ab"}, "bad_request"),
    ("pm.open", {"sid": b"x", "max_tokens": 8, "start": 1, "stop": 2}, "refused"),
    ("pm.open", {"sid": b"x", "max_tokens": 1 << 20}, "refused"),
    ("pm.open", {"sid": b"x", "max_tokens": 8, "next": "not a dict"}, "bad_request"),
    ("pm.open", {"sid": b"x", "max_tokens": 8, "next": {"peer": b"a", "host": "h", "port": 1, "transport": "quic"}},
     "bad_request"),
    ("pm.open", {"sid": b"x", "max_tokens": 8, "next": {"peer": b"a" * 32, "host": "h", "port": 0,
                                                        "transport": "quic"}}, "bad_request"),
    ("pm.set_next", {"sid": b"nosuch"}, "not_found"),
    ("pm.close", {"sid": []}, "bad_request"),
    ("pm.stats", {"sid": 3}, "bad_request"),
    ("pm.nosuchmethod", {}, None),
]


def test_rpc_abuse_is_answered_and_worker_stays_up(swarm: LocalProcs, tiny3: Path, reference: list[int]) -> None:
    import torch

    a = swarm.workers[0]  # type: ignore[attr-defined]

    async def script(conn: Any) -> list[tuple[str, str, Any]]:
        got = [(m, want, await _call(conn, m, meta)) for m, meta, want in ABUSE]
        assert (await _call(conn, "pm.open", {"sid": b"s1", "max_tokens": 16}))[0] == "ok"
        hs = [({"sid": b"nosuch", "step": 0, "pos": 0}, [_h(1, 1, 64)], "not_found"),
              ({"sid": b"s1", "step": 0, "pos": 0}, [_h(1, 1, 100)], "bad_request"),   # wrong hidden size
              ({"sid": b"s1", "step": 0, "pos": 0}, [_h(1, 64)], "bad_request"),       # 2-D
              ({"sid": b"s1", "step": 0, "pos": 0}, [_h(1, 1, 1, 64)], "bad_request"), # 4-D
              ({"sid": b"s1", "step": 0, "pos": 0}, [_h(1, 17, 64)], "bad_request"),   # beyond max_tokens
              ({"sid": b"s1", "step": 0, "pos": 2**40}, [_h(1, 1, 64)], "bad_request"),
              ({"sid": b"s1", "step": -1, "pos": 0}, [_h(1, 1, 64)], "bad_request"),
              ({"sid": b"s1", "step": 0, "pos": 0}, [], "bad_request"),
              ({"sid": b"s1", "step": 0, "pos": 0}, [_h(1, 1, 64), _h(1, 1, 64)], "bad_request"),
              ({"sid": b"s1", "step": 0, "pos": 3}, [_h(1, 1, 64)], "bad_request"),   # wrong position
              ({"sid": b"s1", "step": 0, "pos": 0}, [_h(1, 2, 64)], "ok"),
              ({"sid": b"s1", "step": 0, "pos": 0}, [_h(1, 2, 64)], "ok"),             # a retry
              ({"sid": b"s1", "step": 1, "pos": 2}, [_h(1, 1, 64, dtype=torch.bfloat16)], "ok"),
              ({"sid": b"s1", "step": 0, "pos": 0}, [_h(1, 2, 64)], "bad_request")]    # stale
        for meta, tensors, want in hs:
            got.append(("pm.forward", want, await _call(conn, "pm.forward", meta, tensors)))
        got.append(("pm.close", "ok", await _call(conn, "pm.close", {"sid": b"s1"})))
        return got

    results = _rpc(a, script)
    for method, want, (code, msg) in results:
        if want is None:
            assert code != "ok", f"{method}: unknown method answered ok"
        else:
            assert code == want, f"{method}: expected {want}, got {code}: {msg}"
        if code != "ok":
            assert isinstance(msg, str) and msg, f"{method}: an error without a message"
    _serves(swarm, tiny3, reference)


def test_batch_mismatch_is_a_bad_request(swarm: LocalProcs) -> None:
    a = swarm.workers[0]  # type: ignore[attr-defined]

    async def script(conn: Any) -> tuple[str, Any]:
        assert (await _call(conn, "pm.open", {"sid": b"bm", "max_tokens": 8}))[0] == "ok"
        try:
            return await _call(conn, "pm.forward", {"sid": b"bm", "step": 0, "pos": 0}, [_h(3, 1, 64)])
        finally:
            await _call(conn, "pm.close", {"sid": b"bm"})

    code, msg = _rpc(a, script)
    assert code == "bad_request", (code, msg)


def test_failed_open_reserves_nothing(swarm: LocalProcs) -> None:
    """An open whose next hop cannot be used reserves no cache. The worker dials only what a
    verified record names: an unknown peer is ``next_unknown`` (the hinted address, a dead
    port, is never dialled), and the pre-issue-10 ``next`` shape is a ``bad_request``."""
    a = swarm.workers[0]  # type: ignore[attr-defined]
    dead = free_port()

    async def script(conn: Any) -> tuple[Any, Any, Any, Any]:
        before = (await _call(conn, "pm.info", {}))[1]
        hop = {"peer": b"a" * 32, "start": before["stop"], "stop": before["stop"] + 1,
               "hint": {"host": "127.0.0.1", "port": dead, "transport": "tcp"}}
        code, _ = await _call(conn, "pm.open", {"sid": b"leak", "max_tokens": 100, "next": hop})
        legacy = {"peer": b"a" * 32, "host": "127.0.0.1", "port": dead, "transport": "tcp"}
        code_legacy, _ = await _call(conn, "pm.open", {"sid": b"leak2", "max_tokens": 100, "next": legacy})
        after = (await _call(conn, "pm.info", {}))[1]
        await _call(conn, "pm.close", {"sid": b"leak"})
        return code, code_legacy, before, after

    code, code_legacy, before, after = _rpc(a, script)
    assert code == "next_unknown"
    assert code_legacy == "bad_request"
    assert (after["sessions"], after["free"]) == (before["sessions"], before["free"])


def test_pushed_garbage_steps_do_not_kill_the_worker(swarm: LocalProcs, tiny3: Path, reference: list[int]) -> None:
    import torch

    a = swarm.workers[0]  # type: ignore[attr-defined]

    async def script(conn: Any) -> Any:
        assert (await _call(conn, "pm.open", {"sid": b"p1", "max_tokens": 8}))[0] == "ok"
        bad = [({"sid": b"p1", "step": 0, "pos": 0}, [_h(3, 1, 64)]),
               ({"sid": b"p1", "step": 0, "pos": 0}, [_h(1, 1, 64, dtype=torch.int64)]),
               ({"sid": b"p1", "step": 0, "pos": 0}, [_h(1, 1, 64, dtype=torch.bool)]),
               ({"sid": b"p1", "step": 9, "pos": 0}, [_h(1, 1, 64)]),
               ({"sid": b"zz", "step": 0, "pos": 0}, [_h(1, 1, 64)]),
               ({"sid": 7}, []), ({}, [_h(1, 1, 64)])]
        for meta, tensors in bad:
            await conn.push("pm.step", meta, tensors)
        await conn.push("pm.err", {"sid": b"p1", "step": "x", "code": 5, "msg": b"\xff"}, [])
        await trio.sleep(2)
        code, info = await _call(conn, "pm.info", {})
        await _call(conn, "pm.close", {"sid": b"p1"})
        return code

    assert _rpc(a, script) == "ok"
    _serves(swarm, tiny3, reference)


@pytest.mark.timeout(300)
def test_thousands_of_sessions_memory_bounded(swarm: LocalProcs, tiny3: Path, reference: list[int]) -> None:
    """Worker A has a 2000-token budget: 700 opens of 4 tokens each overrun it (the rest
    are refused), everything is closed again (the budget is back where it was); three
    rounds must not grow its RSS without bound."""
    a = swarm.workers[0]  # type: ignore[attr-defined]
    rss: list[int] = []

    async def script(conn: Any) -> list[dict[str, int]]:
        rounds = []
        free = (await _call(conn, "pm.info", {}))[1]["free"]
        for r in range(3):
            codes: dict[str, int] = {}
            for i in range(700):
                code, _ = await _call(conn, "pm.open", {"sid": b"r%d-%d" % (r, i), "max_tokens": 4})
                codes[code] = codes.get(code, 0) + 1
            for i in range(700):
                await _call(conn, "pm.close", {"sid": b"r%d-%d" % (r, i)})
            rss.append(rss_kib(a.popen.pid))
            rounds.append(codes)
        info = (await _call(conn, "pm.info", {}))[1]
        rounds.append({"sessions": info["sessions"], "free": info["free"], "total": info["total"], "before": free})
        return rounds

    rounds = _rpc(a, script)
    for codes in rounds[:3]:
        assert codes.get("ok", 0) == rounds[3]["free"] // 4 and codes.get("refused", 0) == 700 - codes["ok"], codes
    final = rounds[3]
    assert final["free"] == final["before"] and final["free"] // 4 < 700, final
    assert rss[2] - rss[0] < 64 * 1024, f"RSS grew from {rss[0]} to {rss[2]} KiB over identical rounds"
    _serves(swarm, tiny3, reference)


# --- forged DHT records ------------------------------------------------------------------


def _boot(swarm: LocalProcs) -> RawKRPC:
    return RawKRPC("127.0.0.1", int(swarm.bootstrap_addr.rsplit(":", 1)[1]))


def test_forged_records_are_refused(swarm: LocalProcs, tiny3: Path, reference: list[int]) -> None:
    from pymesh.model.fingerprint import model_id
    from pymesh.proto import krpc
    from pymesh.proto.bencode import encode
    from pymesh.proto.identity import Identity
    from pymesh.proto.records import ALL_TARGET, WorkerRecord, model_target

    mid = model_id(tiny3)
    target = model_target(mid)
    with _boot(swarm) as dht:
        real = dht.records(target)
        assert len(real) == 2, f"expected the two workers' records, got {len(real)}"
        # (1) a real worker's record, one field changed, signature kept
        d = record_fields(real[0])
        d[b"p"] = 1
        d[b"ts"] = int(time.time() * 1000)
        r1 = dht.pm_put(target, encode(d))
        # (2) the same record re-signed by another key but still claiming the worker's peer key
        liar = Identity.generate()
        d2 = record_fields(real[0])
        d2[b"sig"] = liar.sign(b"whatever")
        r2 = dht.pm_put(target, encode(d2))
        # (3) a well-signed record of another protocol version
        r3 = dht.pm_put(target, WorkerRecord(version=99, model_id=mid, start=0, stop=3, host="127.0.0.1",
                                             port=9).signed(liar).to_bytes())
        # (4) a well-signed record stored under another model's target
        good = WorkerRecord(model_id=mid, start=0, stop=1, host="127.0.0.1", port=9, state="offline").signed(liar)
        r4 = dht.pm_put(model_target("other@000000000000"), good.to_bytes())
        # (5) a made-up write token
        r5 = dht.pm_put(target, good.to_bytes(), token=b"\x00" * 8)
        # (6) a record from the past (older than the TTL)
        old = WorkerRecord(model_id=mid, start=0, stop=1, host="127.0.0.1", port=9).signed(
            liar, timestamp=time.time() - 3600)
        r6 = dht.pm_put(target, old.to_bytes())
        # (7) not a record at all
        r7 = dht.pm_put(target, b"d1:v" + os.urandom(40))
        for i, r in enumerate([r1, r2, r3, r4, r5, r6, r7], 1):
            assert isinstance(r, krpc.ErrorReply), f"forgery {i} was not refused: {r}"
            assert r.message, f"forgery {i}: error reply without a message"
        assert "99" in r3.message and "1" in r3.message, r3.message
        assert r1.code == r2.code == krpc.INVALID_SIGNATURE
        assert sorted(dht.records(target)) == sorted(real)
        assert all(record_fields(r)[b"k"] != liar.peer_id.key for r in dht.records(ALL_TARGET))
    _serves(swarm, tiny3, reference)


@pytest.mark.parametrize("where", ["nobody", "impostor"])
def test_record_lying_about_its_address_is_routed_around(swarm: LocalProcs, tiny3: Path, reference: list[int],
                                                          where: str) -> None:
    """A validly signed record (the attacker's own key) claiming every block at an enormous
    speed, at an address where nobody listens or where a real worker with another key
    listens: the client tries it, bans it, and answers."""
    from pymesh.model.fingerprint import model_id
    from pymesh.proto import krpc
    from pymesh.proto.identity import Identity
    from pymesh.proto.records import WorkerRecord, model_target

    mid = model_id(tiny3)
    liar = Identity.generate()
    port = free_port() if where == "nobody" else swarm.workers[0].port  # type: ignore[attr-defined]
    rec = WorkerRecord(model_id=mid, start=0, stop=3, host="127.0.0.1", port=port, tokens_per_s=1e6,
                       block_ms=0.001, cache_tokens_free=10**6, cache_tokens_total=10**6).signed(liar)
    with _boot(swarm) as dht:
        got = dht.pm_put(model_target(mid), rec.to_bytes())
        assert isinstance(got, krpc.Response), got
    out = swarm.client_json("--model-path", str(tiny3), "--prompt", PROMPT, "--max-tokens", "6", timeout=150)
    assert out["tokens"] == reference
    assert all(h["peer"] != liar.peer_id.to_text() for h in out["route"])


def test_record_store_flood_does_not_evict_real_records(swarm: LocalProcs, tiny3: Path) -> None:
    from pymesh.model.fingerprint import model_id
    from pymesh.proto.identity import Identity
    from pymesh.proto.records import WorkerRecord, model_target

    target = model_target(model_id(tiny3))
    attacker = Identity.generate()
    with _boot(swarm) as dht:
        before = len(dht.records(target))
        assert before >= 2
        t0 = time.monotonic()
        for i in range(560):
            mid = f"junk{i}@000000000000"
            rec = WorkerRecord(model_id=mid, start=0, stop=1, host="127.0.0.1", port=9).signed(attacker)
            dht.pm_put(model_target(mid), rec.to_bytes())
            if i % 100 == 99:
                time.sleep(0.3)  # stay under the per-IP rate limit
        assert time.monotonic() - t0 < 60
        left = len(dht.records(target))
    assert left == before, f"after the flood the bootstrap holds {left} of the model's {before} records"
