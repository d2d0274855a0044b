"""In-flight bytes: received payload this node holds, capped per connection and per node.

A frame's payload is *in flight* from the moment its bytes are committed until the
transport hands the frame over: a reply to the waiting caller, a call or push once its
handler returns. Two caps (``TransportConfig``):

* ``max_inflight_per_connection``: each frame is admitted against its connection with the
  size it announces, before any payload is read; a frame that does not fit waits until
  the connection's earlier frames are released (a peer announcing large frames and
  stalling only blocks itself), and one that can never fit is a :class:`FrameError`.
* ``max_inflight_per_node``: charged as the bytes arrive (one ``RECV_COMMIT_CHUNK`` at a
  time), so announcing reserves nothing node-wide; a frame whose next piece does not fit
  waits for other frames to be released. A peer that sends part of a frame and stalls is
  closed by ``frame_timeout``, which does not count the time a frame waits here.
"""

from __future__ import annotations

import trio

from pymesh.net.clock import Clock
from pymesh.proto.frames import FrameError


class ByteBudget:
    """``used`` of ``cap`` bytes; :meth:`take` waits for room, :meth:`give` returns it."""

    __slots__ = ("cap", "used", "what", "_lot")

    def __init__(self, cap: int, what: str) -> None:
        self.cap = cap
        self.used = 0
        self.what = what
        self._lot = trio.lowlevel.ParkingLot()

    def fits(self, n: int) -> bool:
        return self.used + n <= self.cap

    async def take(self, n: int) -> None:
        """Wait until ``n`` more bytes fit, then hold them (no yield when they fit now)."""
        if n > self.cap:
            raise FrameError(f"a frame needs {n} bytes in flight, over {self.what}={self.cap}; "
                             f"raise {self.what} on the receiver if such frames are legitimate")
        while not self.fits(n):
            await self._lot.park()
        self.used += n

    def give(self, n: int) -> None:
        if n:
            self.used -= n
            self._lot.unpark_all()


class FrameCharge:
    """The :class:`~pymesh.proto.frames.ReceiveBudget` of one frame: admitted against its
    connection, grown against the node, released once by :meth:`release`. While it waits
    for room, ``blocked_since`` is set and the frame watchdogs leave the frame alone."""

    __slots__ = ("conn", "node", "clock", "admitted", "grown", "blocked_since", "blocked_total")

    def __init__(self, conn: ByteBudget, node: ByteBudget, clock: Clock) -> None:
        self.conn = conn
        self.node = node
        self.clock = clock
        self.admitted = 0
        self.grown = 0
        self.blocked_since: float | None = None
        self.blocked_total = 0.0

    async def _wait(self, budget: ByteBudget, n: int) -> None:
        """Take ``n`` from a budget that has no room now (or can never have it)."""
        self.blocked_since = since = self.clock.monotonic()
        try:
            await budget.take(n)
        finally:
            self.blocked_since = None
            self.blocked_total += self.clock.monotonic() - since

    async def admit(self, payload_len: int) -> None:
        conn = self.conn
        if conn.used + payload_len <= conn.cap:  # the common case: no coroutine, no yield
            conn.used += payload_len
        else:
            await self._wait(conn, payload_len)
        self.admitted += payload_len

    async def grow(self, nbytes: int) -> None:
        node = self.node
        if node.used + nbytes <= node.cap:
            node.used += nbytes
        else:
            await self._wait(node, nbytes)
        self.grown += nbytes

    def stalled_for(self, now: float, since: float) -> float | None:
        """Seconds the peer has kept this frame waiting for bytes since ``since`` (time spent
        waiting here for memory excluded); None while the frame waits for memory."""
        if self.blocked_since is not None:
            return None
        return now - since - self.blocked_total

    def release(self) -> None:
        self.conn.give(self.admitted)
        self.node.give(self.grown)
        self.admitted = self.grown = 0
