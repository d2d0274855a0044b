"""A DHT node that lives as long as a local swarm, in its own trio thread.

Synchronous code (the demo, tests) asks it for records through
``trio.from_thread``. Keeping one node up for the swarm's whole life matters: a node
that joins, leaves and rejoins under new identities leaves dead contacts in the other
nodes' routing tables, and every lookup then waits out an RPC timeout on them.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import trio

from pymesh.demo.procs import DemoError
from pymesh.proto.addr import PeerAddr
from pymesh.proto.identity import Identity
from pymesh.settings import Settings

if TYPE_CHECKING:
    from pymesh.net.dht import DHTNode
    from pymesh.proto.records import WorkerRecord

log = logging.getLogger(__name__)


class Observer:
    """``start()`` once, ``list_records()`` from any non-trio thread, ``close()`` at the end."""

    def __init__(self, bootstrap: PeerAddr, *, host: str = "127.0.0.1", settings: Settings | None = None) -> None:
        self.bootstrap = bootstrap
        self.host = host
        self.settings = settings or Settings()
        self.identity = Identity.generate()
        self._token: trio.lowlevel.TrioToken | None = None
        self._node: DHTNode | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> None:
        self._thread = threading.Thread(target=self._run, name="pymesh-observer", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise DemoError(f"the observer's DHT node did not start within {timeout:.0f}s")
        if self._error is not None:
            raise DemoError(f"the observer's DHT node failed to start: {self._error}")

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported to start() or logged; the thread just ends
            self._error = exc
            log.debug("observer stopped with an error", exc_info=True)
        finally:
            self._ready.set()

    async def _main(self) -> None:
        from pymesh.net.dht import DHTNode

        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        # read-only (BEP 43): it only looks records up and must not linger in routing tables
        async with DHTNode(self.identity, host=self.host, port=0, bootstrap=[self.bootstrap],
                           config=self.settings.dht_config(), read_only=True) as node:
            self._node = node
            self._ready.set()
            await self._stop.wait()

    def list_records(self, timeout: float) -> list[WorkerRecord] | None:
        """Every record in the DHT, or None when the lookup took longer than ``timeout``."""
        if self._token is None or self._node is None:
            raise DemoError("the observer is not running")
        node = self._node

        async def query() -> list[WorkerRecord] | None:
            with trio.move_on_after(timeout):
                return list(await node.list_records(None))
            return None

        return trio.from_thread.run(query, trio_token=self._token)

    def close(self) -> None:
        if self._token is not None and self._stop is not None and self._thread is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
            self._thread.join(timeout=10.0)
        self._token = None
