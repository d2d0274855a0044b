"""The identity handshake that runs on every new connection, after TLS.

1. server -> client  HELLO   {v: version, id: server key, n: 32-byte nonce}
2. client -> server  AUTH    {v: version, id: client key,
                              s: Ed25519 signature of ("pymesh-auth/1", server key, nonce, client key)}
3. server -> client  WELCOME {v: version}   or ERROR {c: "version" | "identity", x: why}

The client's certificate is never requested (aioquic cannot), so step 2 is how the
server learns who dialed it; the nonce makes the signature single-use. The client
already checked the server's certificate key against the peer ID it dialed.

Both sides read these frames with ``frames.HANDSHAKE_LIMITS`` (a few KiB of metadata, no
tensors): before the peer proved its key it can make this node hold almost nothing, and
a frame over the caps is a ``FrameError`` that drops the connection (a dialer reports it
as ``PeerUnavailable``, like a server that stalls past ``connect_timeout``).
"""

from __future__ import annotations

import logging
import os
from typing import Awaitable, Callable

from pymesh.errors import IdentityError, VersionMismatch
from pymesh.proto.frames import Frame, FrameError, FrameLimits, FrameType, encode_frame
from pymesh.proto.identity import Identity, PeerID

log = logging.getLogger(__name__)

AUTH_CONTEXT = b"pymesh-auth/1\x00"
NONCE_SIZE = 32

SendFn = Callable[[bytes], Awaitable[None]]
ReadFn = Callable[[], Awaitable[Frame]]


def auth_message(server: PeerID, nonce: bytes, client: PeerID) -> bytes:
    return AUTH_CONTEXT + server.key + nonce + client.key


def _field_bytes(frame: Frame, key: str, size: int) -> bytes:
    value = frame.envelope.meta.get(key)
    if not isinstance(value, bytes) or len(value) != size:
        raise FrameError(f"handshake {frame.type.name} field {key!r} must be {size} bytes")
    return value


def _version(frame: Frame) -> object:
    return frame.envelope.meta.get("v")


def _expect(frame: Frame, ftype: FrameType, ours: int) -> None:
    if frame.type == FrameType.ERROR:
        code, message = frame.envelope.code, frame.envelope.message
        if code == "version":
            raise VersionMismatch(ours, frame.envelope.meta.get("v"))
        if code == "identity":
            raise IdentityError(f"the peer refused our identity: {message}")
        raise FrameError(f"the peer aborted the handshake: {code}: {message}")
    if frame.type != ftype:
        raise FrameError(f"handshake expected a {ftype.name} frame, got {frame.type.name}")


async def server_handshake(identity: Identity, version: int, read: ReadFn, send: SendFn,
                           limits: FrameLimits) -> PeerID:
    """Run the server side; returns the authenticated client's peer ID."""
    nonce = os.urandom(NONCE_SIZE)
    await send(encode_frame(FrameType.HELLO, 0, meta={"v": version, "id": identity.public_key, "n": nonce},
                            limits=limits))
    frame = await read()
    _expect(frame, FrameType.AUTH, version)
    theirs = _version(frame)
    if theirs != version:
        await send(encode_frame(FrameType.ERROR, 0, code="version", meta={"v": version},
                                message=f"this node speaks protocol version {version}, you sent {theirs!r}"))
        raise VersionMismatch(version, theirs)
    client = PeerID(_field_bytes(frame, "id", 32))
    sig = _field_bytes(frame, "s", 64)
    if not client.verify(sig, auth_message(identity.peer_id, nonce, client)):
        await send(encode_frame(FrameType.ERROR, 0, code="identity",
                                message="the signature does not prove ownership of the claimed key"))
        raise IdentityError(f"peer claiming to be {client} failed to prove it owns that key (bad signature)")
    await send(encode_frame(FrameType.WELCOME, 0, meta={"v": version}))
    return client


async def client_handshake(identity: Identity, version: int, expected: PeerID, read: ReadFn,
                           send: SendFn) -> None:
    """Run the dialer side; raises IdentityError / VersionMismatch with both sides named."""
    frame = await read()
    _expect(frame, FrameType.HELLO, version)
    theirs = _version(frame)
    if theirs != version:
        await send(encode_frame(FrameType.ERROR, 0, code="version", meta={"v": version},
                                message=f"this node speaks protocol version {version}, you sent {theirs!r}"))
        raise VersionMismatch(version, theirs)
    server = PeerID(_field_bytes(frame, "id", 32))
    if server != expected:
        raise IdentityError(f"pinned key mismatch: expected peer {expected}, the server says it is {server}")
    nonce = _field_bytes(frame, "n", NONCE_SIZE)
    sig = identity.sign(auth_message(server, nonce, identity.peer_id))
    await send(encode_frame(FrameType.AUTH, 0, meta={"v": version, "id": identity.public_key, "s": sig}))
    _expect(await read(), FrameType.WELCOME, version)
