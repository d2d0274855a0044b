"""What the HTTP layer asks of the model: tokenizer, limits, health, and a token stream with logprobs.

:class:`SwarmBackend` is the real one: the client's :class:`~pymesh.client.generation.ClientModel`
(embeddings, head, tokenizer) and a :class:`~pymesh.client.swarm.Swarm`, in the same trio
process as the HTTP server. Each request is its own :class:`~pymesh.client.session.InferenceSession`
with the step shapes of ``pymesh generate`` (one prefill, then one token a step) and the same
sampler, so greedy text equals the CLI's. The LM head and sampling of concurrent requests run
batched (:class:`~pymesh.client.headbatch.HeadBatcher`, shared with every session of the
process): each request keeps its own sampler, seed and penalties. The session is closed on the workers even when the
request is cancelled (a client that went away): the close runs shielded, bounded by the
session's own 2-second limit.

Logprobs are the log-softmax of the head's logits before repetition penalty, temperature and
top-k/top-p (what vLLM returns by default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncGenerator, AsyncIterator, Protocol, Sequence

import trio

if TYPE_CHECKING:
    from pymesh.client.generation import ClientModel
    from pymesh.client.swarm import Swarm
    from pymesh.model.sampling import SamplingParams


@dataclass
class TokenStep:
    """One generated token, its logprob and the ``top`` most likely alternatives (id, logprob)."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RunInfo:
    """What one generation reports when it ends (for metrics)."""

    recoveries: int = 0
    route_changes: int = 0
    #: the session's verifier (pymesh.client.verify.Verifier): its report, and settle() to wait
    #: for the last spot checks before the answer is final
    verifier: Any = None


class Backend(Protocol):
    model_id: str
    max_context: int

    def encode_prompt(self, prompt: str, messages: list[dict[str, str]] | None) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def stream_decoder(self) -> Any: ...

    def stop_check(self, stop: Sequence[str]) -> Any: ...

    @property
    def eos_ids(self) -> set[int]: ...

    def tokens(self, ids: list[int], params: SamplingParams, top_logprobs: int | None,
               info: RunInfo) -> AsyncIterator[TokenStep]: ...

    async def health(self) -> dict[str, Any]: ...

    def cache_limit(self) -> tuple[int, int] | None: ...


class SwarmBackend:
    """A :class:`Backend` through the swarm (use inside ``async with swarm``)."""

    def __init__(self, swarm: Swarm, model: ClientModel) -> None:
        self.swarm = swarm
        self.model = model
        self.model_id = model.model_id
        self.max_context = int(model.config.max_position_embeddings)

    def encode_prompt(self, prompt: str, messages: list[dict[str, str]] | None) -> list[int]:
        """Token ids exactly as ``pymesh generate`` builds them (``--chat`` for messages)."""
        tok = self.model.tokenizer
        if messages is not None:
            text = tok.apply_chat_template(messages, add_generation_prompt=True)
            return list(tok.encode(text, add_special_tokens=False))
        return list(tok.encode(prompt))

    def decode(self, ids: list[int]) -> str:
        return str(self.model.tokenizer.decode(ids))

    def stream_decoder(self) -> Any:
        return self.model.tokenizer.stream_decoder()

    def stop_check(self, stop: Sequence[str]) -> Any:
        from pymesh.model.generate import make_stop_check

        return make_stop_check(self.model.tokenizer, stop)

    @property
    def eos_ids(self) -> set[int]:
        return self.model.eos_ids

    def cache_limit(self) -> tuple[int, int] | None:
        """(tokens, layer): the most tokens one session can hold on the layer whose largest
        worker cache is smallest, from the records seen so far (None: none seen yet)."""
        records = self.swarm.book.live()
        usable = {o.peer for o in self.swarm.options_from(records)}
        best: dict[int, int] = {}
        for r in records:
            if r.peer_id in usable:
                for b in range(r.start, r.stop):
                    best[b] = max(best.get(b, 0), r.cache_tokens_total)
        if not best or len(best) < self.model.config.num_hidden_layers:
            return None
        layer = min(best, key=lambda b: (best[b], b))
        return best[layer], layer

    async def health(self) -> dict[str, Any]:
        from pymesh.client.routing import first_uncovered_block

        n = self.model.config.num_hidden_layers
        records = await self.swarm.records()
        options = self.swarm.options_from(records)
        banned = self.swarm.current_bans()
        usable = [o for o in options if o.peer not in banned]
        gap = first_uncovered_block(usable, 0, n)
        covered = sum(1 for b in range(n) if any(o.start <= b < o.stop for o in usable))
        return {"status": "ok" if gap is None else "degraded", "model": self.model_id, "blocks": n,
                "blocks_covered": covered, "missing_layer": gap, "workers": len({o.peer for o in usable})}

    async def tokens(self, ids: list[int], params: SamplingParams, top_logprobs: int | None,
                     info: RunInfo) -> AsyncGenerator[TokenStep, None]:
        """Yield each new token (EOS included) until EOS or ``max_new_tokens``; stop strings are
        the caller's (it decodes text anyway). ``top_logprobs``: None = no logprobs."""
        from pymesh.client.generation import OutputRetracted
        from pymesh.client.session import InferenceSession
        from pymesh.model.sampling import Sampler

        sampler = Sampler(params)
        history = list(ids)
        session = InferenceSession(self.swarm, 0, self.model.config.num_hidden_layers,
                                   max(len(ids) + params.max_new_tokens, 1))
        await session.__aenter__()
        info.verifier = session.verifier
        first_route = [(o.peer, o.start, o.stop) for o in session.route]
        try:
            hidden = await self.model.batcher.embed_prompt(ids)
            for _ in range(params.max_new_tokens):
                out = await session.step(hidden)
                late = session.verifier.late
                if late is not None:  # tokens sent already came through a convicted worker
                    raise OutputRetracted(late.peer, late.first_bad_step)
                # head and sampling batched with the other requests' sessions ready now
                pick = await self.model.batcher.pick(out[0, -1], sampler, history, top_logprobs=top_logprobs)
                assert pick.hidden is not None       # embed=True
                history.append(pick.token)
                hidden = pick.hidden
                yield TokenStep(pick.token, pick.logprob, pick.top)
        finally:
            info.recoveries = len(session.recoveries)
            info.route_changes = int(first_route != [(o.peer, o.start, o.stop) for o in session.route])
            # a cancelled request (the HTTP client went away) must still free the workers' caches:
            # the close is shielded from that cancellation; the session bounds it to 2 s
            with trio.CancelScope(shield=True):
                await session.__aexit__(None, None, None)
