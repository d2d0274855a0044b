"""Byte streams over a trio TCP socket, plaintext or TLS, that read straight into
caller-provided memory.

TLS runs on ``ssl.SSLObject`` over two ``MemoryBIO``s: ``SSLObject.read(n, buffer)``
decrypts into the destination buffer (trio's ``SSLStream`` has no receive-into).
"""

from __future__ import annotations

import socket
import ssl
from typing import Awaitable

import trio

from pymesh.errors import PeerUnavailable
from pymesh.proto.frames import FrameError

RECV_CHUNK = 256 * 1024
SEND_CHUNK = 256 * 1024
#: Receive buffer of a TLS stream until the peer is authenticated (one TLS record); 64
#: connections that stall in the handshake then hold 1 MiB of buffers, not 16.
PREAUTH_RECV = 17 * 1024


def raw_socket(stream: trio.SocketStream) -> socket.socket:
    """The stdlib socket under a trio stream: sends and receives try the syscall first and
    only wait (wait_readable / wait_writable) when it would block, which saves a trip
    through trio's scheduler per operation on the latency-critical path."""
    raw = getattr(stream.socket, "_sock", None)
    if not isinstance(raw, socket.socket):  # pragma: no cover - trio internals changed
        raise RuntimeError("trio socket no longer exposes its stdlib socket")
    return raw


async def _send_all(sock: socket.socket, data: bytes | memoryview) -> None:
    view = memoryview(data)
    pos = 0
    try:
        while pos < len(view):
            try:
                pos += sock.send(view[pos:])
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
    except OSError as exc:
        raise PeerUnavailable(f"connection lost while sending: {exc}") from None


def _send_nowait(sock: socket.socket, data: bytes) -> memoryview:
    view = memoryview(data)
    try:
        sent = sock.send(view)
    except BlockingIOError:
        sent = 0
    except OSError as exc:
        raise PeerUnavailable(f"connection lost while sending: {exc}") from None
    return view[sent:]


async def _recv_into(sock: socket.socket, view: memoryview) -> int:
    try:
        while True:
            try:
                return sock.recv_into(view)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
    except OSError as exc:
        raise PeerUnavailable(f"connection lost: {exc}") from None


class PlainStream:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.sock = raw_socket(stream)

    async def recv_into(self, view: memoryview) -> int:
        return await _recv_into(self.sock, view)

    async def send_all(self, data: bytes | memoryview) -> None:
        await _send_all(self.sock, data)

    def send_nowait(self, data: bytes) -> memoryview:
        """Send what the kernel takes now, without yielding; returns the encoded bytes
        still to be sent with :meth:`send_encoded` (empty if all went out)."""
        return _send_nowait(self.sock, data)

    async def send_encoded(self, rest: memoryview) -> None:
        await _send_all(self.sock, rest)

    def peer_certificate(self) -> bytes | None:
        return None

    async def aclose(self) -> None:
        await self.stream.aclose()


class TlsStream:
    """TLS over a socket via SSLObject; sends are serialised by the caller's lock."""

    def __init__(self, stream: trio.SocketStream, ctx: ssl.SSLContext, server_side: bool) -> None:
        self.stream = stream
        self.sock = raw_socket(stream)
        self._recv_buf = bytearray(PREAUTH_RECV)  # RECV_CHUNK once authenticated()
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=server_side)
        self._flush_lock = trio.Lock()
        self._eof = False

    async def _flush(self) -> None:
        try:
            self._flush_lock.acquire_nowait()  # uncontended after the handshake: no yield
        except trio.WouldBlock:
            await self._flush_lock.acquire()
        try:
            data = self._out.read()
            if data:
                await _send_all(self.sock, data)
        finally:
            self._flush_lock.release()

    async def _fill(self) -> None:
        n = await _recv_into(self.sock, memoryview(self._recv_buf))
        if n:
            self._in.write(memoryview(self._recv_buf)[:n])
        else:
            self._eof = True
            self._in.write_eof()

    async def handshake(self) -> None:
        while True:
            try:
                self._obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                if self._eof:
                    raise PeerUnavailable("the peer closed the connection during the TLS handshake")
                await self._fill()
            except ssl.SSLError as exc:
                await self._flush()
                raise PeerUnavailable(f"TLS handshake failed: {exc}") from None
        await self._flush()

    def peer_certificate(self) -> bytes | None:
        return self._obj.getpeercert(binary_form=True)

    def authenticated(self) -> None:
        """The identity handshake succeeded: read the socket in large pieces from now on."""
        if len(self._recv_buf) < RECV_CHUNK:
            self._recv_buf = bytearray(RECV_CHUNK)

    async def recv_into(self, view: memoryview) -> int:
        while True:
            try:
                n: int = self._obj.read(len(view), view)  # type: ignore[assignment]  # int with a buffer
                return n
            except ssl.SSLWantReadError:
                if self._eof:
                    return 0
                await self._fill()
            except ssl.SSLZeroReturnError:
                return 0
            except ssl.SSLEOFError:
                return 0
            except ssl.SSLError as exc:
                raise PeerUnavailable(f"TLS error from the peer: {exc}") from None

    async def send_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        for off in range(0, len(view), SEND_CHUNK):
            self._obj.write(view[off:off + SEND_CHUNK])
            await self._flush()

    def send_nowait(self, data: bytes) -> memoryview:
        """Encrypt all of ``data`` and send what the kernel takes now; returns the
        ciphertext left for :meth:`send_encoded`."""
        self._obj.write(data)
        return _send_nowait(self.sock, self._out.read())

    async def send_encoded(self, rest: memoryview) -> None:
        await _send_all(self.sock, rest)

    async def aclose(self) -> None:
        await self.stream.aclose()


