"""The lying worker (PYMESH_TEST_FAULTS + PYMESH_TEST_CORRUPT): each corruption mode does what
it says, seeded; p=0 never lies; nothing without test_faults. In-process, virtual clock."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
import trio

from pymesh.model.blobs import blob_to_tensor, tensor_to_blob
from pymesh.proto import session_wire as wire
from pymesh.proto.receipts import conflicting, tensor_digest
from pymesh.proto.session_wire import ErrorCode
from pymesh.settings import WorkerSettings
from pymesh.worker.faults import Corruptor
from tests.worker.harness import Directory, MemNet, blob, receipt_of, receipt_route, run, step

pytestmark = pytest.mark.timeout(60)
SID = b"r" * 16


async def _one_step(mode: str, nursery: trio.Nursery, n_items: int) -> tuple[Any, Any, Any, Any]:
    net, directory = MemNet(nursery), Directory()
    w1, w2, client, inbox = await receipt_route(net, directory, w1_kwargs={"corruptor": Corruptor(1.0, mode, 7)})
    c1 = await net.connect(client, w1.peer)
    await c1.push(wire.STEP, step(SID, 0, 0), [blob(1.5, seq=2)])
    await inbox.wait(n_items)
    await trio.sleep(1)
    return w1, w2, inbox, blob(1.5, seq=2)


def test_noise_lies_consistently_its_receipts_match_its_bad_tensors() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            w1, w2, inbox, x = await _one_step("noise", nursery, 2)
            assert not inbox.errors()
            (o1, t1), = inbox.outs_of(0)
            (o2, _), = inbox.outs_of(2)
            r1 = receipt_of(o1.rc).receipt
            assert not torch.equal(blob_to_tensor(t1[0]), blob_to_tensor(x))  # echo: honest output == input
            assert r1.out == tensor_digest(t1[0]) and r1.inp == tensor_digest(x)
            # The next hop got the same noisy tensor, with the same receipt, and accepted it.
            assert o2.prc == o1.rc and receipt_of(o2.rc).receipt.inp == r1.out
            assert w1.counters["corrupted"] == 1 and w2.counters["bad_receipts"] == 0
            nursery.cancel_scope.cancel()

    run(main)


def test_equivocate_sends_two_valid_receipts_for_one_step() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            w1, w2, inbox, x = await _one_step("equivocate", nursery, 2)
            assert not inbox.errors()
            (o1, t1), = inbox.outs_of(0)
            (o2, _), = inbox.outs_of(2)
            assert torch.equal(blob_to_tensor(t1[0]), blob_to_tensor(x))  # the client's copy is honest
            mine, theirs = receipt_of(o1.rc), receipt_of(o2.prc)   # both verify under w1's key
            assert mine.receipt.out == tensor_digest(t1[0])
            assert mine.receipt.peer == theirs.receipt.peer == w1.peer
            assert mine.wire != theirs.wire and conflicting(mine.receipt, theirs.receipt)
            assert receipt_of(o2.rc).receipt.inp == theirs.receipt.out != mine.receipt.out
            assert w1.counters["receipts_signed"] == 2 and w2.counters["steps"] == 1
            nursery.cancel_scope.cancel()

    run(main)


def test_receipt_mode_signs_a_wrong_digest_and_the_next_hop_refuses_it() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            w1, w2, inbox, x = await _one_step("receipt", nursery, 2)
            (o1, t1), = inbox.outs_of(0)
            assert torch.equal(blob_to_tensor(t1[0]), blob_to_tensor(x))  # honest tensor
            assert receipt_of(o1.rc).receipt.out != tensor_digest(t1[0])         # lying receipt
            err, = inbox.errors()
            assert err.code == ErrorCode.BAD_RECEIPT and err.blame == w1.peer and "digest" in err.msg
            assert w2.counters["steps"] == 0 and w2.counters["bad_receipts"] == 1
            nursery.cancel_scope.cancel()

    run(main)


def test_equivocating_last_hop_and_forward_lie_with_noise() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            net, directory = MemNet(nursery), Directory()
            w = await net.worker(0, 4, directory, corruptor=Corruptor(1.0, "equivocate", 3))
            client, inbox = await net.client()
            c = await net.connect(client, w.peer)
            await c.call(wire.OPEN, wire.Open(SID, 16, receipts=True).to_meta())
            await c.push(wire.STEP, step(SID, 0, 0), [blob(2.0)])
            await inbox.wait(1)
            (o, t), = inbox.outs_of(0)
            assert o.final and not torch.equal(blob_to_tensor(t[0]), blob_to_tensor(blob(2.0)))
            assert receipt_of(o.rc).receipt.out == tensor_digest(t[0])
            reply, outs = await c.call(wire.FORWARD, wire.Forward(SID, 1, 1).to_meta(), [blob(2.0)])
            assert not torch.equal(blob_to_tensor(outs[0]), blob_to_tensor(blob(2.0)))
            assert receipt_of(wire.ForwardReply.from_meta_untrusted(reply).rc).receipt.out == tensor_digest(outs[0])
            assert w.counters["corrupted"] == 2
            nursery.cancel_scope.cancel()

    run(main)


def test_decisions_are_seeded_and_follow_p() -> None:
    a, b = Corruptor(0.3, "noise", 5), Corruptor(0.3, "noise", 5)
    da, db = [a.decide() for _ in range(2000)], [b.decide() for _ in range(2000)]
    assert da == db and 450 < a.lies < 750 and set(da) == {None, "noise"}
    never = Corruptor(0.0, "noise", 5)
    assert all(never.decide() is None for _ in range(2000)) and never.lies == 0
    assert all(Corruptor(1.0, "receipt", 1).decide() == "receipt" for _ in range(50))


def test_noise_is_half_the_rms_and_keeps_dtype_and_shape() -> None:
    x = torch.randn(1, 8, 512, generator=torch.Generator().manual_seed(0)) * 3
    for dtype in (torch.float32, torch.bfloat16):
        b = tensor_to_blob(x.to(dtype))
        y = blob_to_tensor(Corruptor(1.0, "noise", 2).noisy(b))
        assert y.dtype == dtype and y.shape == x.shape
        ratio = float((y.float() - x.to(dtype).float()).pow(2).mean().sqrt() / x.pow(2).mean().sqrt())
        assert 0.4 < ratio < 0.6, ratio
    zeros = tensor_to_blob(torch.zeros(1, 1, 16))
    assert not torch.equal(blob_to_tensor(Corruptor(1.0, "noise", 2).noisy(zeros)), torch.zeros(1, 1, 16))
    c1, c2 = Corruptor(1.0, "noise", 9), Corruptor(1.0, "noise", 9)
    assert torch.equal(blob_to_tensor(c1.noisy(zeros)), blob_to_tensor(c2.noisy(zeros)))


def test_faults_are_inactive_without_test_faults(caplog: pytest.LogCaptureFixture) -> None:
    assert Corruptor.from_settings(WorkerSettings(test_corrupt=1.0)) is None
    assert Corruptor.from_settings(WorkerSettings(test_faults=True)) is None   # p = 0: nothing to do
    with caplog.at_level(logging.WARNING, logger="pymesh.worker.faults"):
        c = Corruptor.from_settings(WorkerSettings(test_faults=True, test_corrupt=0.5,
                                                   test_corrupt_mode="equivocate", test_corrupt_seed=4))
    assert c is not None and (c.p, c.mode, c.seed) == (0.5, "equivocate", 4)
    assert any("on purpose" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError):
        Corruptor(1.5, "noise")
    with pytest.raises(ValueError):
        Corruptor(0.5, "silence")

