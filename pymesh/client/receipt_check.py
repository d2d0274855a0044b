"""The client's per-step check of a route's signed receipts (no I/O, no torch).

With receipts on, every hop sends the client, each step, its own signed receipt (``rc``)
and the receipt its input came with from the previous hop (``prc``). The chain of a step is
sound when, hop by hop:

- each receipt is signed by the hop that sent it, for this session, step, positions, span
  and model;
- the first hop's input is what the client sent, and each later hop's input is what the
  previous hop's receipt names as its output (``inp == prc.out``, ``prev == prc.digest``);
- the receipt a hop received with its input is the very receipt that hop's predecessor sent
  the client: two different signed receipts for one step are an *equivocation* (one output
  to the client, another down the route), and the two signatures convict the signer;
- the last hop's receipt names the result the client received.

Signatures are checked when a receipt becomes evidence, not on the honest path: everything a
hop sends the client comes over that hop's authenticated link, so its own receipt is its
statement whatever the signature says, and a forwarded receipt is compared byte for byte
with the one its signer sent the client. Before a finding cites receipts, each is verified;
one that does not verify convicts the peer that delivered it (``bad_receipt``) instead. The
next worker verifies every pushed receipt in full before computing (``check_received``), so
an invalid one stops the route there. This keeps ~0.1 ms of Ed25519 per hop-step (per
session) off the client.

A violation convicts the one peer whose own signed statements contradict each other or the
tensors it sent: no honest worker can be convicted by another's lie (a worker cannot sign
for its neighbour, and everything it sends the client comes over its authenticated link).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping, Sequence

from pymesh.proto.identity import PeerID
from pymesh.proto.receipts import ReceiptError, SignedReceipt


@dataclass(frozen=True)
class HopReceipts:
    """What one hop sent for one step: its receipt and the one its input came with."""

    rc: SignedReceipt
    prc: SignedReceipt | None


@dataclass(frozen=True)
class Finding:
    """A peer convicted by its own signed statements (``receipts``, wire form: the evidence)."""

    peer: PeerID
    kind: str          # equivocation | receipt_mismatch | bad_receipt
    why: str
    receipts: tuple[bytes, ...]


@dataclass(frozen=True)
class StepFacts:
    """What the client itself knows of a step."""

    model: str
    sid: bytes
    step: int
    pos: int
    seq: int


@dataclass(frozen=True)
class Hop:
    peer: PeerID
    start: int
    stop: int
    #: the model id (quantization included) the hop's worker announced; "": the step's model
    model: str = ""


class ParsedReceipts:
    """The last receipts parsed, by their exact wire bytes (bounded).

    Each step a hop's receipt reaches the client twice: from the hop itself and, forwarded,
    from the next hop; the second is not parsed again (and a signature checked once, for
    evidence, stays checked: :meth:`SignedReceipt.signature_ok` remembers)."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._seen: OrderedDict[bytes, SignedReceipt] = OrderedDict()

    def parse_untrusted(self, wire: bytes) -> SignedReceipt:
        """:meth:`SignedReceipt.from_wire_unverified`, remembered (raises ReceiptError alike)."""
        got = self._seen.get(wire)
        if got is not None:
            self._seen.move_to_end(wire)
            return got
        got = SignedReceipt.from_wire_unverified(wire)
        self._seen[wire] = got
        if len(self._seen) > self.limit:
            self._seen.popitem(last=False)
        return got


def parse_hop_untrusted(sender: PeerID, rc: bytes | None, prc: bytes | None,
                        parsed: ParsedReceipts | None = None) -> HopReceipts | Finding:
    """Parse what ``sender`` sent (signatures are checked once a receipt is cited, see the
    module doc); a missing or malformed own receipt convicts it (it came over its
    authenticated link), as does a malformed forwarded one (a worker must refuse such a
    push, not pass it on)."""
    if rc is None:
        return Finding(sender, "bad_receipt", "sent no receipt for a step of a session opened with receipts", ())
    parse = SignedReceipt.from_wire_unverified if parsed is None else parsed.parse_untrusted
    try:
        own = parse(rc)
    except ReceiptError as exc:
        return Finding(sender, "bad_receipt", f"sent an invalid receipt: {exc}", (rc,))
    if own.receipt.peer != sender:
        return Finding(sender, "bad_receipt", f"sent a receipt signed by {own.receipt.peer.short()}, not by itself",
                       (rc,))
    got = None
    if prc is not None:
        try:
            got = parse(prc)
        except ReceiptError as exc:
            return Finding(sender, "bad_receipt", f"passed on an invalid receipt from its predecessor: {exc}",
                           (rc, prc))
    return HopReceipts(own, got)


