"""Byte streams over a trio TCP socket, plaintext or TLS, that read straight into
caller-provided memory.

TLS runs on ``ssl.SSLObject`` over two ``MemoryBIO``s: ``SSLObject.read(n, buffer)``
decrypts into the destination buffer (trio's ``SSLStream`` has no receive-into).
"""

from __future__ import annotations

import ssl
from typing import Awaitable

import trio

from pymesh.errors import PeerUnavailable
from pymesh.net.frames import FrameError

RECV_CHUNK = 256 * 1024
SEND_CHUNK = 256 * 1024


class PlainStream:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.sock = stream.socket

    async def recv_into(self, view: memoryview) -> int:
        try:
            return await self.sock.recv_into(view)
        except OSError as exc:
            raise PeerUnavailable(f"connection lost: {exc}") from None

    async def send_all(self, data: bytes | memoryview) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, OSError) as exc:
            raise PeerUnavailable(f"connection lost while sending: {exc}") from None

    def peer_certificate(self) -> bytes | None:
        return None

    async def aclose(self) -> None:
        await self.stream.aclose()


class TlsStream:
    """TLS over a socket via SSLObject; sends are serialised by the caller's lock."""

    def __init__(self, stream: trio.SocketStream, ctx: ssl.SSLContext, server_side: bool) -> None:
        self.stream = stream
        self.sock = stream.socket
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=server_side)
        self._flush_lock = trio.Lock()
        self._eof = False

    async def _flush(self) -> None:
        async with self._flush_lock:
            data = self._out.read()
            if data:
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, OSError) as exc:
                    raise PeerUnavailable(f"connection lost while sending: {exc}") from None

    async def _fill(self) -> None:
        try:
            data = await self.sock.recv(RECV_CHUNK)
        except OSError as exc:
            raise PeerUnavailable(f"connection lost: {exc}") from None
        if data:
            self._in.write(data)
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

    async def recv_into(self, view: memoryview) -> int:
        while True:
            try:
                return self._obj.read(len(view), view)
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

    async def aclose(self) -> None:
        await self.stream.aclose()


Raw = PlainStream | TlsStream


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
