"""Python API: generate through the swarm from synchronous code or from trio.

From trio::

    async with SwarmClient(["127.0.0.1:9000"], "path/to/model") as client:
        async for token in client.agenerate("Hello", SamplingParams(max_new_tokens=20)):
            ...

From synchronous code (trio runs in a background thread)::

    with SwarmClient(["127.0.0.1:9000"], "path/to/model") as client:
        for token in client.generate("Hello", SamplingParams(max_new_tokens=20)):
            ...
"""

from __future__ import annotations

import threading
from types import TracebackType
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncGenerator, Iterator, Sequence

import trio

from pymesh.client.blocklist import Blocklist
from pymesh.client.generation import ClientModel, GenerationStats, generate_tokens
from pymesh.client.swarm import Swarm
from pymesh.proto.allowlist import PeerAllowlist
from pymesh.proto.identity import Identity
from pymesh.settings import Settings

if TYPE_CHECKING:
    from pymesh.model.sampling import SamplingParams

class SwarmClient:
    def __init__(
        self,
        bootstrap: list[str],
        model_path: str | Path | None = None,
        *,
        model_name: str | None = None,
        transport: str = "quic",
        device: str = "cpu",
        dtype: str = "float32",
        settings: Settings | None = None,
        allow_peers: PeerAllowlist | None = None,
        identity: Identity | None = None,
        blocklist: Blocklist | None = None,
        quantize: str | None = None,
    ) -> None:
        if model_path is None:
            raise ValueError("SwarmClient needs model_path (the client loads embeddings, head and tokenizer)")
        self.bootstrap = list(bootstrap)
        self.model = ClientModel(model_path, device=device, dtype=dtype, model_name=model_name, quantize=quantize)
        self.transport = transport
        self.settings = settings
        #: route only through these workers (None: an open swarm)
        self.allow_peers = allow_peers
        #: this client's key (a private swarm's workers serve only listed clients); None: a fresh one
        self.identity = identity
        #: convicted workers: never routed through, new convictions added (None: this process only)
        self.blocklist = blocklist
        self.last_stats: GenerationStats | None = None
        self._swarm: Swarm | None = None
        # sync flavour: a trio loop in a thread, fed through a call queue
        self._thread: threading.Thread | None = None
        self._portal: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # -- trio flavour ----------------------------------------------------------------------
    async def __aenter__(self) -> "SwarmClient":
        self._swarm = Swarm(self.bootstrap, self.model.model_id, transport=self.transport, settings=self.settings,
                            allow_peers=self.allow_peers, identity=self.identity, blocklist=self.blocklist)
        await self._swarm.__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._swarm is not None:
            await self._swarm.__aexit__(exc_type, exc, tb)
            self._swarm = None

    async def agenerate(self, prompt: str | Sequence[int], params: SamplingParams, *, chat: bool = False,
                        stats: GenerationStats | None = None) -> AsyncGenerator[int, None]:
        """Yield token ids. Generations may run at once from several tasks (or threads, with
        :meth:`generate`): each is a session of its own, their LM head passes are batched.
        ``stats``: filled in as it goes (else a new one, also :attr:`last_stats`)."""
        if self._swarm is None:
            raise RuntimeError("use `async with SwarmClient(...)` before agenerate()")
        stats = stats if stats is not None else GenerationStats()
        self.last_stats = stats
        ids = self.model.prompt_ids(prompt, chat)
        async for token in generate_tokens(self._swarm, self.model, ids, params, stats=stats):
            yield token

    # -- sync flavour ----------------------------------------------------------------------
    def __enter__(self) -> "SwarmClient":
        self._thread = threading.Thread(target=self._thread_main, name="pymesh-client", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._portal is not None and self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._portal)
            except trio.RunFinishedError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _thread_main(self) -> None:
        async def main() -> None:
            self._stop = trio.Event()
            self._portal = trio.lowlevel.current_trio_token()
            try:
                async with self:
                    self._ready.set()
                    await self._stop.wait()
            finally:
                self._ready.set()

        try:
            trio.run(main)
        except BaseException as exc:  # surfaced to the caller of __enter__/generate
            self._error = exc
            self._ready.set()

    def generate(self, prompt: str | Sequence[int], params: SamplingParams, *, chat: bool = False,
                 stats: GenerationStats | None = None) -> Iterator[int]:
        """Yield token ids as they are generated; the generation runs in the client's trio thread.

        The producer waits for each token to be taken (an unbuffered channel), so the
        caller's pace is the generation's pace; leaving the loop early cancels it.
        """
        token_ = self._portal
        if token_ is None:
            raise RuntimeError("use `with SwarmClient(...)` before generate()")
        send, recv = trio.open_memory_channel[tuple[str, Any]](0)
        scope = trio.CancelScope()

        async def produce() -> None:
            async with send:
                with scope:
                    try:
                        async for token in self.agenerate(prompt, params, chat=chat, stats=stats):
                            await send.send(("token", token))
                    except Exception as exc:
                        await send.send(("error", exc))

        trio.from_thread.run_sync(lambda: trio.lowlevel.spawn_system_task(produce), trio_token=token_)
        try:
            while True:
                try:
                    kind, item = trio.from_thread.run(recv.receive, trio_token=token_)
                except trio.EndOfChannel:
                    return
                if kind == "error":
                    raise item
                yield item
        finally:
            try:
                trio.from_thread.run_sync(scope.cancel, trio_token=token_)
            except trio.RunFinishedError:
                pass


