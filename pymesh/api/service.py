"""The gateway: a parsed request -> a swarm generation -> OpenAI response objects or SSE chunks.

Admission: at most ``max_active`` generations run at once; up to ``max_waiting`` more wait
their turn, and a request beyond that is refused at once with 429. Stop strings end the text
as ``pymesh generate`` does (the stop text itself is never returned); ``finish_reason`` is
``stop`` (EOS or a stop string) or ``length``.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, AsyncIterator

import trio

from pymesh.api.backend import Backend, RunInfo, TokenStep
from pymesh.api.schema import ApiError, CompletionRequest

if TYPE_CHECKING:
    from pymesh.api.metrics import Metrics
    from pymesh.model.sampling import SamplingParams


def model_name(model_id: str) -> str:
    """The name users type: ``name`` of ``name@fingerprint``."""
    return model_id.split("@", 1)[0]


class Gateway:
    def __init__(self, backend: Backend, defaults: SamplingParams, metrics: Metrics, *,
                 max_active: int = 16, max_waiting: int = 32) -> None:
        self.backend = backend
        self.defaults = defaults
        self.metrics = metrics
        self.max_active = max_active
        self.slots = trio.Semaphore(max_active)
        self.max_waiting = max_waiting
        self.waiting = 0

    # -- checks --------------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        mid = self.backend.model_id
        if name not in (mid, model_name(mid)):
            raise ApiError(404, f"model '{name}' is not served here; this swarm serves '{model_name(mid)}' "
                                f"(or its full id '{mid}')", param="model", code="model_not_found")

    def params_of(self, req: CompletionRequest) -> SamplingParams:
        from pymesh.errors import ConfigError

        d = self.defaults
        try:
            return replace(
                d, temperature=d.temperature if req.temperature is None else req.temperature,
                top_p=d.top_p if req.top_p is None else req.top_p,
                top_k=d.top_k if req.top_k is None else req.top_k,
                repetition_penalty=d.repetition_penalty if req.repetition_penalty is None else req.repetition_penalty,
                seed=d.seed if req.seed is None else req.seed,
                max_new_tokens=d.max_new_tokens if req.max_tokens is None else req.max_tokens,
                stop=list(req.stop or d.stop))
        except ConfigError as exc:
            raise ApiError(400, str(exc)) from None

    def prompt_ids(self, req: CompletionRequest, params: SamplingParams) -> list[int]:
        from pymesh.errors import ConfigError

        try:
            ids = self.backend.encode_prompt(req.prompt, req.messages if req.chat else None)
        except ConfigError as exc:
            raise ApiError(400, f"cannot build the prompt: {exc}", param="messages" if req.chat else "prompt") from None
        if not ids:
            raise ApiError(400, "the prompt encodes to no tokens", param="prompt")
        limit = self.backend.max_context
        if len(ids) + params.max_new_tokens > limit:
            raise ApiError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({params.max_new_tokens}) is "
                                f"beyond the model's context of {limit} tokens; shorten the prompt or lower "
                                "max_tokens", param="max_tokens", code="context_length_exceeded")
        cache = self.backend.cache_limit()
        if cache is not None and len(ids) + params.max_new_tokens > cache[0]:
            raise ApiError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({params.max_new_tokens}) is more "
                                f"than any worker serving layer {cache[1]} can hold ({cache[0]} tokens of cache); "
                                "shorten the prompt or lower max_tokens", param="max_tokens",
                                code="context_length_exceeded")
        return ids

    @asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        """A generation slot, waiting in the bounded queue; 429 when the queue is full."""
        if self.slots.value == 0 and self.waiting >= self.max_waiting:
            self.metrics.rejected.inc()
            raise ApiError(429, f"{self.max_waiting} requests are already waiting for the swarm; retry later",
                           code="queue_full")
        self.waiting += 1
        self.metrics.waiting.inc()
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
            self.metrics.waiting.dec()
        self.metrics.active.inc()
        try:
            yield
        finally:
            self.slots.release()
            self.metrics.active.dec()

    # -- generation ----------------------------------------------------------------------
    async def start(self, req: CompletionRequest) -> "Run":
        """Check, admit and run a request up to its first token (errors here are HTTP statuses)."""
        self.check_model(req.model)
        params = self.params_of(req)
        ids = self.prompt_ids(req, params)
        run = Run(self, req, params, ids)
        await run.begin()
        return run


def _map_error(exc: BaseException) -> ApiError:
    from pymesh.client.routing import NoRouteError
    from pymesh.client.session import SessionFailed
    from pymesh.errors import ConfigError, PymeshError

    from pymesh.client.generation import OutputRetracted
    from pymesh.client.headbatch import HeadQueueFull

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, HeadQueueFull):
        return ApiError(429, str(exc), code="client_busy")
    if isinstance(exc, OutputRetracted):
        return ApiError(502, str(exc), code="output_retracted")
    if isinstance(exc, NoRouteError) and "was convicted of wrong outputs" in str(exc):
        return ApiError(503, str(exc), code="no_route")
    if isinstance(exc, NoRouteError) and "no free cache" in str(exc):
        # every provider of a layer is full (or banned for a while): busy, not broken
        return ApiError(429, f"layer {exc.missing_block}: {exc}", code="swarm_busy")
    if isinstance(exc, NoRouteError):
        layer = "" if exc.missing_block is None else f"layer {exc.missing_block} has no provider: "
        return ApiError(503, f"{layer}{exc}", code="no_route")
    if isinstance(exc, SessionFailed) and "refused" in str(exc):
        return ApiError(429, f"every worker refused the session (no free cache?): {exc}", code="swarm_busy")
    if isinstance(exc, ConfigError):
        return ApiError(400, str(exc))
    if isinstance(exc, PymeshError):
        return ApiError(503, f"the swarm failed this request: {exc}", code="swarm_error")
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}")


class Run:
    """One request's generation: tokens, text with stop strings applied, finish reason."""

    def __init__(self, gw: Gateway, req: CompletionRequest, params: SamplingParams, ids: list[int]) -> None:
        self.gw, self.req, self.params, self.ids = gw, req, params, ids
        self.id = ("chatcmpl-" if req.chat else "cmpl-") + os.urandom(12).hex()
        self.created = int(time.time())
        self.tokens: list[int] = []
        self.steps: list[TokenStep] = []
        self.finish = "length"
        self.info = RunInfo()
        self._stop_check = gw.backend.stop_check(params.stop) if params.stop else None
        self._eos = gw.backend.eos_ids
        self._cm = gw.admitted()
        self._gen: AsyncIterator[TokenStep] | None = None
        self._first: TokenStep | None = None
        self._closed = False
        self._t0 = time.perf_counter()
        self._last = self._t0

    async def begin(self) -> None:
        await self._cm.__aenter__()
        await self._start_gen()

    async def _start_gen(self) -> None:
        try:
            top = self.req.top_logprobs if self.req.logprobs else None
            self._gen = self.gw.backend.tokens(self.ids, self.params, top, self.info)
            if self.params.max_new_tokens > 0:
                self._first = await self._gen.__anext__()
        except StopAsyncIteration:
            self._first = None
        except BaseException as exc:
            await self.close()
            if isinstance(exc, Exception):
                raise _map_error(exc) from None
            raise

    async def _settle(self) -> None:
        """Wait for the generation's last spot checks: a conviction now retracts the output."""
        v = self.info.verifier
        if v is None or not v.on:
            return
        await v.settle(v.session.step_timeout)
        if v.late is not None:
            from pymesh.client.generation import OutputRetracted

            raise _map_error(OutputRetracted(v.late.peer, v.late.first_bad_step))

    async def _restart(self) -> None:
        """Generate again from scratch (a worker was convicted after its output was used:
        nothing was sent yet in a whole response, and the new route avoids it)."""
        if self._gen is not None:
            with trio.CancelScope(shield=True):
                await self._gen.aclose()  # type: ignore[attr-defined]
        self.tokens, self.steps, self.finish = [], [], "length"
        self._first = None
        await self._start_gen()

    def verification(self) -> dict[str, Any]:
        """The ``pymesh_verification`` field of responses: checks made, mismatches, convictions."""
        v = self.info.verifier
        if v is None:
            return {"mode": "off"}
        r = v.report.to_json()
        return {k: r[k] for k in ("mode", "checks", "mismatches", "receipts_checked", "unverified")} | {
            "convicted": [c["peer"] for c in r["convicted"]]}

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            if self._gen is not None:
                await self._gen.aclose()  # type: ignore[attr-defined]
                self._gen = None
                m = self.gw.metrics
                m.recoveries.inc(self.info.recoveries)
                m.route_changes.inc(self.info.route_changes)
                m.prompt_tokens.inc(len(self.ids))
                m.tokens.inc(len(self.tokens))
            await self._cm.__aexit__(None, None, None)

    async def steps_iter(self) -> AsyncIterator[TokenStep]:
        """Each accepted token until EOS, a stop string or max_tokens."""
        assert self._gen is not None
        step = self._first
        while step is not None:
            now = time.perf_counter()
            (self.gw.metrics.ttft if not self.tokens else self.gw.metrics.inter_token).observe(now - self._last)
            self._last = now
            self.tokens.append(step.token)
            self.steps.append(step)
            yield step
            if step.token in self._eos or (self._stop_check is not None and self._stop_check(self.tokens)):
                self.finish = "stop"
                return
            try:
                step = await self._gen.__anext__()
            except StopAsyncIteration:
                return
            except Exception as exc:
                raise _map_error(exc) from None

    def final_text(self) -> str:
        text = self.gw.backend.decode(self.tokens)
        cut = [text.index(s) for s in self.params.stop if s in text]
        return text[: min(cut)] if cut else text

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": len(self.ids), "completion_tokens": len(self.tokens),
                "total_tokens": len(self.ids) + len(self.tokens)}

    # -- logprobs ------------------------------------------------------------------------
    def _piece(self, token: int) -> str:
        return self.gw.backend.decode([token])

    def chat_logprobs(self, steps: list[TokenStep]) -> dict[str, Any]:
        def entry(t: int, lp: float) -> dict[str, Any]:
            piece = self._piece(t)
            return {"token": piece, "logprob": lp, "bytes": list(piece.encode())}

        return {"content": [{**entry(s.token, s.logprob or 0.0),
                             "top_logprobs": [entry(t, lp) for t, lp in s.top]} for s in steps]}

    def text_logprobs(self, steps: list[TokenStep], offset: int) -> dict[str, Any]:
        pieces = [self._piece(s.token) for s in steps]
        offsets = []
        for p in pieces:
            offsets.append(offset)
            offset += len(p)
        return {"tokens": pieces, "token_logprobs": [s.logprob for s in steps],
                "top_logprobs": [{self._piece(t): lp for t, lp in s.top} for s in steps],
                "text_offset": offsets}

    # -- whole response ------------------------------------------------------------------
    async def complete(self) -> dict[str, Any]:
        try:
            for attempt in range(2):
                try:
                    async for _ in self.steps_iter():
                        pass
                    await self._settle()
                    break
                except ApiError as exc:
                    if exc.code != "output_retracted" or attempt:
                        raise
                    await self._restart()
        finally:
            await self.close()
        text = self.final_text()
        name = model_name(self.gw.backend.model_id)
        if self.req.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": self.chat_logprobs(self.steps) if self.req.logprobs else None,
                                      "finish_reason": self.finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": self.finish,
                      "logprobs": self.text_logprobs(self.steps, 0) if self.req.logprobs else None}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": name, "choices": [choice],
                "usage": self.usage(), "pymesh_verification": self.verification()}

    # -- streaming -----------------------------------------------------------------------
    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        obj = "chat.completion.chunk" if self.req.chat else "text_completion"
        body = {"id": self.id, "object": obj, "created": self.created,
                "model": model_name(self.gw.backend.model_id), "choices": choices, **extra}
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"

    def _delta(self, text: str, steps: list[TokenStep], offset: int, *, first: bool) -> dict[str, Any]:
        if self.req.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
            c: dict[str, Any] = {"index": 0, "delta": delta}
            if self.req.logprobs:
                c["logprobs"] = self.chat_logprobs(steps)
            return c
        c = {"index": 0, "text": text}
        if self.req.logprobs:
            c["logprobs"] = self.text_logprobs(steps, offset)
        return c

    async def sse(self) -> AsyncIterator[str]:
        """``data: {chunk}`` events: the role first, text deltas with no null fields, a final chunk
        with finish_reason, the usage chunk when asked, then ``data: [DONE]``."""
        from pymesh.model.sampling import StopText

        try:
            decoder = self.gw.backend.stream_decoder()
            stop_text = StopText(self.params.stop)
            first, sent, pending = True, 0, []
            if self.req.chat:
                yield self._chunk([self._delta("", [], 0, first=True)])
                first = False
            try:
                async for step in self.steps_iter():
                    pending.append(step)
                    text = stop_text.push(decoder.push(step.token))
                    if text or (self.req.logprobs and not stop_text.stopped):
                        yield self._chunk([self._delta(text, pending, sent, first=first)])
                        first, sent, pending = False, sent + len(text), []
                tail = stop_text.push(decoder.flush()) + stop_text.flush()
                await self._settle()
            except ApiError as exc:
                yield f"data: {json.dumps(exc.body())}\n\n"
                return
            if tail:
                yield self._chunk([self._delta(tail, [], sent, first=first)])
            end: dict[str, Any] = ({"index": 0, "delta": {}, "finish_reason": self.finish} if self.req.chat
                                   else {"index": 0, "text": "", "finish_reason": self.finish})
            yield self._chunk([end], pymesh_verification=self.verification())
            if self.req.include_usage:
                yield self._chunk([], usage=self.usage())
            yield "data: [DONE]\n\n"
        finally:
            await self.close()
