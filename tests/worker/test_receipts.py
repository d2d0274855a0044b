"""Worker receipts (sessions opened with ``rcpt``): signed per step, chained hop to hop, sent
to the client every step; a pushed step whose receipt is missing, forged or does not match
is refused uncomputed, blaming the pusher. In-process echo workers, virtual clock."""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from pymesh.proto import session_wire as wire
from pymesh.proto.identity import Identity
from pymesh.proto.receipts import Receipt, SignedReceipt, sign_receipt, tensor_digest
from pymesh.proto.session_wire import ErrorCode
from pymesh.worker.receipts import BadReceipt, StepClaim, check_received, compute_dtype, device_kind
from tests.worker.harness import Directory, MemNet, blob, open_meta, receipt_of, receipt_route, run, step

pytestmark = pytest.mark.timeout(60)
SID = b"r" * 16


def test_receipts_are_signed_every_step_and_chained_hop_to_hop() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            net, directory = MemNet(nursery), Directory()
            w1, w2, client, inbox = await receipt_route(net, directory, copies=2)
            c1 = await net.connect(client, w1.peer)
            inputs = [blob(1.0), blob(2.0, seq=3)]
            await c1.push(wire.STEP, step(SID, 0, 0), [inputs[0]])
            await c1.push(wire.STEP, step(SID, 1, 1), [inputs[1]])
            await inbox.wait(4)
            assert not inbox.errors()
            hop1, hop2 = inbox.outs_of(0), inbox.outs_of(2)
            # The first hop sends a pm.out every step; its recovery copies still batch (copies=2).
            assert [o.steps for o, _ in hop1] == [(), (0, 1)] and len(hop1[1][1]) == 2
            assert [o.steps for o, _ in hop2] == [(0,), (1,)]
            copies = hop1[1][1]
            for k in (0, 1):
                (o1, _), (o2, t2) = hop1[k], hop2[k]
                r1, s1 = receipt_of(o1.rc).receipt, receipt_of(o1.rc)
                r2 = receipt_of(o2.rc).receipt
                assert o1.prc is None and r1.prev == b"" and r1.peer == w1.peer
                assert (r1.sid, r1.step, r1.start, r1.stop, r1.model) == (SID, k, 0, 2, "echo")
                assert (r1.dtype, r1.device, r1.seq) == ("float32", "cpu", inputs[k].shape[1])
                assert r1.inp == tensor_digest(inputs[k]) and r1.out == tensor_digest(copies[k])
                # Hop 2 names what it received: hop 1's receipt (prc, prev) and its output (inp).
                assert o2.prc == o1.rc and r2.prev == s1.digest and r2.inp == r1.out
                assert r2.peer == w2.peer and (r2.start, r2.stop) == (2, 4) and r2.out == tensor_digest(t2[0])
            assert w1.counters["receipts_signed"] == 2 and w2.counters["receipts_signed"] == 2
            assert w2.counters["bad_receipts"] == 0
            nursery.cancel_scope.cancel()

    run(main)


def test_sessions_without_receipts_sign_nothing_and_batch_copies_as_before() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            net, directory = MemNet(nursery), Directory()
            w1, w2, client, inbox = await receipt_route(net, directory, copies=2, receipts=False)
            c1 = await net.connect(client, w1.peer)
            for k in range(3):
                await c1.push(wire.STEP, step(SID, k, k), [blob(float(k + 1))])
            await inbox.wait(4)
            await trio.sleep(1)
            assert [o.steps for o, _ in inbox.outs_of(0)] == [(0, 1)]
            assert all(o.rc is None and o.prc is None for o in inbox.outs())
            assert w1.counters["receipts_signed"] == w2.counters["receipts_signed"] == 0
            # pm.forward replies an empty meta, as the old Empty did.
            reply, outs = await c1.call(wire.FORWARD, wire.Forward(SID, 2, 2).to_meta(), [blob(3.0)])
            assert reply == {} and len(outs) == 1
            nursery.cancel_scope.cancel()

    run(main)


