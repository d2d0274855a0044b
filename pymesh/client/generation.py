"""Token generation through the swarm, step for step like ``pymesh.model.generate``.

Same prompt ids, same step shapes (one prefill of the whole prompt, then one token per
step), same sampler, same end conditions (EOS of config and tokenizer, stop strings,
``max_new_tokens``): greedy output equals the single-process run.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Sequence

import trio

from pymesh.client.headbatch import HeadBatcher
from pymesh.client.routing import route_json
from pymesh.client.session import InferenceSession
from pymesh.client.swarm import Swarm
from pymesh.client.verify import Late, VerifyReport
from pymesh.errors import PymeshError
from pymesh.proto.identity import PeerID

if TYPE_CHECKING:
    from pymesh.model.sampling import SamplingParams
    from pymesh.proto.identity import PeerID

log = logging.getLogger(__name__)


class OutputRetracted(PymeshError):
    """Tokens already emitted were computed through a worker that verification convicted
    afterwards; the caller cannot take them back, so the generation stops here."""

    def __init__(self, peer: "PeerID", from_token: int) -> None:
        super().__init__(f"worker {peer.short()} was convicted of wrong outputs after tokens were emitted; the "
                         f"tokens from #{from_token} on are not trustworthy (run the request again: it is routed "
                         "around that worker now)")
        self.peer = peer
        self.from_token = from_token


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    tokens: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    route: list[dict[str, Any]] = field(default_factory=list)
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    verification: VerifyReport = field(default_factory=VerifyReport)
    #: rows of the client's head pass that picked each token -> tokens (batched with other sessions
    #: of this process when > 1; see :class:`~pymesh.client.headbatch.HeadBatcher`)
    head_rows: Counter[int] = field(default_factory=Counter)

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.tokens) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


class ClientModel:
    """What the client holds of the model: config, tokenizer, embeddings, final norm, LM head.
    ``quantize`` (``--quantize``): the head computes in that block format and the model id
    carries it, so routes use only workers of the same quantization (issue 15)."""

    def __init__(self, model_path: str | Path, *, device: str = "cpu", dtype: str = "float32",
                 model_name: str | None = None, quantize: str | None = None) -> None:
        from pymesh.model.fingerprint import model_id
        from pymesh.model.head import load_head
        from pymesh.model.tokenizer import load_tokenizer
        from pymesh.model.torch_setup import parse_dtype

        self.path = Path(model_path)
        self.head = load_head(self.path, device=device, dtype=parse_dtype(dtype), quantize=quantize)
        self.config = self.head.config
        self.tokenizer = load_tokenizer(self.path)
        self.model_id = model_id(self.path, model_name, quantize)
        #: LM head + sampling of every session of this process, batched (generate_tokens, the API)
        self.batcher = HeadBatcher(self.head)

    def prompt_ids(self, prompt: str | Sequence[int], chat: bool) -> list[int]:
        from pymesh.model.generate import prompt_ids

        if isinstance(prompt, str):
            return prompt_ids(self.tokenizer, prompt, chat)
        return [int(i) for i in prompt]

    @property
    def eos_ids(self) -> set[int]:
        return set(self.config.eos_token_id) | set(getattr(self.tokenizer, "eos_token_ids", []) or [])


async def generate_tokens(
    swarm: Swarm,
    model: ClientModel,
    ids: Sequence[int],
    params: SamplingParams,
    *,
    stats: GenerationStats | None = None,
    ignore_eos: bool = False,
    rewind: Callable[[int], None] | None = None,
) -> AsyncIterator[int]:
    """Yield new token ids for the prompt ``ids`` (an EOS id is yielded, then it stops,
    unless ``ignore_eos``: benchmarks generate a fixed number of tokens).

    Verification (``--verify``) may convict a worker after its output was used (a sampled
    background check). Then the tokens from the first wrong step on were computed from a
    wrong hidden state: with ``rewind``, ``rewind(n)`` is called (keep the first ``n``
    tokens yielded, drop the rest) and generation goes on from there on an honest route,
    ``stats.verification.recomputed`` saying whether the text changed; without it
    :class:`OutputRetracted` is raised (a stream must not continue silently)."""
    from pymesh.model.generate import make_stop_check
    from pymesh.model.sampling import Sampler

    from pymesh.errors import ConfigError

    ids = list(ids)
    if not ids:
        raise ConfigError("the prompt is empty: at least one token is needed")
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(ids)
    eos = set() if ignore_eos else model.eos_ids
    stop_check = make_stop_check(model.tokenizer, params.stop) if params.stop else None
    sampler = Sampler(params)
    history = list(ids)
    total = len(ids) + params.max_new_tokens

    layers = model.config.num_hidden_layers
    report = stats.verification
    tokens = stats.tokens
    t0 = time.perf_counter()
    t_decode = t0
    while True:
        async with InferenceSession(swarm, 0, layers, max(total, 1)) as session:
            report.mode, report.rate = session.verifier.report.mode, session.verifier.report.rate
            base = len(tokens)      # tokens settled before this session: its step j makes token base + j
            recorded = 0        # session.recoveries already in stats (last_stats is live)

            def sync_route() -> None:
                nonlocal recorded
                stats.recoveries += session.recoveries[recorded:]
                recorded = len(session.recoveries)
                stats.route = route_json(session.route, _path_of(swarm))

            sync_route()
            hidden = await model.batcher.embed_prompt(history)
            done = False
            late: Late | None = None
            try:
                while len(tokens) < params.max_new_tokens and not done:
                    out = await session.step(hidden)
                    if len(session.recoveries) > recorded:  # a recovery moved the session
                        sync_route()
                    late = session.verifier.late
                    if late is not None:
                        break
                    # head, sampling and the next input's embedding, batched with the other
                    # sessions of this process that are ready now (one trip to the compute thread)
                    pick = await model.batcher.pick(out[0, -1], sampler, history)
                    assert pick.hidden is not None       # embed=True
                    token, hidden = pick.token, pick.hidden
                    history.append(token)
                    stats.head_rows[pick.rows] += 1
                    if not tokens:
                        stats.prefill_s = time.perf_counter() - t0
                        t_decode = time.perf_counter()
                    tokens.append(token)
                    stats.decode_s = time.perf_counter() - t_decode
                    yield token
                    done = token in eos or (stop_check is not None and stop_check(tokens))
                if late is None:
                    await session.verifier.settle(session.step_timeout)
                    late = session.verifier.late
            finally:
                report.merge(session.verifier.report)
                sync_route()
        if late is None:
            _note_recomputed(report, tokens)
            return
        keep = min(base + late.first_bad_step, len(tokens))
        log.warning("Client: worker %s was convicted after its output was used; recomputing from token %d",
                    late.peer.short(), keep)
        if rewind is None:
            raise OutputRetracted(late.peer, keep)
        report.recomputed.append({"peer": str(late.peer), "from_token": keep, "old": tokens[keep:], "changed": None})
        rewind(keep)
        del tokens[keep:]
        del history[len(ids) + keep:]


def _note_recomputed(report: "VerifyReport", tokens: list[int]) -> None:
    """Whether each recomputation changed the text that had been emitted."""
    for r in report.recomputed:
        if r.get("changed") is None:
            old = r.pop("old", [])
            new = tokens[r["from_token"]:r["from_token"] + len(old)]
            r["changed"] = new != old


def _path_of(swarm: Swarm) -> Callable[[PeerID], str | None] | None:
    """How the swarm's node reaches each peer (direct, punched, relayed); None without a node."""
    try:
        return swarm.node.path_to
    except PymeshError:
        return None
