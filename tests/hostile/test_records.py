"""Record crowding and stale records (issue 11, item 6).

One address stores its whole per-source quota of validly signed records under keys that
sort before every honest worker's. Nodes used to page records in signer-key order and
readers fetched at most 64 pages from the 3 closest nodes, so the honest records never
reached a reader. Now nodes page round-robin across sources and readers drop records that
are stale or from the future whatever a store says.

``python -m tests.hostile.test_records`` (or ``python bench/hostile_dht.py``) prints the
measured rows: honest workers a reader finds under the crowding attack, and the
reply/query size of pm_get for spoofed and verified sources (issue 11, item 9).
"""

from __future__ import annotations

import socket
from contextlib import AsyncExitStack

import pytest
import trio

from pymesh.net.dht import DHTConfig, DHTNode
from pymesh.proto import krpc
from pymesh.proto.addr import PeerAddr
from pymesh.proto.dht_core import DHTCore
from pymesh.proto.identity import Identity
from pymesh.proto.records import WorkerRecord, model_target
from pymesh.proto.storage import RecordStore, StoredRecord

MODEL = "tiny@abc123"
ATTACKER_IP = "127.0.0.2"
NOW = 1_700_000_000.0


def identity_above(prefix: int) -> Identity:
    """An identity whose key sorts after every key below ``prefix`` (a few tries)."""
    for _ in range(10_000):
        ident = Identity.generate()
        if ident.peer_id.key[0] >= prefix:
            return ident
    raise AssertionError("could not grind a key")


def attacker_records(n: int, *, model: str = MODEL, below: int = 0xF0) -> list[bytes]:
    """``n`` valid records of ``n`` keys that all sort below ``below`` (the attacker's
    grinding, cheaply: honest keys are ground above it instead)."""
    out = []
    while len(out) < n:
        ident = Identity.generate()
        if ident.peer_id.key[0] < below:
            out.append(WorkerRecord(model_id=model, start=0, stop=4, host=ATTACKER_IP, port=9)
                       .signed(ident).to_bytes())
    return out


def can_bind(ip: str) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))
        return True
    except OSError:
        return False


# -- the store alone ------------------------------------------------------------------------

