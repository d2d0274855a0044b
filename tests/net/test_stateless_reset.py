"""A node restarted with the same identity and port ends its predecessor's QUIC connections
at once (RFC 9000 stateless reset, tokens from the identity key), so calls and pushes on
them fail with PeerUnavailable instead of vanishing until the idle timeout; over TCP the
kernel's FIN/RST does the same for a dead process.

Before the reset tokens, the call and push below hung until aioquic's idle timeout (42 s
with idle_timeout=60) and the push returned as if delivered.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import signal
import socket
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from pymesh.errors import PeerUnavailable
from pymesh.net.rpc import CallContext, Connection, RpcNode
from pymesh.proto.frames import Meta, TensorBlob
from pymesh.proto.identity import Identity
from pymesh.proto.reset_tokens import (MAX_RESET_SIZE, MIN_RESET_SIZE, TOKEN_SIZE, ResetTokens, build_reset,
                                       reset_secret, reset_token_untrusted)
from tests.net.helpers import fast_config
from tests.net.test_liveness import start_server

IDLE = 60.0          # aioquic's idle timer: 42 s; every bound below is far under it
BOUND = 5.0


async def echo(ctx: CallContext, meta: Meta, tensors: list[TensorBlob]) -> tuple[Meta, list[TensorBlob]]:
    return meta, tensors


def _crash(node: RpcNode) -> None:
    """From now on nothing leaves ``node``'s UDP socket: leaving its ``async with`` then
    drops its state like a killed process (no CONNECTION_CLOSE reaches the peer)."""
    endpoint = node._endpoint
    assert endpoint is not None
    endpoint._send_one = lambda data, addr, segment: None  # type: ignore[method-assign]


@asynccontextmanager
async def restarted_server(client: RpcNode) -> AsyncIterator[tuple[RpcNode, Connection, int]]:
    """A server that served ``client`` once, crashed, and came back with the same identity
    and port; yields (new server, the client's connection to the old one, port)."""
    ident = Identity.generate()
    cfg = fast_config(idle_timeout=IDLE)
    async with RpcNode(ident, transport="quic", config=cfg) as old:
        old.register("echo", echo)
        port = await old.listen("127.0.0.1", 0)
        conn = await client.connect("127.0.0.1", port, ident.peer_id)
        meta, _ = await conn.call("echo", {"before": 1}, timeout=10)
        assert meta == {"before": 1}
        _crash(old)
    async with RpcNode(ident, transport="quic", config=cfg) as new:
        new.register("echo", echo)
        await new.listen("127.0.0.1", port)
        assert not conn.closed, "the old connection must still look open (nothing told the client)"
        yield new, conn, port


@pytest.mark.timeout(60)
@pytest.mark.parametrize("use", ["call", "push"])
def test_call_or_push_on_a_restarted_peers_connection_fails_fast(use: str) -> None:
    """A call waits for its reply, a push for the peer's acknowledgement: on the dead
    connection both raise PeerUnavailable at the reset, far below the idle timeout."""
    async def main() -> None:
        async with RpcNode(Identity.generate(), transport="quic", config=fast_config(idle_timeout=IDLE)) as client:
            async with restarted_server(client) as (new, conn, port):
                t0 = time.monotonic()
                with trio.fail_after(20), pytest.raises(PeerUnavailable, match="reset"):
                    if use == "call":
                        await conn.call("echo", {"after": 1})
                    else:
                        await conn.push("step", {"n": 1}, [TensorBlob("uint8", (64,), memoryview(bytes(64)))])
                assert time.monotonic() - t0 < BOUND
                assert conn.closed
                assert new._endpoint is not None and new._endpoint.counters["resets_sent"] >= 1
                fresh = await client.connect("127.0.0.1", port, new.peer_id)  # reaches the new process
                assert fresh is not conn
                meta, _ = await fresh.call("echo", {"again": 1}, timeout=10)
                assert meta == {"again": 1}

    trio.run(main)


@pytest.mark.timeout(60)
def test_a_restarted_dialer_resets_the_connection_it_had_opened() -> None:
    """The restarted node had dialed (a worker pushing to the next): the peer's inbound
    connection uses the dialer's connection IDs, and a client's first ID has no reset
    token, so the server moves to the next ID the client issues (which has one)."""
    async def main() -> None:
        cfg = fast_config(idle_timeout=IDLE)
        ident = Identity.generate()
        async with RpcNode(Identity.generate(), transport="quic", config=cfg) as server:
            server.register("echo", echo)
            server_port = await server.listen("127.0.0.1", 0)
            async with RpcNode(ident, transport="quic", config=cfg) as dialer:
                dialer.register("echo", echo)
                port = await dialer.listen("127.0.0.1", 0)   # dials from its listening socket
                conn = await dialer.connect("127.0.0.1", server_port, server.peer_id)
                await conn.call("echo", {"x": 1}, timeout=10)
                inbound = server.connections()[0]
                await inbound.call("echo", {"back": 1}, timeout=10)   # the server's side works too
                _crash(dialer)
            async with RpcNode(ident, transport="quic", config=cfg) as again:
                await again.listen("127.0.0.1", port)
                t0 = time.monotonic()
                with trio.fail_after(20), pytest.raises(PeerUnavailable, match="reset"):
                    await inbound.call("echo", {"after": 1})
                assert time.monotonic() - t0 < BOUND

    trio.run(main)


@pytest.mark.timeout(60)
def test_resets_are_smaller_than_their_trigger_rate_limited_and_carry_the_identity_token() -> None:
    async def main() -> None:
        ident = Identity.generate()
        async with RpcNode(ident, transport="quic", config=fast_config()) as node:
            port = await node.listen("127.0.0.1", 0)
            endpoint = node._endpoint
            assert endpoint is not None
            tokens = ResetTokens(reset_secret(_raw(ident)))
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            await sock.bind(("127.0.0.1", 0))
            replies: list[bytes] = []
            cid = os.urandom(8)
            for size in (10, 21, 22, 40, 60, 1200):       # a short header for an unknown CID
                await sock.sendto(bytes([0x41]) + cid + os.urandom(size - 9), ("127.0.0.1", port))
                with trio.move_on_after(1):
                    data, _ = await sock.recvfrom(2048)
                    replies.append(data)
            sizes = [len(d) for d in replies]
            assert sizes == [21, 39, 43, 43], sizes   # none for 10 or 21 bytes: a reset must be smaller
            assert all(d[-TOKEN_SIZE:] == tokens.token(cid) and d[0] & 0xC0 == 0x40 for d in replies)
            before = endpoint.counters["resets_sent"]
            for _ in range(1000):                          # a flood: at most ~RESETS_PER_SECOND answered
                await sock.sendto(bytes([0x41]) + os.urandom(60), ("127.0.0.1", port))
            await trio.sleep(0.5)
            assert endpoint.counters["resets_sent"] - before <= 200
            assert endpoint.counters["resets_limited"] >= 700
            sock.close()

    trio.run(main)


def _raw(ident: Identity) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return ident.private_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                           serialization.NoEncryption())


