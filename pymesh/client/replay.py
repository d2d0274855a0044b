"""The I/O of moving a session's state after a fault: fetching unsent recovery copies
(``pm.flush``) and replaying stored inputs onto a new hop (``pm.forward``).

With verification on, what these bring back is held to the sender's receipts like any
step's output: a flushed copy must be the output its receipt named, and a replayed step
comes with a receipt of its own (kept, so later checks and evidence refer to it).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pymesh.client import probes
from pymesh.client.bans import BanCause
from pymesh.client.blame import Blame, SessionFailed, StepFailure, Verdict
from pymesh.client.receipt_check import HopReceipts, copy_finding, parse_hop_untrusted
from pymesh.client.recovery import Replay
from pymesh.client.routing import SpanOption
from pymesh.errors import PymeshError
from pymesh.proto import session_wire as sw
from pymesh.proto.receipts import tensor_digest

if TYPE_CHECKING:
    from pymesh.client.session import InferenceSession

log = logging.getLogger(__name__)


async def fetch_unsent_copies(session: "InferenceSession", source: SpanOption, boundary: int) -> None:
    """Ask the (alive) hop ending at ``boundary`` for the recovery copies it has not pushed yet."""
    from pymesh.model.blobs import blob_to_tensor

    try:
        meta, tensors = await session.swarm.request(source, sw.Flush(session.sid))
        reply = sw.FlushReply.from_meta_untrusted(meta)
        sw.check_tensor_count(tensors, len(reply.steps), "pm.flush reply")
    except PymeshError as exc:
        raise StepFailure(probes.failure_of(source, "flush of recovery copies", exc)) from None
    store = session.history.setdefault(boundary, {})
    v = session.verifier
    for k, blob in zip(reply.steps, tensors):
        problem = session.problem(k, blob)
        if problem is not None:
            raise StepFailure(Blame(source.peer, f"{source.describe()} flushed a wrong copy of step {k}: "
                                                 f"{problem}", cause=BanCause.WRONG_ANSWER))
        got = v.receipt_of(source.start, k) if v.on else None
        finding = copy_finding(source.peer, k, got.rc if got is not None else None, tensor_digest(blob))
        if finding is not None:
            v.convict_finding(finding, k)
            raise StepFailure(Blame(source.peer, finding.why, Verdict.CONVICTED))
        store[k] = blob_to_tensor(blob)
    log.info("Client: fetched %d unsent recovery cop%s from %s", len(reply.steps),
             "y" if len(reply.steps) == 1 else "ies", source.describe())


async def replay(session: "InferenceSession", r: Replay) -> None:
    """Rebuild a new hop's cache: its stored inputs, one call per original step."""
    from pymesh.model.blobs import blob_to_tensor, tensor_to_blob

    o = r.hop
    inputs = session.history.setdefault(o.start, {})
    missing = [k for k in range(r.steps) if k not in inputs]
    if missing:
        raise SessionFailed(f"no stored input of step {missing[0]} for block {o.start}: cannot replay "
                            f"onto {o.describe()}")
    outputs = {}
    receipts: dict[int, HopReceipts] = {}
    v = session.verifier
    for k in range(r.steps):
        pos, _seq = session.shapes[k]
        blob = tensor_to_blob(inputs[k])
        try:
            meta, tensors = await session.swarm.request(
                o, sw.Forward(session.sid, k, pos), [blob], timeout=session.step_timeout)
            reply = sw.ForwardReply.from_meta_untrusted(meta)
            sw.check_tensor_count(tensors, 1, "pm.forward reply")
        except PymeshError as exc:
            raise StepFailure(probes.failure_of(o, f"replay of step {k}", exc)) from None
        problem = session.problem(k, tensors[0])
        if problem is not None:
            raise StepFailure(Blame(o.peer, f"{o.describe()} replayed step {k} wrongly: {problem}",
                                    cause=BanCause.WRONG_ANSWER))
        if v.on:
            parsed = parse_hop_untrusted(o.peer, reply.rc, None)
            if isinstance(parsed, HopReceipts):
                rc = parsed.rc.receipt
                if (rc.inp, rc.out, rc.sid, rc.start, rc.stop) != (tensor_digest(blob), tensor_digest(tensors[0]),
                                                                     session.sid, o.start, o.stop):
                    raise StepFailure(Blame(o.peer, f"{o.describe()}'s receipt for replayed step {k} does not "
                                                    "name what it computed", cause=BanCause.WRONG_ANSWER))
                receipts[k] = parsed
            else:
                raise StepFailure(Blame(o.peer, f"{o.describe()} replayed step {k}: {parsed.why}",
                                        cause=BanCause.WRONG_ANSWER))
        outputs[k] = blob_to_tensor(tensors[0])
    if r.store:
        session.history.setdefault(o.stop, {}).update(outputs)
        for k, hr in receipts.items():
            v.note(o.start, k, hr)
    log.info("Client: replayed %d step(s) onto %s", r.steps, o.describe())