def test_forward_on_a_receipt_session_replies_with_a_receipt() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            net, directory = MemNet(nursery), Directory()
            w1, _w2, client, inbox = await receipt_route(net, directory)
            c1 = await net.connect(client, w1.peer)
            reply, outs = await c1.call(wire.FORWARD, wire.Forward(SID, 0, 0).to_meta(), [blob(4.0, seq=2)])
            r = receipt_of(wire.ForwardReply.from_meta_untrusted(reply).rc).receipt
            assert (r.peer, r.step, r.pos, r.seq, r.prev) == (w1.peer, 0, 0, 2, b"")
            assert r.inp == tensor_digest(blob(4.0, seq=2)) and r.out == tensor_digest(outs[0])
            nursery.cancel_scope.cancel()

    run(main)


def test_receipts_are_refused_by_a_worker_without_a_signer() -> None:
    async def main() -> None:
        from pymesh.net.rpc import RemoteError

        async with trio.open_nursery() as nursery:
            net, directory = MemNet(nursery), Directory()
            w = await net.worker(0, 2, directory, signer=None)
            client, _ = await net.client()
            c = await net.connect(client, w.peer)
            with pytest.raises(RemoteError, match="cannot sign receipts"):
                await c.call(wire.OPEN, open_meta(SID, 8, receipts=True))
            await c.call(wire.OPEN, open_meta(SID, 8))
            with pytest.raises(ValueError, match="own identity"):
                await net.worker(0, 2, directory, signer=Identity.generate())
            nursery.cancel_scope.cancel()

    run(main)


def _signed(ident: Identity, *, peer: Any = None, step: int = 0, stop: int = 2, model: str = "echo",
            out: bytes | None = None, x: Any = None) -> bytes:
    x = x if x is not None else blob(1.0)
    r = Receipt(peer or ident.peer_id, model, SID, step, 0, 1, 0, stop, "float32", "cpu", b"\0" * 32,
                out if out is not None else tensor_digest(x))
    if peer is not None and peer != ident.peer_id:  # a body naming another peer, signed with our key
        body = r.encode()
        return SignedReceipt(r, body, ident.sign(b"pymesh-receipt-v1\0" + body)).wire
    return sign_receipt(ident, r).wire


def test_bad_receipts_are_refused_uncomputed_blaming_the_pusher() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            net, directory = MemNet(nursery), Directory()
            w2 = await net.worker(2, 4, directory)
            pusher = await net.node()
            client, inbox = await net.client()
            c2 = await net.connect(client, w2.peer)
            await c2.call(wire.OPEN, open_meta(SID, 32, prev=pusher.peer_id, receipts=True))
            p2 = await net.connect(pusher, w2.peer)
            me, other = pusher.identity, Identity.generate()
            bad = {
                "without": None,
                "invalid": b"not a receipt",
                "not by the pusher": _signed(other),
                "signature does not verify": _signed(other, peer=me.peer_id),
                "names step 1": _signed(me, step=1),
                "does not end": _signed(me, stop=3),
                "model": _signed(me, model="other-model"),
                "output digest": _signed(me, out=tensor_digest(blob(5.0))),
            }
            for n, (what, rc) in enumerate(bad.items(), 1):
                await p2.push(wire.STEP, step(SID, 0, 0, rc), [blob(1.0)])
                await inbox.wait(n)
                err = inbox.errors()[-1]
                assert err.code == ErrorCode.BAD_RECEIPT and err.blame == pusher.peer_id, err
                assert what in err.msg, (what, err.msg)
            assert w2.counters["steps"] == 0 and w2.counters["bad_receipts"] == len(bad)
            # A valid receipt: computed, and the client gets it back as prc.
            good = _signed(me)
            await p2.push(wire.STEP, step(SID, 0, 0, good), [blob(1.0)])
            await inbox.wait(len(bad) + 1)
            out = inbox.outs()[-1]
            assert out.prc == good and receipt_of(out.rc).receipt.prev == receipt_of(good).digest
            assert w2.counters["steps"] == 1
            nursery.cancel_scope.cancel()

    run(main)