def test_store_pages_honest_sources_before_a_crowding_source() -> None:
    """Many fake signers from one source at its quota, keys ground low; five honest
    sources with high keys: a reader that stops after the old 64-page limit still sees
    every honest record (before: 0 of 5, signer order put them past page 85)."""
    rs = RecordStore()
    target = model_target(MODEL)
    for i in range(rs.max_per_source):
        assert rs.put(target, bytes([0, i // 256, i % 256]) + bytes(29), StoredRecord(
            b"a" * 280, NOW, NOW + 300, 0, 4, "10.66.0.1"), NOW)
    honest = {bytes([0xF0 + i]) * 32: bytes([0x41 + i]) * 280 for i in range(5)}
    for i, (signer, raw) in enumerate(honest.items()):
        assert rs.put(target, signer, StoredRecord(raw, NOW, NOW + 300, 0, 4, f"10.0.0.{i + 1}"), NOW)
    seen: list[bytes] = []
    after = b""
    for _ in range(64):
        page, nxt = rs.page(target, NOW, after=after, budget=950)
        seen += page
        if nxt is None:
            break
        assert nxt > after
        after = nxt
    assert set(honest.values()) <= set(seen)
    assert seen.index(max(honest.values())) < 12  # in the first round, not merely the 64th page


# -- real nodes on loopback ------------------------------------------------------------------

def cfg() -> DHTConfig:
    return DHTConfig(record_ttl=120.0, heartbeat=40.0, rpc_timeout=0.5, bootstrap_timeout=5.0)


async def swarm(stack: AsyncExitStack, n: int, ids: list[Identity]) -> list[DHTNode]:
    boot = await stack.enter_async_context(DHTNode(Identity.generate(), host="127.0.0.1", config=cfg()))
    nodes = [boot]
    for i in range(n - 1):
        ident = ids[i] if i < len(ids) else Identity.generate()
        nodes.append(await stack.enter_async_context(
            DHTNode(ident, host="127.0.0.1", bootstrap=[PeerAddr("127.0.0.1", boot.port)], config=cfg())))
    return nodes


async def flood(ports: list[int], raws: list[bytes], target: bytes) -> int:
    """Store ``raws`` from ATTACKER_IP on every node (token first, as anyone may); returns
    how many each node accepted, summed."""
    stored = 0
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        await s.bind((ATTACKER_IP, 0))

        async def ask(port: int, method: bytes, args: dict[bytes, object], tid: bytes) -> krpc.Response | None:
            await s.sendto(krpc.encode_query(tid, method, {b"id": b"\x01" * 20, **args}), ("127.0.0.1", port))
            with trio.move_on_after(2.0):
                while True:
                    data, _ = await s.recvfrom(2048)
                    msg = krpc.decode_message_untrusted(data)
                    if msg.tid == tid:
                        return msg if isinstance(msg, krpc.Response) else None
            return None

        for port in ports:
            got = await ask(port, b"pm_get", {b"target": target}, b"tk")
            assert got is not None
            token = got.values[b"token"]
            for i, raw in enumerate(raws):
                r = await ask(port, b"pm_put", {b"target": target, b"rec": raw, b"token": token},
                              i.to_bytes(2, "big"))
                stored += bool(r is not None and r.values.get(b"stored") == 1)
    return stored


async def crowded_read(n_honest: int = 3, n_attack: int = 256) -> tuple[int, int, int]:
    """(honest records a fresh reader finds, honest published, records the reader got in
    all) with one address storing ``n_attack`` low-key records on every node."""
    honest_ids = [identity_above(0xF0) for _ in range(n_honest)]
    target = model_target(MODEL)
    async with AsyncExitStack() as stack:
        nodes = await swarm(stack, 6, honest_ids)
        for node in nodes[1:1 + n_honest]:
            assert await node.publish_record(
                WorkerRecord(model_id=MODEL, start=0, stop=4, host="127.0.0.1", port=node.port)) >= 1
        stored = await flood([n.port for n in nodes], attacker_records(n_attack), target)
        assert stored >= n_attack * len(nodes) * 0.9, stored
        reader = await stack.enter_async_context(DHTNode(
            Identity.generate(), host="127.0.0.1", bootstrap=[PeerAddr("127.0.0.1", nodes[0].port)],
            config=cfg(), read_only=True))
        found = await reader.find_model_records(MODEL)
        keys = {r.peer_id.key for r in found}
        return sum(i.peer_id.key in keys for i in honest_ids), n_honest, len(found)


@pytest.mark.timeout(180)
def test_one_address_at_its_quota_cannot_hide_honest_workers() -> None:
    if not can_bind(ATTACKER_IP):
        pytest.skip(f"cannot bind {ATTACKER_IP} on this host")
    seen, honest, total = trio.run(crowded_read)
    assert seen == honest, f"the reader found {seen} of {honest} honest workers among {total} records"


@pytest.mark.timeout(120)
def test_reader_drops_stale_and_future_records_a_store_still_serves() -> None:
    """A store that keeps serving a record past its TTL (or one stamped in the future)
    cannot make a reader use it: the reader checks timestamps itself."""
    async def main() -> None:
        target = model_target(MODEL)
        async with AsyncExitStack() as stack:
            nodes = await swarm(stack, 4, [])
            await nodes[1].publish_record(WorkerRecord(model_id=MODEL, start=0, stop=4, host="127.0.0.1", port=1))
            now = nodes[0].clock.wall()
            stale_id, future_id = Identity.generate(), Identity.generate()
            for ident, ts in ((stale_id, now - 3 * cfg().record_ttl), (future_id, now + 3600)):
                rec = WorkerRecord(model_id=MODEL, start=0, stop=4, host="127.0.0.1", port=2).signed(ident, timestamp=ts)
                for node in nodes:  # a lying store: kept with a far expiry
                    node.core.records.put(target, rec.peer_id.key,
                                          StoredRecord(rec.to_bytes(), rec.timestamp, now + 1e6, 0, 4, "10.9.9.9"), now)
            reader = await stack.enter_async_context(DHTNode(
                Identity.generate(), host="127.0.0.1", bootstrap=[PeerAddr("127.0.0.1", nodes[0].port)],
                config=cfg(), read_only=True))
            found = await reader.find_model_records(MODEL)
            assert [r.peer_id for r in found] == [nodes[1].identity.peer_id]
    trio.run(main)


# -- measuring (bench/hostile_dht.py prints these) ---------------------------------------------

def amplification() -> dict[str, tuple[int, int]]:
    """(query bytes, reply bytes) of pm_get queries to a node holding 25 records and a full
    routing table: from a spoofed (unverified) address, minimal and padded to 480 bytes, and
    from an address that sent back its token."""
    core = DHTCore(b"\x55" * 20, now=NOW, record_ttl=300.0)
    for i in range(8):
        core.routing.heard_from(krpc.Contact(bytes([0x56, i]) * 10, (f"10.1.0.{i}", 6881)), NOW, responded=True)
    target = model_target(MODEL)
    honest = ("10.0.0.9", 4000)

    def ask(src: tuple[str, int], args: dict[bytes, object]) -> tuple[int, int, dict[bytes, object]]:
        data = krpc.encode_query(b"tx", b"pm_get" if b"rec" not in args else b"pm_put", {b"id": b"\x11" * 20, **args})
        reply = core.receive(data, src, NOW).reply
        assert reply is not None
        msg = krpc.decode_message_untrusted(reply)
        assert isinstance(msg, krpc.Response), msg
        return len(data), len(reply), dict(msg.values)

    token = ask(honest, {b"target": target})[2][b"token"]
    for i in range(25):
        raw = WorkerRecord(model_id=MODEL, start=i, stop=i + 1, host="10.0.0.9", port=9).signed(
            Identity.generate(), timestamp=NOW).to_bytes()
        ask(honest, {b"target": target, b"rec": raw, b"token": token})
    victim = ("10.66.0.1", 53)
    out = {}
    for name, src, args in (("spoofed, minimal query", victim, {b"target": target}),
                            ("spoofed, padded to 480 B", victim, {b"target": target, b"pad": bytes(390)}),
                            ("verified (token)", honest, {b"target": target, b"token": token})):
        q, r, _ = ask(src, args)
        out[name] = (q, r)
    return out


def rows() -> list[str]:
    """The measured rows: attack | setting | figure."""
    seen, honest, total = trio.run(crowded_read)
    out = [f"record crowding | one address stores 256 low-key records on every node | "
           f"reader saw {seen}/{honest} honest workers among {total} records"]
    for name, (q, r) in amplification().items():
        out.append(f"pm_get reflection | {name} | query {q} B -> reply {r} B | {r / q:.1f}x")
    return out


if __name__ == "__main__":
    print("\n".join(rows()))
