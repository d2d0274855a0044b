"""Interop with libtorrent (an independent Mainline DHT implementation) on 127.0.0.1.

libtorrent runs in a subprocess (``lt_peer.py``) so its threads and sockets stay apart
from the trio loop. All waits are bounded.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from pymesh.demo.procs import free_port
from pymesh.errors import PeerUnavailable
from pymesh.net.dht import DHTConfig, DHTNode, DHTRemoteError
from pymesh.proto import krpc
from pymesh.proto.bencode import encode
from pymesh.proto.identity import Identity, verify_signature

lt = pytest.importorskip("libtorrent", reason="the libtorrent wheel is not installed (pip install libtorrent)")

PEER_SCRIPT = Path(__file__).with_name("lt_peer.py")


class LtPeer:
    def __init__(self, bootstrap: str = "") -> None:
        self.port = free_port(1)
        self.proc = subprocess.Popen([sys.executable, str(PEER_SCRIPT), str(self.port), bootstrap],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert json.loads(line) == {"ready": True}, line

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    async def request(self, **req: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = await trio.to_thread.run_sync(self.proc.stdout.readline)
        return dict(json.loads(line))

    def close(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.write('{"cmd": "quit"}\n')
                self.proc.stdin.flush()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def config() -> DHTConfig:
    return DHTConfig(rpc_timeout=2.0, bootstrap_timeout=5.0)


@pytest.mark.timeout(120)
def test_libtorrent_answers_pymesh_queries() -> None:
    peer = LtPeer()
    me = Identity.generate()

    async def main() -> None:
        async with DHTNode(me, host="127.0.0.1", config=config()) as node:
            addr = peer.addr
            for attempt in range(5):  # a loaded machine may delay libtorrent's first answer
                try:
                    r = await node.query(addr, b"ping")
                    break
                except PeerUnavailable:
                    if attempt == 4:
                        raise
            assert len(r.sender_id) == 20
            r = await node.query(addr, b"find_node", {b"target": me.node_id})
            assert isinstance(r.values.get(b"nodes", b""), bytes)
            # get_peers + announce_peer, then our announcement comes back.
            ih = hashlib.sha1(b"pymesh interop").digest()
            r = await node.query(addr, b"get_peers", {b"info_hash": ih})
            token = r.values[b"token"]
            assert isinstance(token, bytes)
            await node.query(addr, b"announce_peer", {b"info_hash": ih, b"port": 7001, b"token": token})
            r = await node.query(addr, b"get_peers", {b"info_hash": ih})
            assert ("127.0.0.1", 7001) in krpc.reply_peers_untrusted(r.values)
            # BEP 44 immutable put/get.
            v = b"pymesh immutable item"
            target = hashlib.sha1(encode(v)).digest()
            token = (await node.query(addr, b"get", {b"target": target})).values[b"token"]
            other = (await node.query(addr, b"get", {b"target": b"\x01" * 20})).values[b"token"]
            assert other != token  # libtorrent ties tokens to the target
            with pytest.raises(DHTRemoteError):
                await node.query(addr, b"put", {b"v": v, b"token": other})
            await node.query(addr, b"put", {b"v": v, b"token": token})
            assert (await node.query(addr, b"get", {b"target": target})).values[b"v"] == v
            # BEP 44 mutable put/get with salt; libtorrent checks our signature.
            salt = b"foobar"
            target = hashlib.sha1(me.public_key + salt).digest()

            async def put(value: object, seq: int, *, sig: bytes | None = None, cas: int | None = None) -> None:
                tok = (await node.query(addr, b"get", {b"target": target})).values[b"token"]
                args: dict[bytes, object] = {
                    b"v": value, b"k": me.public_key, b"seq": seq, b"salt": salt, b"token": tok,
                    b"sig": sig or me.sign(krpc.mutable_sign_input(encode(value), seq, salt))}
                if cas is not None:
                    args[b"cas"] = cas
                await node.query(addr, b"put", args)

            await put(b"Hello World!", 1)
            got = (await node.query(addr, b"get", {b"target": target})).values
            assert got[b"v"] == b"Hello World!" and got[b"seq"] == 1 and got[b"k"] == me.public_key
            assert verify_signature(me.public_key, got[b"sig"], b"4:salt6:foobar3:seqi1e1:v12:Hello World!")
            with pytest.raises(DHTRemoteError) as bad_sig:
                await put(b"forged", 2, sig=bytes(64))
            assert bad_sig.value.code == krpc.INVALID_SIGNATURE
            with pytest.raises(DHTRemoteError) as old:
                await put(b"older", 0)
            assert old.value.code == krpc.SEQ_TOO_OLD
            with pytest.raises(DHTRemoteError) as cas:
                await put(b"cas", 3, cas=7)
            assert cas.value.code == krpc.CAS_MISMATCH
            await put({b"n": 2}, 2, cas=1)
            got = (await node.query(addr, b"get", {b"target": target})).values
            assert got[b"v"] == {b"n": 2} and got[b"seq"] == 2
            # The same through the node's high-level calls.
            assert await node.get_item(target, salt=salt) == ({b"n": 2}, 2)

    try:
        trio.run(main)
    finally:
        peer.close()


@pytest.mark.timeout(180)
def test_libtorrent_nodes_meet_through_a_pymesh_bootstrap() -> None:
    me = Identity.generate()
    salt = b"pymesh-interop"
    value = {b"msg": b"stored by pymesh", b"n": 42}
    ih = hashlib.sha1(b"found through pymesh").digest()
    peers: list[LtPeer] = []

    async def main() -> None:
        async with DHTNode(me, host="127.0.0.1", config=config()) as boot:
            # Stored before any libtorrent node exists: only the pymesh node holds it.
            await boot.put_mutable(me, value, seq=5, salt=salt)
            contact = f"127.0.0.1:{boot.port}"
            a = LtPeer(contact)
            peers.append(a)
            b = LtPeer(contact)
            peers.append(b)
            # b announces itself; a finds b's announcement through the pymesh node.
            found: list[Any] = []
            with trio.move_on_after(60):
                while not found:
                    await b.request(cmd="announce", ih=ih.hex(), port=7777)
                    found = (await a.request(cmd="get_peers", ih=ih.hex(), timeout=5))["peers"]
            assert ["127.0.0.1", 7777] in found, found
            lt_addrs = {e.addr for e in boot.core.routing.all_nodes()}
            assert a.addr in lt_addrs and b.addr in lt_addrs
            # a reads the mutable item pymesh stored.
            got = await a.request(cmd="get_mutable", key=me.public_key.hex(), salt=salt.hex(), timeout=30)
            assert got["value"] is not None and bytes.fromhex(got["value"]) == encode(value)
            assert got["seq"] == 5

    try:
        trio.run(main)
    finally:
        for p in peers:
            p.close()