class AnyStream:
    """Any trio byte stream (an in-memory pair in tests, a pipe): RPC frames exactly as
    over TCP, without the socket fast paths and without TLS."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    async def recv_into(self, view: memoryview) -> int:
        try:
            data = await self.stream.receive_some(len(view))
        except trio.BrokenResourceError as exc:
            raise PeerUnavailable(f"connection lost: {exc or 'stream broken'}") from None
        view[:len(data)] = data
        return len(data)

    async def send_all(self, data: bytes | memoryview) -> None:
        try:
            await self.stream.send_all(data)
        except trio.BrokenResourceError as exc:
            raise PeerUnavailable(f"connection lost while sending: {exc or 'stream broken'}") from None

    def send_nowait(self, data: bytes) -> memoryview:
        return memoryview(data)  # nothing goes out without an await: send_encoded sends it all

    async def send_encoded(self, rest: memoryview) -> None:
        await self.send_all(rest)

    def peer_certificate(self) -> bytes | None:
        return None

    async def aclose(self) -> None:
        await self.stream.aclose()


Raw = PlainStream | TlsStream | AnyStream


class BufferedReader:
    """``read_exact`` for small pieces (served from a buffer) and ``readinto_exact``
    that reads large payloads directly into the destination."""

    def __init__(self, raw: Raw, bufsize: int = 64 * 1024) -> None:
        self.raw = raw
        self._buf = bytearray(bufsize)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0

    @property
    def buffered(self) -> int:
        return self._end - self._start

    async def _fill(self, at_least: int) -> None:
        """Make at least ``at_least`` (<= bufsize) bytes available in the buffer."""
        if self._start and self._end == self._start:
            self._start = self._end = 0
        if len(self._buf) - self._start < at_least:
            n = self._end - self._start
            self._buf[:n] = self._buf[self._start:self._end]
            self._start, self._end = 0, n
        while self._end - self._start < at_least:
            got = await self.raw.recv_into(self._view[self._end:])
            if got == 0:
                raise EOFError
            self._end += got

    async def read_exact(self, n: int) -> bytes | bytearray:
        if n <= len(self._buf):
            if self.buffered < n:
                await self._wrap_eof(self._fill(n), n)
            out = bytes(self._view[self._start:self._start + n])
            self._start += n
            return out
        out_buf = bytearray(n)
        await self.readinto_exact(memoryview(out_buf))
        return out_buf

    async def readinto_exact(self, view: memoryview) -> None:
        need = len(view)
        take = min(self.buffered, need)
        if take:
            view[:take] = self._view[self._start:self._start + take]
            self._start += take
        pos = take
        while pos < need:
            if need - pos >= len(self._buf) // 2:
                got = await self.raw.recv_into(view[pos:])
                if got == 0:
                    raise FrameError(f"truncated frame: the connection ended after {pos} of {need} payload bytes")
                pos += got
            else:
                await self._wrap_eof(self._fill(min(need - pos, len(self._buf))), need)
                take = min(self.buffered, need - pos)
                view[pos:pos + take] = self._view[self._start:self._start + take]
                self._start += take
                pos += take

    async def at_eof(self) -> bool:
        """Wait for the next byte; True if the peer closed cleanly at a frame boundary."""
        if self.buffered:
            return False
        try:
            await self._fill(1)
        except EOFError:
            return True
        return False

    async def _wrap_eof(self, aw: Awaitable[None], n: int) -> None:
        try:
            await aw
        except EOFError:
            raise FrameError(f"truncated frame: the connection ended while {n} bytes were expected") from None
