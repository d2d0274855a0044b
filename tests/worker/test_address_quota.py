"""Per-address cache quotas over real loopback sockets (issue 11, item 7).

Two keys on 127.0.0.1 each reserve half of a worker's cache (each exactly within its own
per-peer share, together twice the per-address share); a newcomer on 127.0.0.2 must get in,
taking an idle reservation of that address. Before connections carried their remote address
the worker saw no address, both keys were within their shares and the newcomer was refused.
"""

from __future__ import annotations

import pytest
import trio

from pymesh.net.rpc import Connection, RpcNode
from pymesh.proto import session_wire as wire
from pymesh.proto.identity import Identity, PeerID
from pymesh.worker.runtime import load_runtime
from pymesh.worker.service import WorkerService
from pymesh.worker.sessions import SessionTable
from tests.net.helpers import fast_config

pytestmark = pytest.mark.timeout(60)


async def _no_next(*args: object) -> None:
    return None


async def _newcomer(transport: str, port: int, worker: PeerID, nursery: trio.Nursery) -> Connection:
    """A client whose packets come from 127.0.0.2."""
    node = RpcNode(Identity.generate(), transport=transport, config=fast_config())
    await nursery.start(_enter, node)
    if transport == "quic":
        await node.listen("127.0.0.2", 0)  # a QUIC node dials from its listening socket
        return await node.connect("127.0.0.1", port, worker)
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.2")
    return await node.connect_stream(stream, worker)  # plain frames, as tcp-plain speaks


async def _enter(node: RpcNode, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    async with node:
        task_status.started()
        await trio.sleep_forever()


@pytest.mark.parametrize("transport", ["quic", "tcp-plain"])
def test_two_keys_on_one_address_share_its_quota(transport: str) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            wnode = RpcNode(Identity.generate(), transport=transport, config=fast_config())
            await nursery.start(_enter, wnode)
            table = SessionTable(1000, 300, lapse=300, share=0.5)
            svc = WorkerService(load_runtime(None, 0, 2, device="cpu", dtype_name="float32"), table,
                                model_id="echo", peer=wnode.peer_id, dial=_no_next,  # type: ignore[arg-type]
                                resolve_next=_no_next, hidden_size=None)  # type: ignore[arg-type]
            svc.register(wnode)
            await nursery.start(svc.run)
            port = await wnode.listen("127.0.0.1", 0)
            for i in range(2):  # two keys, one address: each within its own share
                node = RpcNode(Identity.generate(), transport=transport, config=fast_config())
                await nursery.start(_enter, node)
                conn = await node.connect("127.0.0.1", port, wnode.peer_id)
                await conn.call(wire.OPEN, wire.Open(bytes([i]) * 8, 500).to_meta(), timeout=10)
            assert table.free_tokens == 0
            assert [s.host for s in table.sessions.values()] == ["127.0.0.1", "127.0.0.1"]
            honest = await _newcomer(transport, port, wnode.peer_id, nursery)
            await honest.call(wire.OPEN, wire.Open(b"honest-session", 100).to_meta(), timeout=10)
            assert table.sessions[b"honest-session"].host == "127.0.0.2"
            assert table.evicted == 1
            nursery.cancel_scope.cancel()

    trio.run(main)