def check_step(facts: StepFacts, route: Sequence[Hop], got: Mapping[int, HopReceipts], input_digest: bytes,
               result_digest: bytes | None) -> Finding | None:
    """The first violation on ``route`` for one step (None: the chain is sound).

    ``got`` maps each hop's ``start`` to what it sent; every hop must be present.
    ``result_digest`` is the digest of the last hop's output as received (None: not checked).
    """
    own: list[SignedReceipt] = []
    for hop in route:
        h = got[hop.start]
        r = h.rc.receipt
        problem = _fields_problem(facts, hop, r.model, r.sid, r.step, r.pos, r.seq, r.start, r.stop)
        if problem is not None:
            return _cited(Finding(hop.peer, "receipt_mismatch", f"signed a receipt {problem}", (h.rc.wire,)),
                          (h.rc, hop.peer))
        own.append(h.rc)
    for i, hop in enumerate(route):
        h = got[hop.start]
        r = h.rc.receipt
        if i == 0:
            if h.prc is not None or r.prev:
                return _cited(Finding(hop.peer, "receipt_mismatch",
                                      "names a previous hop's receipt but is the first hop", (h.rc.wire,)),
                              (h.rc, hop.peer))
            if r.inp != input_digest:
                return _cited(Finding(hop.peer, "receipt_mismatch",
                                      f"signed for an input other than the one the client sent it (step {facts.step})",
                                      (h.rc.wire,)), (h.rc, hop.peer))
            continue
        before = route[i - 1]
        if h.prc is None:
            return _cited(Finding(hop.peer, "bad_receipt", "computed a pushed step without its predecessor's receipt",
                                  (h.rc.wire,)), (h.rc, hop.peer))
        p = h.prc.receipt
        if p.peer != before.peer:
            return _cited(Finding(hop.peer, "bad_receipt",
                                  f"passed on a receipt of {p.peer.short()}, not of its predecessor "
                                  f"{before.peer.short()}", (h.rc.wire, h.prc.wire)), (h.rc, hop.peer))
        if r.prev != h.prc.digest or r.inp != p.out:
            return _cited(Finding(hop.peer, "receipt_mismatch",
                                  "signed for an input other than the output its predecessor's receipt names",
                                  (h.rc.wire, h.prc.wire)), (h.rc, hop.peer), (h.prc, hop.peer))
        if h.prc.wire != own[i - 1].wire:
            return _cited(Finding(before.peer, "equivocation",
                                  f"signed two different receipts for step {facts.step}: one sent to the client, "
                                  f"another pushed to {hop.peer.short()} with its output",
                                  (own[i - 1].wire, h.prc.wire)), (h.prc, hop.peer), (own[i - 1], before.peer))
    last = got[route[-1].start].rc
    if result_digest is not None and last.receipt.out != result_digest:
        return _cited(Finding(route[-1].peer, "receipt_mismatch",
                              f"sent a result for step {facts.step} other than the one its receipt names",
                              (last.wire,)), (last, route[-1].peer))
    return None


def _cited(f: Finding, *cited: tuple[SignedReceipt, PeerID]) -> Finding:
    """``f`` once every receipt it cites verifies (evidence others can check); else the
    first that does not convicts the peer that delivered it over its own link."""
    for signed, by in cited:
        if not signed.signature_ok():
            whose = "its own receipt" if signed.receipt.peer == by else f"a receipt of {signed.receipt.peer.short()}"
            return Finding(by, "bad_receipt", f"sent {whose} whose signature does not verify", (signed.wire,))
    return f


def copy_finding(sender: PeerID, step: int, receipt: SignedReceipt | None, digest: bytes) -> Finding | None:
    """A recovery copy whose digest differs from its sender's own receipt for that step."""
    if receipt is None or receipt.receipt.out == digest:
        return None
    return _cited(Finding(sender, "receipt_mismatch",
                          f"sent a copy of its output for step {step} other than the one its receipt names",
                          (receipt.wire,)), (receipt, sender))


def _fields_problem(f: StepFacts, hop: Hop, model: str, sid: bytes, step: int, pos: int, seq: int, start: int,
                    stop: int) -> str | None:
    if model != (hop.model or f.model):
        return f"for model {model!r}, not {hop.model or f.model!r}"
    if sid != f.sid or step != f.step:
        return f"for another session or step (step {step}, expected {f.step})"
    if (pos, seq) != (f.pos, f.seq):
        return f"for positions {pos}+{seq}, not {f.pos}+{f.seq}"
    if (start, stop) != (hop.start, hop.stop):
        return f"for blocks {start}-{stop - 1}, not {hop.start}-{hop.stop - 1}"
    return None
