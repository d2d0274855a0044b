"""Parsing OpenAI-style request bodies into :class:`CompletionRequest`; the error object.

Strict: a field we do not honour (``n > 1``, ``tools``, ``response_format``, ...) is a 400
naming it, never silently ignored; a field of the wrong type is a 400 naming it too. Every
parser here takes untrusted JSON (already size-capped by the app) and raises only
:class:`ApiError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

#: request bodies larger than this are refused with 413 before they are parsed
MAX_BODY_BYTES = 1 << 20
#: at most this many messages, stop strings, top logprobs
MAX_MESSAGES = 1024
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20

#: fields accepted (and honoured) on each endpoint
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop", "seed",
                 "stream", "stream_options", "user"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
TEXT_FIELDS = COMMON_FIELDS | {"prompt", "logprobs", "echo", "suffix", "n", "best_of"}
#: fields accepted when they hold their neutral value (what OpenAI's SDKs or UIs send by default)
NEUTRAL = {"n": 1, "best_of": 1, "echo": False, "suffix": None, "frequency_penalty": 0, "presence_penalty": 0,
           "logit_bias": None, "parallel_tool_calls": None, "tools": None, "tool_choice": None,
           "response_format": None, "functions": None, "function_call": None, "audio": None,
           "modalities": None, "prediction": None, "store": None, "metadata": None,
           "service_tier": None, "reasoning_effort": None}
ROLES = {"system", "user", "assistant", "developer"}


class ApiError(Exception):
    """An error answered to the HTTP client in OpenAI's error object shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind or _KINDS.get(status, "api_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


_KINDS = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


@dataclass
class CompletionRequest:
    """One parsed request: a chat (``messages``) or a text completion (``prompt``)."""

    chat: bool
    model: str
    messages: list[dict[str, str]] = field(default_factory=list)
    prompt: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0


def parse_json_untrusted(body: bytes) -> dict[str, Any]:
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data


def _number(data: dict[str, Any], name: str, lo: float, hi: float) -> float | None:
    v = data.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ApiError(400, f"'{name}' must be a number in [{lo}, {hi}]; got {v!r}", param=name)
    return float(v)


def _int(data: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    v = data.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ApiError(400, f"'{name}' must be an integer in [{lo}, {hi}]; got {v!r}", param=name)
    return v


def _bool(data: dict[str, Any], name: str) -> bool:
    v = data.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(400, f"'{name}' must be true or false; got {v!r}", param=name)
    return v


def _check_fields(data: dict[str, Any], allowed: set[str]) -> None:
    for name, value in data.items():
        if name in allowed:
            continue
        if name in NEUTRAL and value == NEUTRAL[name]:
            continue
        if name in NEUTRAL:
            raise ApiError(400, f"'{name}' is not supported by pymesh serve (got {value!r}); leave it out",
                           param=name, code="unsupported_parameter")
        raise ApiError(400, f"unknown field '{name}'; pymesh serve honours {', '.join(sorted(allowed))}",
                       param=name, code="unsupported_parameter")


def _stop(data: dict[str, Any]) -> list[str]:
    v = data.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if (not isinstance(stops, list) or len(stops) > MAX_STOP
            or any(not isinstance(s, str) or not s or len(s) > 256 for s in stops)):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them "
                            "(each up to 256 characters)", param="stop")
    return list(stops)


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}.content[{i}] must be a text part {{'type': 'text', 'text': ...}}; "
                                    "only text is supported", param=f"{where}.content")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"{where}.content must be a string or a list of text parts", param=f"{where}.content")


def _messages(data: dict[str, Any]) -> list[dict[str, str]]:
    msgs = data.get("messages")
    if not isinstance(msgs, list) or not msgs or len(msgs) > MAX_MESSAGES:
        raise ApiError(400, f"'messages' must be a non-empty list (at most {MAX_MESSAGES})", param="messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object with 'role' and 'content'", param=where)
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise ApiError(400, f"{where}.{sorted(extra)[0]} is not supported (only role and text content)",
                           param=f"{where}.{sorted(extra)[0]}")
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(sorted(ROLES))}; got {role!r}",
                           param=f"{where}.role")
        out.append({"role": "system" if role == "developer" else str(role), "content": _content(m.get("content"), where)})
    return out


def parse_request(data: dict[str, Any], *, chat: bool) -> CompletionRequest:
    """A :class:`CompletionRequest` from a decoded JSON body, or :class:`ApiError` (400)."""
    _check_fields(data, CHAT_FIELDS if chat else TEXT_FIELDS)
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required (see GET /v1/models)", param="model")
    req = CompletionRequest(chat=chat, model=model)
    if chat:
        req.messages = _messages(data)
        req.max_tokens = _int(data, "max_completion_tokens", 0, 1 << 20)
        req.logprobs = _bool(data, "logprobs")
        req.top_logprobs = _int(data, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
        if req.top_logprobs and not req.logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    else:
        prompt = data.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' must be a non-empty string (one prompt per request)", param="prompt")
        req.prompt = prompt
        k = _int(data, "logprobs", 0, MAX_TOP_LOGPROBS)
        req.logprobs, req.top_logprobs = k is not None, k or 0
    if req.max_tokens is None:
        req.max_tokens = _int(data, "max_tokens", 0, 1 << 20)
    req.temperature = _number(data, "temperature", 0.0, 2.0)
    req.top_p = _number(data, "top_p", 0.0, 1.0)
    if req.top_p == 0.0:
        raise ApiError(400, "'top_p' must be in (0, 1]", param="top_p")
    req.top_k = _int(data, "top_k", -1, 1 << 20)
    req.top_k = None if req.top_k == -1 else req.top_k
    req.repetition_penalty = _number(data, "repetition_penalty", 0.01, 10.0)
    req.seed = _int(data, "seed", -(1 << 63), (1 << 63) - 1)
    req.stop = _stop(data)
    req.stream = _bool(data, "stream")
    opts = data.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
            raise ApiError(400, "'stream_options' may hold only include_usage", param="stream_options")
        if not req.stream:
            raise ApiError(400, "'stream_options' is only allowed with stream: true", param="stream_options")
        req.include_usage = _bool(opts, "include_usage")
    return req
