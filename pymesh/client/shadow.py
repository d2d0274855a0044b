"""A checker's copy of one span of a session: the inputs re-run on other workers.

To check what a worker computed for step ``k`` of a session, another worker serving the
same blocks must compute that step too, which needs the session's KV state up to ``k``. A
:class:`Shadow` keeps a session of its own on the checker (a route over the same blocks that
avoids the checked peer: one worker when one serves exactly that span, else a chain) and
advances it *lazily*: when a check of step ``k`` comes, the stored inputs of the steps it has
not seen yet (``fed .. k``) are concatenated and sent as one chunk, like a prefill. So a
session's whole check traffic costs each checker at most one prefill of the tokens generated
so far, however many checks sample it; the outputs of every step come back, split per step.

Prefill-as-chunk and the checked worker's prefill + one-token decode steps agree only within
a tolerance (:mod:`pymesh.client.tolerance`); that is why outputs are compared, not digests.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import trio

from pymesh.client.checks import output_problem_untrusted
from pymesh.client.routing import SpanOption, hop_model
from pymesh.errors import PymeshError
from pymesh.proto import session_wire as sw
from pymesh.proto.receipts import ReceiptError, SignedReceipt, tensor_digest

if TYPE_CHECKING:
    from torch import Tensor

    from pymesh.proto.identity import PeerID

    from pymesh.client.swarm import Swarm

log = logging.getLogger(__name__)


class CheckInconclusive(PymeshError):
    """A spot check could not be completed (no checker, a checker failed): nobody is judged."""


@dataclass
class Shadow:
    """A session of ours on ``route`` (other workers serving ``[start, stop)``)."""

    swarm: "Swarm"
    route: list[SpanOption]
    max_tokens: int
    batch: int
    timeout: float
    sid: bytes = field(default_factory=lambda: os.urandom(16))
    fed: int = 0                     # steps 0..fed-1 computed
    length: int = 0                  # positions computed
    chunks: int = 0                  # pm.forward calls made (the shadow session's step index)
    opened: bool = False
    outputs: dict[int, "Tensor"] = field(default_factory=dict)
    #: the input tensors steps 0..fed-1 were computed from (the client's own objects, not
    #: copies): a recovery that re-runs a step replaces its input, and the shadow restarts
    seen: dict[int, "Tensor"] = field(default_factory=dict)
    #: the checkers' own receipts (evidence) and the loosest dtype among them
    receipts: list[bytes] = field(default_factory=list)
    dtype: str = "float32"
    device: str = "cpu"
    lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def peers(self) -> list[str]:
        return [str(o.peer) for o in self.route]

    def describe(self) -> str:
        return " -> ".join(o.describe() for o in self.route)

    async def _open(self) -> None:
        async def one(o: SpanOption) -> None:
            model = hop_model(o, self.swarm.model_id)
            msg = sw.Open(self.sid, self.max_tokens, self.batch, model, o.start, o.stop, reset=True,
                          copies=1, next_hop=None, prev=None, receipts=True)
            await self.swarm.request(o, msg)

        try:
            async with trio.open_nursery() as n:
                for o in self.route:
                    n.start_soon(one, o)
        except PymeshError as exc:
            raise CheckInconclusive(f"checker {self.describe()} refused a shadow session: {exc}") from None
        except BaseExceptionGroup as group:
            raise CheckInconclusive(f"checker {self.describe()} refused a shadow session: {group}") from None
        self.opened = True

    async def advance(self, k: int, inputs: dict[int, "Tensor"], shapes: Sequence[tuple[int, int]]) -> None:
        """Compute steps ``fed..k`` (their inputs in ``inputs``; ``shapes[j]`` = (pos, seq))."""
        import torch

        from pymesh.model.blobs import blob_to_tensor, tensor_to_blob

        async with self.lock:
            if any(inputs.get(j) is not t for j, t in self.seen.items()):
                await self._restart()
            if self.fed > k:
                return
            if not self.opened:
                await self._open()
            steps = list(range(self.fed, k + 1))
            x = torch.cat([inputs[j] for j in steps], dim=1).contiguous()
            pos = self.length
            for o in self.route:
                blob = tensor_to_blob(x)
                try:
                    meta, tensors = await self.swarm.request(
                        o, sw.Forward(self.sid, self.chunks, pos), [blob], timeout=self.timeout)
                    reply = sw.ForwardReply.from_meta_untrusted(meta)
                    sw.check_tensor_count(tensors, 1, "pm.forward reply")
                except PymeshError as exc:
                    raise CheckInconclusive(f"checker {o.describe()} failed: {exc}") from None
                problem = output_problem_untrusted(tensors[0], str(x.dtype).removeprefix("torch."), tuple(x.shape))
                if problem is not None:
                    raise CheckInconclusive(f"checker {o.describe()} sent a wrong answer: {problem}")
                self._note_receipt(o, reply.rc, tensor_digest(blob), tensor_digest(tensors[0]))
                x = blob_to_tensor(tensors[0])
            off = 0
            for j in steps:
                seq = shapes[j][1]
                self.outputs[j] = x[:, off:off + seq]
                self.seen[j] = inputs[j]
                off += seq
            self.fed, self.length, self.chunks = k + 1, pos + int(x.shape[1]), self.chunks + 1

    async def _restart(self) -> None:
        """An input this shadow already computed was replaced (a recovery re-ran that step
        after a worker upstream was convicted or failed): its KV state and outputs describe
        inputs the session no longer has. Close it and start over under a new session id; the
        next advance replays the stored inputs from step 0."""
        log.info("Client: checker %s restarts its shadow session: a step it computed was re-run", self.describe())
        await self.close()
        self.sid = os.urandom(16)
        self.fed = self.length = self.chunks = 0
        self.outputs.clear()
        self.seen.clear()

    def _note_receipt(self, o: SpanOption, rc: bytes | None, inp: bytes, out: bytes) -> None:
        if rc is None:
            raise CheckInconclusive(f"checker {o.describe()} sent no receipt for its output")
        try:
            signed = SignedReceipt.from_wire_untrusted(rc)
        except ReceiptError as exc:
            raise CheckInconclusive(f"checker {o.describe()} sent an invalid receipt: {exc}") from None
        r = signed.receipt
        if r.peer != o.peer or r.inp != inp or r.out != out:
            raise CheckInconclusive(f"checker {o.describe()}'s receipt does not name what it computed")
        self.receipts.append(rc)
        if _looseness(r.dtype) > _looseness(self.dtype):
            self.dtype = r.dtype
        if r.device != "cpu":
            self.device = r.device

    async def close(self) -> None:
        if not self.opened:
            return
        self.opened = False

        async def one(o: SpanOption) -> None:
            try:
                await self.swarm.request(o, sw.Close(self.sid), timeout=2)
            except PymeshError:
                pass

        with trio.move_on_after(2):
            async with trio.open_nursery() as n:
                for o in self.route:
                    n.start_soon(one, o)


def _looseness(dtype: str) -> int:
    return {"float32": 0, "float16": 1, "bfloat16": 2}.get(dtype, 3)


async def alternative_route(swarm: "Swarm", start: int, stop: int, exclude: Sequence["PeerID"],
                            min_cache_tokens: int, model: str | None = None) -> list[SpanOption] | None:
    """A route over ``[start, stop)`` avoiding ``exclude`` from the records at hand (one
    lookup, no waiting: a check with no checker is reported, not stalled). Prefers one worker.
    ``model``: only workers of that id, quantization included (a checker computing in another
    precision would disagree with an honest worker)."""
    from pymesh.client.routing import NoRouteError, choose_route

    try:
        records = await swarm.records()
    except PymeshError:
        return None
    options = [o for o in swarm.options_from(records) if model is None or hop_model(o, swarm.model_id) == model]
    banned = swarm.current_bans() | set(exclude) | set(swarm.not_listing)
    whole = [o for o in options if (o.start, o.stop) == (start, stop) and o.peer not in banned
             and o.cache_tokens_free >= min_cache_tokens]
    if whole:
        return [min(whole, key=lambda o: swarm.rtt_ms.get(o.peer, 1e9))]
    try:
        return choose_route(options, start, stop, rtt_ms=dict(swarm.rtt_ms), banned=banned,
                            min_cache_tokens=min_cache_tokens)
    except NoRouteError:
        return None