def test_random_receipt_bytes_never_crash_the_worker() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            net, directory = MemNet(nursery), Directory()
            w2 = await net.worker(2, 4, directory)
            pusher = await net.node()
            client, inbox = await net.client()
            c2 = await net.connect(client, w2.peer)
            await c2.call(wire.OPEN, open_meta(SID, 32, prev=pusher.peer_id, receipts=True))
            p2 = await net.connect(pusher, w2.peer)
            rng, good = random.Random(12), _signed(pusher.identity)
            for _ in range(30):
                if rng.random() < 0.5:
                    raw = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 1000)))
                else:  # a valid receipt with one byte flipped
                    i = rng.randrange(len(good))
                    raw = good[:i] + bytes([good[i] ^ (1 << rng.randrange(8))]) + good[i + 1:]
                await p2.push(wire.STEP, step(SID, 0, 0, raw), [blob(1.0)])
            with trio.fail_after(30):
                while w2.counters["bad_receipts"] < 30:
                    await trio.sleep(0.1)
            await p2.push(wire.STEP, step(SID, 0, 0, good), [blob(1.0)])
            with trio.fail_after(30):
                while not inbox.outs():
                    await trio.sleep(0.1)
            assert w2.counters["steps"] == 1
            nursery.cancel_scope.cancel()

    run(main)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=1100))
def test_check_received_raises_only_bad_receipt(raw: bytes) -> None:
    claim = StepClaim("echo", SID, 0, 0, 1, 2, 4, "float32", "cpu")
    with pytest.raises(BadReceipt):
        check_received(raw, pusher=Identity.generate().peer_id, claim=claim, digest=tensor_digest(blob(1.0)))


def test_dtype_and_device_names() -> None:
    assert [compute_dtype(d) for d in ("bf16", "float32", "fp16")] == ["bfloat16", "float32", "float16"]
    assert device_kind("cuda:1") == "cuda" and device_kind("cpu") == "cpu"
    with pytest.raises(ValueError):
        compute_dtype("int8")


def test_big_tensors_are_hashed_in_a_thread_to_the_same_digest() -> None:
    import torch

    from pymesh.model.blobs import tensor_to_blob
    from pymesh.worker.receipts import THREAD_DIGEST_BYTES, digest_of

    big = tensor_to_blob(torch.ones(1, THREAD_DIGEST_BYTES // 4 // 64 + 1, 64))
    assert len(big.data) >= THREAD_DIGEST_BYTES
    assert trio.run(digest_of, big) == tensor_digest(big)
    assert trio.run(digest_of, blob(1.0)) == tensor_digest(blob(1.0))


def test_receipt_counters_are_exported_as_metrics() -> None:
    from types import SimpleNamespace

    from pymesh.worker.metrics import WorkerCollector

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            net, directory = MemNet(nursery), Directory()
            w1, w2, client, inbox = await receipt_route(net, directory)
            c1 = await net.connect(client, w1.peer)
            await c1.push(wire.STEP, step(SID, 0, 0), [blob(1.0)])
            await inbox.wait(2)
            collector = WorkerCollector(SimpleNamespace(_service=w2))  # type: ignore[arg-type]
            families = list(collector.collect())
            values = {m.name: m.samples[0].value for m in families}
            assert values["pymesh_worker_receipts_signed"] == 1
            rows = next(m for m in families if m.name == "pymesh_worker_forward_rows")
            samples = {(x.name, x.labels.get("le")): x.value for x in rows.samples}
            assert samples[("pymesh_worker_forward_rows_count", None)] == 1       # one forward, one row
            assert samples[("pymesh_worker_forward_rows_bucket", "1")] == 1
            assert samples[("pymesh_worker_forward_rows_sum", None)] == 1
            assert values["pymesh_worker_bad_receipts"] == 0 and values["pymesh_worker_corrupted"] == 0
            nursery.cancel_scope.cancel()

    run(main)