def test_tokens_depend_on_identity_and_cid_only() -> None:
    a, b = Identity.generate(), Identity.generate()
    ta, tb = ResetTokens(reset_secret(_raw(a))), ResetTokens(reset_secret(_raw(a)))
    assert ta.token(b"12345678") == tb.token(b"12345678") != ta.token(b"12345679")
    assert ResetTokens(reset_secret(_raw(b))).token(b"12345678") != ta.token(b"12345678")
    # the secret is not the key, and the token is not a plain hash of the CID
    assert reset_secret(_raw(a)) != _raw(a)
    assert ta.token(b"x") != hmac.new(_raw(a), b"x", hashlib.sha256).digest()[:16]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1500))
def test_reset_token_untrusted_never_raises(data: bytes) -> None:
    token = reset_token_untrusted(data)
    if token is not None:
        assert len(token) == TOKEN_SIZE and len(data) >= MIN_RESET_SIZE and data[0] & 0xC0 == 0x40


@given(st.integers(min_value=0, max_value=70_000))
def test_build_reset_is_always_smaller_than_its_trigger(size: int) -> None:
    reset = build_reset(bytes(16), size)
    if reset is None:
        assert size - 1 < MIN_RESET_SIZE
    else:
        assert MIN_RESET_SIZE <= len(reset) < size and len(reset) <= MAX_RESET_SIZE


# ------------------------------------------------------------------------------ TCP


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["tcp", "quic"])
def test_push_to_a_killed_process_raises(transport: str) -> None:
    """The peer's process is SIGKILLed: its kernel closes the socket (FIN, then RST to more
    data) over TCP; over QUIC nobody answers. A push then raises PeerUnavailable within the
    idle timeout (TCP: at once) instead of returning as if delivered."""
    proc, port, peer = start_server(transport)
    try:
        async def main() -> None:
            cfg = fast_config(idle_timeout=2.0)
            async with RpcNode(Identity.generate(), transport=transport, config=cfg) as node:
                conn = await node.connect("127.0.0.1", port, peer)
                meta, _ = await conn.call("echo", {"a": 1}, timeout=10)
                assert meta == {"a": 1}
                proc.send_signal(signal.SIGKILL)
                await trio.to_thread.run_sync(proc.wait)
                await trio.sleep(0.2)  # TCP: the dead process's FIN is here; the reader has seen it
                t0 = time.monotonic()
                # A dead process acknowledges nothing: the very first push must raise, not
                # return as if delivered (before: QUIC pushes 'succeeded' until the idle timeout).
                with trio.fail_after(30), pytest.raises(PeerUnavailable):
                    await conn.push("sink", {"n": 1}, [TensorBlob("uint8", (16,), memoryview(bytes(16)))])
                limit = 1.0 if transport == "tcp" else cfg.idle_timeout + 2.0
                assert time.monotonic() - t0 < limit
                assert conn.closed
        trio.run(main)
    finally:
        proc.kill()
        proc.wait()

