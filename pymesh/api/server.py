"""Serving the app: hypercorn's trio worker in the trio process that holds the swarm client."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from pymesh.api.backend import SwarmBackend
from pymesh.api.metrics import Metrics
from pymesh.api.service import Gateway
from pymesh.errors import ConfigError

if TYPE_CHECKING:
    from pymesh.client.blocklist import Blocklist
    from pymesh.model.sampling import SamplingParams
    from pymesh.proto.allowlist import PeerAllowlist
    from pymesh.proto.identity import Identity
    from pymesh.settings import Settings

log = logging.getLogger("pymesh.api")


@dataclass
class ServeOptions:
    bootstrap: list[str]
    model_path: Path
    listen: str = "127.0.0.1:8000"
    model_name: str | None = None
    #: ``--quantize``: the head's block format, and the suffix of the model id routes match
    quantize: str | None = None
    transport: str = "quic"
    device: str = "cpu"
    dtype: str = "float32"
    api_key: str | None = None
    max_active: int = 16
    max_waiting: int = 32
    settings: Settings | None = None
    allow_peers: PeerAllowlist | None = None
    identity: Identity | None = None
    blocklist: Blocklist | None = None   # convicted workers (never routed through; new ones added)


def read_api_key(path: str | None, env_value: str | None) -> str | None:
    """The key from ``--api-key-file`` (first line) or ``PYMESH_API_KEY``; never from a flag."""
    if path is not None:
        try:
            key = Path(path).read_text().strip().splitlines()
        except OSError as exc:
            raise ConfigError(f"--api-key-file {path}: {exc.strerror}") from None
        if not key or not key[0].strip():
            raise ConfigError(f"--api-key-file {path} is empty; put the key on its first line")
        return key[0].strip()
    return env_value or None


def hypercorn_config(listen: str) -> Any:
    from hypercorn.config import Config

    config = Config()
    config.bind = [listen]
    config.accesslog = None
    config.errorlog = None  # its lines reach pymesh's log through the root logger
    config.keep_alive_timeout = 75
    return config


async def serve(options: ServeOptions, defaults: SamplingParams, *,
                task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Join the swarm and serve the API until cancelled; ``task_status`` gets the bound URLs."""
    from hypercorn.trio import serve as hypercorn_serve

    from pymesh.api.app import build_app
    from pymesh.client.generation import ClientModel
    from pymesh.client.swarm import Swarm

    model = ClientModel(options.model_path, device=options.device, dtype=options.dtype,
                        model_name=options.model_name, quantize=options.quantize)
    async with Swarm(options.bootstrap, model.model_id, transport=options.transport, settings=options.settings,
                     allow_peers=options.allow_peers, identity=options.identity,
                     blocklist=options.blocklist) as swarm:
        metrics = Metrics()
        metrics.watch(model.batcher)
        gateway = Gateway(SwarmBackend(swarm, model), defaults, metrics, max_active=options.max_active,
                          max_waiting=options.max_waiting)
        app = build_app(gateway, options.api_key)
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(_serve_http, hypercorn_serve, app, options.listen)
            log.info("pymesh serve: OpenAI-compatible API for %s at %s/v1", model.model_id, urls[0])
            task_status.started(urls)


async def _serve_http(hypercorn_serve: Any, app: Any, listen: str,
                      task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    try:
        await hypercorn_serve(app, hypercorn_config(listen), task_status=task_status)
    except* (OSError, OverflowError) as group:
        raise ConfigError(f"--listen {listen}: cannot listen there ({_first_leaf(group)}); give a free "
                          "HOST:PORT") from None


def serve_until_signal(options: ServeOptions, defaults: SamplingParams, on_started: Any) -> bool:
    """``trio.run`` of :func:`serve` until SIGINT or SIGTERM (a clean shutdown: open sessions
    closed, the swarm node left); ``on_started(urls)`` once listening. True if a signal ended it."""
    import signal

    stopped = False

    async def main() -> None:
        nonlocal stopped
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                urls = await nursery.start(serve, options, defaults)
                on_started(urls)
                async for _ in signals:
                    stopped = True
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        # errors raised in the nurseries arrive wrapped: a pymesh error (a bad model folder,
        # an unusable address) is reported as itself, one line
        from pymesh.errors import PymeshError

        mine = group.split(PymeshError)[0]
        if mine is not None:
            raise _first_leaf(mine) from None
        raise
    return stopped


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
