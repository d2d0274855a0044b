"""The Starlette app of ``pymesh serve``: routes, API key, body cap, SSE with disconnect handling.

``build_app(gateway, api_key)`` returns an ASGI app; it runs on whatever async library
drives it (anyio): under hypercorn's trio worker it shares the trio loop of the swarm client.
"""

from __future__ import annotations

import hmac
from typing import Any, AsyncIterator

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from pymesh.api.schema import MAX_BODY_BYTES, ApiError, parse_json_untrusted, parse_request
from pymesh.api.service import Gateway, Run, model_name


def error_response(exc: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


class SSEResponse(Response):
    """``text/event-stream`` from an async iterator of event strings. A client that goes away
    (``http.disconnect``) cancels the iterator at once; its ``finally`` (closing the swarm
    sessions) runs either way, because the iterator is always closed here."""

    def __init__(self, events: AsyncIterator[str], on_close: Any) -> None:
        # not Response.__init__: that sets a body, and with it "content-length: 0"
        self.status_code = 200
        self.media_type = "text/event-stream"
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events = events
        self.on_close = on_close
        self.disconnected = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream(cancel: trio.CancelScope) -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for event in self.events:
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            cancel.cancel()

        async def watch(cancel: trio.CancelScope) -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.disconnected = True
            cancel.cancel()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream, nursery.cancel_scope)
                nursery.start_soon(watch, nursery.cancel_scope)
        finally:
            with trio.CancelScope(shield=True):
                await self.events.aclose()  # type: ignore[attr-defined]
                await self.on_close()


async def _read_body(request: Request) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body is {length} bytes; the limit is {MAX_BODY_BYTES}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is over the limit of {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(gateway: Gateway, api_key: str | None = None) -> Starlette:
    metrics = gateway.metrics
    key = api_key.encode() if api_key else None

    def check_key(request: Request) -> None:
        if key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip().encode() if auth[:7].lower() == "bearer " else b""
        if not hmac.compare_digest(given, key):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def answer(endpoint: str, request: Request, work: Any) -> Response:
        try:
            check_key(request)
            response: Response = await work(request)
        except ApiError as exc:
            response = error_response(exc)
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    async def models(request: Request) -> Response:
        async def work(request: Request) -> Response:
            mid = gateway.backend.model_id
            return JSONResponse({"object": "list", "data": [
                {"id": model_name(mid), "object": "model", "created": 0, "owned_by": "pymesh", "root": mid}]})
        return await answer("models", request, work)

    async def completions(request: Request, chat: bool) -> Response:
        async def work(request: Request) -> Response:
            req = parse_request(parse_json_untrusted(await _read_body(request)), chat=chat)
            run: Run = await gateway.start(req)
            if not req.stream:
                return JSONResponse(await run.complete())
            return SSEResponse(run.sse(), run.close)
        return await answer("chat" if chat else "completions", request, work)

    async def chat_route(request: Request) -> Response:
        return await completions(request, True)

    async def text_route(request: Request) -> Response:
        return await completions(request, False)

    async def health(request: Request) -> Response:
        try:
            with trio.move_on_after(10):
                info = await gateway.backend.health()
                info["active"] = gateway.max_active - gateway.slots.value
                info["waiting"] = gateway.waiting
                return JSONResponse(info, status_code=200 if info.get("missing_layer") is None else 503)
        except Exception as exc:  # health must answer, whatever the swarm does
            return JSONResponse({"status": "error", "error": str(exc)}, status_code=503)
        return JSONResponse({"status": "error", "error": "the DHT lookup timed out"}, status_code=503)

    async def prometheus(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_response(ApiError(404, f"no route {request.method} {request.url.path}"))

    async def bad_method(request: Request, exc: Exception) -> Response:
        return error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}"))

    routes = [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat_route, methods=["POST"]),
        Route("/v1/completions", text_route, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: bad_method})
