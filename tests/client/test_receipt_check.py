"""The client's per-step receipt chain check: an honest chain passes; each kind of lie
convicts exactly the peer whose own signatures or tensors contradict it, never a neighbour."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pymesh.client.receipt_check import Hop, HopReceipts, StepFacts, check_step, copy_finding, parse_hop_untrusted
from pymesh.proto.identity import Identity
from pymesh.proto.receipts import Receipt, SignedReceipt, sign_receipt

IDS = [Identity.from_seed(bytes([i + 1]) * 32) for i in range(4)]
SPANS = [(0, 2), (2, 4), (4, 6)]
FACTS = StepFacts("m@abc", b"s" * 16, 3, 7, 1)
INPUT = b"\x01" * 32


def d(n: int) -> bytes:
    return bytes([n]) * 32


def chain(outs: list[bytes] | None = None, *, lie_to_client: int | None = None) -> tuple[list[Hop], dict[int, HopReceipts]]:
    """An honest chain (hop i outputs d(10+i)); ``lie_to_client``: that hop sends the client a
    receipt for another output than the one it pushed on (signed both)."""
    outs = outs or [d(10 + i) for i in range(3)]
    route = [Hop(IDS[i].peer_id, a, b) for i, (a, b) in enumerate(SPANS)]
    got: dict[int, HopReceipts] = {}
    pushed: SignedReceipt | None = None
    for i, (a, b) in enumerate(SPANS):
        inp = INPUT if pushed is None else pushed.receipt.out
        r = Receipt(IDS[i].peer_id, FACTS.model, FACTS.sid, FACTS.step, FACTS.pos, FACTS.seq, a, b, "float32", "cpu",
                    inp, outs[i], pushed.digest if pushed is not None else b"")
        signed = sign_receipt(IDS[i], r)
        to_client = signed
        if lie_to_client == i:
            to_client = sign_receipt(IDS[i], Receipt(**{**r.__dict__, "out": d(99)}))
        got[a] = HopReceipts(to_client, pushed)
        pushed = signed
    return route, got


def test_an_honest_chain_passes() -> None:
    route, got = chain()
    assert check_step(FACTS, route, got, INPUT, d(12)) is None


def test_equivocation_convicts_the_signer_of_both_receipts() -> None:
    route, got = chain(lie_to_client=1)
    f = check_step(FACTS, route, got, INPUT, d(12))
    assert f is not None and f.peer == IDS[1].peer_id and f.kind == "equivocation"
    assert len(f.receipts) == 2 and f.receipts[0] != f.receipts[1]


def test_a_result_other_than_the_receipt_names_convicts_the_last_hop() -> None:
    route, got = chain()
    f = check_step(FACTS, route, got, INPUT, d(77))
    assert f is not None and f.peer == IDS[2].peer_id and f.kind == "receipt_mismatch"


def test_a_first_hop_signing_for_another_input_is_convicted() -> None:
    route, got = chain()
    f = check_step(FACTS, route, got, d(5), d(12))
    assert f is not None and f.peer == IDS[0].peer_id


def test_a_hop_that_computed_on_something_else_than_it_was_pushed_is_convicted() -> None:
    route, got = chain()
    h = got[2]
    r = h.rc.receipt
    forged = sign_receipt(IDS[1], Receipt(**{**r.__dict__, "inp": d(55)}))
    got[2] = HopReceipts(forged, h.prc)
    f = check_step(FACTS, route, got, INPUT, d(12))
    assert f is not None and f.peer == IDS[1].peer_id and f.kind == "receipt_mismatch"


def test_a_receipt_for_another_step_or_span_convicts_its_signer() -> None:
    route, got = chain()
    h = got[4]
    r = h.rc.receipt
    got[4] = HopReceipts(sign_receipt(IDS[2], Receipt(**{**r.__dict__, "step": 2})), h.prc)
    f = check_step(FACTS, route, got, INPUT, d(12))
    assert f is not None and f.peer == IDS[2].peer_id and "step" in f.why


def test_a_hop_cannot_pass_off_a_stranger_receipt_as_its_predecessors() -> None:
    route, got = chain()
    h = got[2]
    stranger = sign_receipt(IDS[3], Receipt(**{**got[0].rc.receipt.__dict__, "peer": IDS[3].peer_id}))
    got[2] = HopReceipts(h.rc, stranger)
    f = check_step(FACTS, route, got, INPUT, d(12))
    assert f is not None and f.peer == IDS[1].peer_id and f.kind == "bad_receipt"


def _bad_signature(s: SignedReceipt) -> SignedReceipt:
    sig = bytearray(s.sig)
    sig[5] ^= 1
    return SignedReceipt(s.receipt, s.body, bytes(sig))


def test_parse_convicts_the_sender_of_a_missing_malformed_or_foreign_receipt() -> None:
    route, got = chain()
    me = IDS[0].peer_id
    assert parse_hop_untrusted(me, None, None).kind == "bad_receipt"  # type: ignore[union-attr]
    assert parse_hop_untrusted(me, got[0].rc.wire[:-4], None).kind == "bad_receipt"  # type: ignore[union-attr]
    assert parse_hop_untrusted(IDS[1].peer_id, got[0].rc.wire, None).kind == "bad_receipt"  # type: ignore[union-attr]
    ok = parse_hop_untrusted(me, got[0].rc.wire, None)
    assert isinstance(ok, HopReceipts)


def test_a_cited_receipt_whose_signature_fails_convicts_the_peer_that_delivered_it() -> None:
    """Signatures are checked when a receipt becomes evidence: the honest path parses them
    unverified (they came over their senders' links), a finding verifies what it cites."""
    route, got = chain()
    bad_own = _bad_signature(got[4].rc)
    prc = got[4].prc
    assert prc is not None and isinstance(parse_hop_untrusted(IDS[2].peer_id, bad_own.wire, prc.wire), HopReceipts)
    # the last hop's result disagrees with its receipt, whose signature is bad: still that hop
    got[4] = HopReceipts(bad_own, got[4].prc)
    f = check_step(FACTS, route, got, INPUT, d(77))
    assert f is not None and f.peer == IDS[2].peer_id and f.kind == "bad_receipt" and "signature" in f.why
    # an honest chain whose receipts all verify stays sound
    route, got = chain()
    assert check_step(FACTS, route, got, INPUT, d(12)) is None


def test_an_honest_step_checks_no_signature(monkeypatch: object) -> None:
    import pytest

    from pymesh.proto import receipts as proto_receipts

    from pymesh.proto.identity import verify_signature

    calls: list[bytes] = []

    def counting(key: bytes, sig: bytes, msg: bytes) -> bool:
        calls.append(msg)
        return verify_signature(key, sig, msg)

    mp = pytest.MonkeyPatch()
    mp.setattr(proto_receipts, "verify_signature", counting)
    try:
        route, got = chain()
        parsed = []
        for o in route:
            prc = got[o.start].prc
            parsed.append(parse_hop_untrusted(o.peer, got[o.start].rc.wire, prc.wire if prc is not None else None))
        assert all(isinstance(p, HopReceipts) for p in parsed)
        hops = {o.start: p for o, p in zip(route, parsed) if isinstance(p, HopReceipts)}
        assert len(hops) == 3 and check_step(FACTS, route, hops, INPUT, d(12)) is None
        assert calls == []
        route, got = chain(lie_to_client=1)          # a finding verifies what it cites, once each
        f = check_step(FACTS, route, got, INPUT, d(12))
        assert f is not None and f.kind == "equivocation" and len(calls) == 2
        assert check_step(FACTS, route, got, INPUT, d(12)) == f and len(calls) == 2
    finally:
        mp.undo()


def test_a_hop_cannot_frame_its_predecessor_with_a_forged_receipt() -> None:
    route, got = chain()
    h = got[2]
    assert h.prc is not None
    # hop 2 passes on "its predecessor's receipt" for another output, with a signature it could not make
    fake = _bad_signature(SignedReceipt(Receipt(**{**h.prc.receipt.__dict__, "out": d(66)}),
                                        Receipt(**{**h.prc.receipt.__dict__, "out": d(66)}).encode(), h.prc.sig))
    mine = sign_receipt(IDS[1], Receipt(**{**h.rc.receipt.__dict__, "inp": d(66), "prev": fake.digest}))
    got[2] = HopReceipts(mine, fake)
    f = check_step(FACTS, route, got, INPUT, d(12))
    assert f is not None and f.peer == IDS[1].peer_id and f.kind == "bad_receipt"
    # the predecessor sent the client a receipt with a bad signature: it is convicted, not its successor
    route, got = chain()
    got[0] = HopReceipts(_bad_signature(got[0].rc), None)
    f = check_step(FACTS, route, got, INPUT, d(12))
    assert f is not None and f.peer == IDS[0].peer_id and f.kind == "bad_receipt"


def test_a_copy_that_is_not_what_the_receipt_named_convicts_its_sender() -> None:
    route, got = chain()
    assert copy_finding(IDS[0].peer_id, 3, got[0].rc, d(10)) is None
    f = copy_finding(IDS[0].peer_id, 3, got[0].rc, d(11))
    assert f is not None and f.peer == IDS[0].peer_id


@settings(max_examples=300)
@given(rc=st.one_of(st.none(), st.binary(max_size=1200)), prc=st.one_of(st.none(), st.binary(max_size=1200)))
def test_any_bytes_as_receipts_get_a_verdict_never_an_exception(rc: bytes | None, prc: bytes | None) -> None:
    parse_hop_untrusted(IDS[0].peer_id, rc, prc)


def test_parsed_receipts_parse_each_wire_once_and_stay_bounded(monkeypatch: object) -> None:
    import pytest

    from pymesh.client.receipt_check import ParsedReceipts
    from pymesh.proto import receipts as proto_receipts

    route, got = chain()
    wires = [got[a].rc.wire for a, _ in SPANS]
    calls: list[bytes] = []
    real = proto_receipts.SignedReceipt.from_wire_unverified

    def counting(wire: bytes) -> SignedReceipt:
        calls.append(wire)
        return real(wire)

    mp = pytest.MonkeyPatch()
    mp.setattr(proto_receipts.SignedReceipt, "from_wire_unverified", staticmethod(counting))
    try:
        cache = ParsedReceipts(limit=2)
        first = parse_hop_untrusted(route[0].peer, wires[0], None, cache)
        second = parse_hop_untrusted(route[1].peer, wires[1], wires[0], cache)   # wires[0] again: not re-checked
        assert isinstance(first, HopReceipts) and isinstance(second, HopReceipts)
        assert calls == [wires[0], wires[1]] and second.prc == first.rc
        cache.parse_untrusted(wires[2])          # evicts the least recently used: wires[1]
        cache.parse_untrusted(wires[0])
        cache.parse_untrusted(wires[1])
        assert calls == [wires[0], wires[1], wires[2], wires[1]] and len(cache._seen) == 2
        cut = wires[1][:-3]
        bad = parse_hop_untrusted(route[1].peer, cut, None, cache)   # a malformed receipt is never remembered
        assert not isinstance(bad, HopReceipts) and cut not in cache._seen
    finally:
        mp.undo()
