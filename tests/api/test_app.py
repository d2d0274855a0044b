"""The API's request parsing, response shapes, errors, queue and disconnects, in process (fake backend)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from pymesh.api.app import build_app
from pymesh.api.metrics import Metrics
from pymesh.api.schema import MAX_BODY_BYTES, ApiError, parse_request
from pymesh.api.service import Gateway
from pymesh.model.sampling import SamplingParams
from tests.api.fakes import REPLY, FakeBackend, Reply, call

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


def make(backend: FakeBackend | None = None, key: str | None = None, **kw: Any) -> tuple[Any, Gateway]:
    gw = Gateway(backend or FakeBackend(), SamplingParams(max_new_tokens=64), Metrics(), **kw)
    return build_app(gw, key), gw


def run(coro_fn: Any, *args: Any, **kw: Any) -> Any:
    async def main() -> Any:
        with trio.fail_after(20):
            return await coro_fn(*args, **kw)
    return trio.run(main)


def assert_error(r: Reply, status: int, *words: str) -> dict[str, Any]:
    assert r.status == status, r.body
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    for w in words:
        assert w in err["message"] or w == err["param"], err
    return err  # type: ignore[no-any-return]


def test_chat_completion_shape() -> None:
    app, _ = make()
    r = run(call, app, "POST", "/v1/chat/completions", CHAT)
    assert r.status == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": REPLY}
    assert choice["finish_reason"] == "stop"
    n_prompt = len("<user>hi")
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": len(REPLY) + 1,
                             "total_tokens": n_prompt + len(REPLY) + 1}


def test_length_stop_and_full_model_id() -> None:
    app, _ = make()
    r = run(call, app, "POST", "/v1/chat/completions", {**CHAT, "model": "tiny@abcdef0123", "max_tokens": 5})
    assert r.json()["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": REPLY[:5]},
                                      "logprobs": None, "finish_reason": "length"}
    r = run(call, app, "POST", "/v1/completions", {"model": "tiny", "prompt": "x", "stop": ["is"]})
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == REPLY[: REPLY.index("is")] and body["choices"][0]["finish_reason"] == "stop"


def test_streaming_chunks() -> None:
    app, _ = make()
    r = run(call, app, "POST", "/v1/chat/completions",
            {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert "content-length" not in r.headers  # a length would make clients read nothing
    events = r.events()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({(c["id"], c["created"]) for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"

    def no_nulls(x: Any) -> None:
        if isinstance(x, dict):
            for v in x.values():
                assert v is not None, chunks
                no_nulls(v)
        elif isinstance(x, list):
            for v in x:
                no_nulls(v)
    no_nulls(chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == REPLY
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(REPLY) + 1


def test_streaming_stop_string_and_text_endpoint() -> None:
    app, _ = make()
    r = run(call, app, "POST", "/v1/completions", {"model": "tiny", "prompt": "x", "stream": True, "stop": "wor"})
    chunks = [json.loads(e) for e in r.events()[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello "
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_logprobs_shapes() -> None:
    app, _ = make()
    r = run(call, app, "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 3, "logprobs": True, "top_logprobs": 2})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == list(REPLY[:3])
    assert content[0]["logprob"] == -0.25 and content[0]["bytes"] == [ord("H")]
    assert [t["token"] for t in content[0]["top_logprobs"]] == ["H", "?"]
    r = run(call, app, "POST", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 3, "logprobs": 1})
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == list(REPLY[:3]) and lp["text_offset"] == [0, 1, 2] and lp["top_logprobs"][0] == {"H": -0.25}


@pytest.mark.parametrize("body,status,param", [
    ({**CHAT, "n": 2}, 400, "n"),
    ({**CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
    ({**CHAT, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({**CHAT, "frobnicate": 1}, 400, "frobnicate"),
    ({**CHAT, "temperature": "hot"}, 400, "temperature"),
    ({**CHAT, "messages": []}, 400, "messages"),
    ({**CHAT, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content"),
    ({**CHAT, "model": "gpt-4"}, 404, "model"),
    ({**CHAT, "max_tokens": 500}, 400, "max_tokens"),
    ({**CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options"),
])
def test_bad_requests(body: dict[str, Any], status: int, param: str) -> None:
    app, _ = make()
    err = assert_error(run(call, app, "POST", "/v1/chat/completions", body), status)
    assert err["param"] == param


def test_neutral_values_of_unsupported_fields_are_accepted() -> None:
    req = parse_request({**CHAT, "n": 1, "tools": None, "frequency_penalty": 0,
                         "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                   {"type": "text", "text": "b"}]}]}, chat=True)
    assert req.messages == [{"role": "user", "content": "ab"}]
    with pytest.raises(ApiError):
        parse_request({"model": "m", "prompt": ["a", "b"]}, chat=False)


def test_malformed_json_body_cap_and_routes() -> None:
    app, _ = make()
    assert_error(run(call, app, "POST", "/v1/chat/completions", raw=b"{not json"), 400, "JSON")
    assert_error(run(call, app, "POST", "/v1/chat/completions", raw=b"[1]"), 400)
    assert_error(run(call, app, "POST", "/v1/chat/completions", raw=b" " * (MAX_BODY_BYTES + 1)), 413, "limit")
    assert_error(run(call, app, "GET", "/v1/nothing"), 404)
    assert_error(run(call, app, "GET", "/v1/chat/completions"), 405)


def test_api_key() -> None:
    app, _ = make(key="s3cret")
    assert_error(run(call, app, "GET", "/v1/models"), 401)
    r = run(call, app, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert_error(r, 401)
    assert r.headers.get("www-authenticate") == "Bearer"
    r = run(call, app, "GET", "/v1/models", headers={"Authorization": "Bearer s3cret"})
    assert r.status == 200 and r.json()["data"][0]["id"] == "tiny"
    assert run(call, app, "GET", "/health").status == 200  # health and metrics need no key


def test_api_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import hmac

    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    app, _ = make(key="s3cret")
    run(call, app, "GET", "/v1/models", headers={"Authorization": "Bearer nope"})
    assert seen == [(b"nope", b"s3cret")]


def test_missing_layer_is_503_naming_it() -> None:
    from pymesh.client.routing import NoRouteError

    app, _ = make(FakeBackend(error=NoRouteError("no worker serves block 2 of tiny", 2)))
    err = assert_error(run(call, app, "POST", "/v1/chat/completions", {**CHAT, "stream": True}), 503, "layer 2")
    assert err["code"] == "no_route"


def test_refusal_is_429() -> None:
    from pymesh.client.session import SessionFailed

    app, _ = make(FakeBackend(error=SessionFailed("could not open a session on any route: every candidate "
                                                  "worker refused or failed")))
    assert_error(run(call, app, "POST", "/v1/chat/completions", CHAT), 429, "refused")


def test_beyond_every_workers_cache_is_400_naming_it() -> None:
    app, _ = make(FakeBackend(cache=(50, 2)))
    err = assert_error(run(call, app, "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 60}), 400, "layer 2")
    assert "50 tokens" in err["message"] and err["param"] == "max_tokens"
    assert run(call, app, "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 30}).status == 200


def test_no_free_cache_anywhere_is_429() -> None:
    from pymesh.client.routing import NoRouteError

    app, _ = make(FakeBackend(error=NoRouteError("no usable worker for layer 1: the workers serving it are "
                                                 "banned after failures or have no free cache; wait and retry", 1)))
    assert_error(run(call, app, "POST", "/v1/chat/completions", CHAT), 429, "layer 1")


def test_only_convicted_providers_is_503_naming_the_layer() -> None:
    from pymesh.client.routing import NoRouteError

    app, _ = make(FakeBackend(error=NoRouteError("every worker serving layer 1 (2) was convicted of wrong outputs "
                                                 "and is blocklisted: start or find another worker for layer 1", 1)))
    err = assert_error(run(call, app, "POST", "/v1/chat/completions", CHAT), 503, "layer 1")
    assert "convicted" in err["message"]


def test_queue_full_is_429() -> None:
    backend = FakeBackend(step_delay=0.05)
    app, gw = make(backend, max_active=1, max_waiting=1)

    async def main() -> list[int]:
        statuses: list[int] = []

        async def one() -> None:
            statuses.append((await call(app, "POST", "/v1/chat/completions", CHAT)).status)

        async with trio.open_nursery() as n:
            for _ in range(3):
                n.start_soon(one)
                await trio.sleep(0.01)
        return sorted(statuses)

    assert run(main) == [200, 200, 429]
    assert gw.slots.value == 1 and gw.waiting == 0


def test_disconnect_cancels_generation_and_closes_it() -> None:
    backend = FakeBackend(step_delay=0.05, reply="x" * 200)
    app, gw = make(backend, max_active=1)
    r = run(call, app, "POST", "/v1/chat/completions", {**CHAT, "stream": True, "max_tokens": 190},
            disconnect_after=4)
    assert len(r.events()) < 10 and "[DONE]" not in r.events()
    assert backend.opened == backend.closed == 1
    assert gw.slots.value == 1


def test_metrics_and_health() -> None:
    app, _ = make()
    run(call, app, "POST", "/v1/chat/completions", CHAT)
    text = run(call, app, "GET", "/metrics").body.decode()
    assert 'pymesh_api_requests_total{endpoint="chat",status="200"} 1.0' in text
    assert f"pymesh_api_generated_tokens_total {len(REPLY) + 1}.0" in text
    assert "pymesh_api_ttft_seconds_count 1.0" in text
    h = run(call, app, "GET", "/health").json()
    assert h["status"] == "ok" and h["workers"] == 2 and h["active"] == 0
