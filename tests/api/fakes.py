"""A fake backend (characters as tokens) and an in-process ASGI caller for the API's unit tests."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

import trio

from pymesh.api.backend import RunInfo, TokenStep
from pymesh.model.sampling import SamplingParams

REPLY = "Hello world! This is pymesh."
EOS = 3


class CharDecoder:
    def push(self, token: int) -> str:
        return "" if token == EOS else chr(token)

    def flush(self) -> str:
        return ""


@dataclass
class FakeBackend:
    model_id: str = "tiny@abcdef0123"
    max_context: int = 200
    reply: str = REPLY
    error: BaseException | None = None
    step_delay: float = 0.0
    cache: tuple[int, int] | None = None     # (tokens, layer) of the smallest largest cache
    opened: int = 0
    closed: int = 0
    started: trio.Event = field(default_factory=trio.Event)

    def encode_prompt(self, prompt: str, messages: list[dict[str, str]] | None) -> list[int]:
        text = prompt if messages is None else "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids if i != EOS)

    def stream_decoder(self) -> CharDecoder:
        return CharDecoder()

    def stop_check(self, stop: Sequence[str]) -> Any:
        return lambda ids: any(s in self.decode(ids) for s in stop)

    @property
    def eos_ids(self) -> set[int]:
        return {EOS}

    async def tokens(self, ids: list[int], params: SamplingParams, top_logprobs: int | None,
                     info: RunInfo) -> AsyncIterator[TokenStep]:
        if self.error is not None:
            raise self.error
        self.opened += 1
        self.started.set()
        try:
            for i, tok in enumerate([ord(c) for c in self.reply] + [EOS]):
                if i >= params.max_new_tokens:
                    return
                await trio.sleep(self.step_delay)
                top = [(tok, -0.25), (ord("?"), -2.0)][: top_logprobs or 0]
                yield TokenStep(tok, -0.25 if top_logprobs is not None else None, top)
        finally:
            self.closed += 1

    def cache_limit(self) -> tuple[int, int] | None:
        return self.cache

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_id, "blocks": 3, "blocks_covered": 3, "missing_layer": None,
                "workers": 2}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[str]:
        return [line[6:] for line in self.body.decode().split("\n\n") if line.startswith("data: ")]


async def call(app: Any, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None,
               raw: bytes | None = None, disconnect_after: int | None = None) -> Reply:
    """One request through the ASGI app; ``disconnect_after``: the client goes away after this
    many body chunks."""
    data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    hdrs = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    hdrs.append((b"content-length", str(len(data)).encode()))
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": method, "path": path, "raw_path": path.encode(), "query_string": b"", "headers": hdrs,
             "scheme": "http", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 1234), "root_path": ""}
    sent = False
    gone = trio.Event()
    out: dict[str, Any] = {"status": 0, "headers": {}, "chunks": []}

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": data, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
            out["headers"] = {k.decode(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body" and message.get("body"):
            out["chunks"].append(message["body"])
            if disconnect_after is not None and len(out["chunks"]) >= disconnect_after:
                gone.set()
        await trio.sleep(0)

    await app(scope, receive, send)
    return Reply(out["status"], out["headers"], b"".join(out["chunks"]))
