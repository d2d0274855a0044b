"""One aioquic ``QuicConnection`` driven by trio (:class:`QuicDriver`).

* A single timer per connection: a cancel scope whose deadline follows ``get_timer()``;
  trio's clock is the ``now`` aioquic sees.
* Received stream bytes queue per stream (:class:`QStream`) and are read as frames.
* Send-side backpressure: a stream waits while its unacknowledged bytes exceed a bound
  (``send_stream_data`` itself buffers without limit).
* Pacing waits shorter than a millisecond are treated as zero: trio cannot sleep that
  precisely, and on the paths pymesh runs on sending at once is what the pacer wants.
* Pending ACKs ride on application data instead of waiting for aioquic's 1 ms ACK timer.

The UDP socket and routing live in :mod:`pymesh.net.quic_endpoint`.
"""

from __future__ import annotations

import collections
import logging
import math
from typing import TYPE_CHECKING, Any, Callable

import trio
from aioquic import tls
from aioquic.quic import events
from aioquic.quic.connection import QuicConnection, QuicConnectionState

from pymesh.errors import PeerUnavailable
from pymesh.net.quic_internals import check_internals, derive_reset_tokens, relax_pacing
from pymesh.net.quic_limits import guard_stream_gaps
from pymesh.proto.frames import FrameError

if TYPE_CHECKING:
    from pymesh.net.quic_endpoint import QuicEndpoint

log = logging.getLogger(__name__)

SEND_CHUNK = 256 * 1024
COALESCE = 64 * 1024


class StreamAborted(PeerUnavailable):
    """The peer reset or stopped a stream, or the connection ended under it."""


class Budget:
    """Bytes received on a connection's streams and not yet read by the application."""

    __slots__ = ("used",)

    def __init__(self) -> None:
        self.used = 0


class QStream:
    """Received bytes of one QUIC stream, read as frames (``read_exact``/``readinto_exact``)."""

    __slots__ = ("sid", "chunks", "buffered", "fin", "error", "_wakeup", "on_reset", "stop_sending", "budget")

    def __init__(self, sid: int, budget: Budget | None = None) -> None:
        self.sid = sid
        self.budget = budget or Budget()
        self.chunks: collections.deque[memoryview] = collections.deque()
        self.buffered = 0
        self.fin = False
        self.error: str | None = None
        self.stop_sending = False
        self._wakeup = trio.Event()
        self.on_reset: Callable[[], None] | None = None

    def feed(self, data: bytes, end: bool) -> None:
        if data:
            self.chunks.append(memoryview(data))
            self.buffered += len(data)
            self.budget.used += len(data)
        if end:
            self.fin = True
        self._wake()

    def fail(self, why: str) -> None:
        if self.error is None:
            self.error = why
        self._wake()
        if self.on_reset is not None:
            self.on_reset()

    def _wake(self) -> None:
        self._wakeup.set()
        self._wakeup = trio.Event()

    async def _more(self, need: int, have: int) -> None:
        if self.error is not None:
            raise StreamAborted(self.error)
        if self.fin:
            raise FrameError(f"truncated frame: stream {self.sid} ended after {have} of {need} bytes")
        await self._wakeup.wait()

    async def read_exact(self, n: int) -> bytearray:
        out = bytearray(n)
        await self.readinto_exact(memoryview(out))
        return out

    async def readinto_exact(self, view: memoryview) -> None:
        need = len(view)
        pos = 0
        while pos < need:
            if not self.chunks:
                await self._more(need, pos)
                continue
            chunk = self.chunks[0]
            take = min(len(chunk), need - pos)
            view[pos:pos + take] = chunk[:take]
            pos += take
            self.buffered -= take
            self.budget.used -= take
            if take == len(chunk):
                self.chunks.popleft()
            else:
                self.chunks[0] = chunk[take:]


class _Finished:
    """Which peer-initiated stream IDs of one type are done: a floor plus a sparse set."""

    def __init__(self, base: int) -> None:
        self.floor = base
        self.done: set[int] = set()

    def finish(self, sid: int) -> None:
        if sid >= self.floor:
            self.done.add(sid)
            while self.floor in self.done:
                self.done.remove(self.floor)
                self.floor += 4

    def is_done(self, sid: int) -> bool:
        return sid < self.floor or sid in self.done


class QuicDriver:
    def __init__(self, endpoint: QuicEndpoint, quic: QuicConnection, is_client: bool, send_buffer: int,
                 connection_send_buffer: int | None = None, max_unread: int | None = None) -> None:
        self.endpoint = endpoint
        self.quic = quic
        self.is_client = is_client
        self.send_buffer = send_buffer
        self.connection_send_buffer = connection_send_buffer or 4 * send_buffer
        self.streams: dict[int, QStream] = {}
        self.handshake_done = trio.Event()
        self.terminated: str | None = None
        self.terminated_event = trio.Event()
        self.incoming_send, self.incoming = trio.open_memory_channel[QStream](math.inf)
        self._progress = trio.Event()
        self._timer_scope = trio.CancelScope()
        self._finished = {b: _Finished(b) for b in range(4)}
        self._cids: set[bytes] = set()
        self.nursery: trio.Nursery | None = None
        self.on_terminated: Callable[[str], None] | None = None
        self.on_stream: Callable[[QStream], None] | None = None
        self.dirty = False   # received datagrams not yet followed by a transmit
        # A push (unidirectional stream) arrived whole: its sender waits for the ACK (see
        # send_frame), and nothing will answer on the stream for it to ride on.
        self._ack_now = False
        self.answer_expected = False  # see after_receive
        # aioquic raises flow-control credit as data arrives, not as it is consumed, so the
        # bytes parked in streams nobody reads yet are bounded here instead.
        self.budget = Budget()
        self.max_unread = 4 * send_buffer if max_unread is None else max_unread
        self.fed_first = False  # the endpoint fed this new connection its first datagram
        # A client's first connection ID has no reset token (QUIC cannot announce one), so a
        # server moves to the client's next ID, which has one, as soon as it is issued.
        self._leave_first_peer_cid = not is_client
        check_internals(quic)
        relax_pacing(quic)
        derive_reset_tokens(quic, endpoint.reset_tokens, self.add_cid)
        guard_stream_gaps(quic, lambda: self.max_unread - self.budget.used)

    # ---------------------------------------------------------------- lifecycle
    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._timer_loop)
                task_status.started()
                await self.terminated_event.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._terminate("driver stopped")
            for cid in self._cids:
                self.endpoint.forget_cid(cid, self)

    def add_cid(self, cid: bytes) -> None:
        self._cids.add(cid)
        self.endpoint.register_cid(cid, self)

    def _terminate(self, reason: str) -> None:
        if self.terminated is not None:
            return
        self.terminated = reason
        self.endpoint.handshake_ended(self)
        for stream in list(self.streams.values()):
            stream.fail(f"connection closed: {reason}")
        self.handshake_done.set()
        self._progress.set()
        self.terminated_event.set()
        self.incoming_send.close()
        if self.on_terminated is not None:
            self.on_terminated(reason)

    def close(self, error_code: int, reason: str) -> None:
        if self.terminated is None:
            self.quic.close(error_code=error_code, reason_phrase=reason)
            self.after_io()
            self._terminate(reason)

    # ---------------------------------------------------------------- timer and I/O
    async def _timer_loop(self) -> None:
        while self.terminated is None:
            self._timer_scope = trio.CancelScope(deadline=self._deadline())
            with self._timer_scope:
                await trio.sleep_forever()
            now = trio.current_time()
            t = self._deadline()
            if now >= t:
                self.quic.handle_timer(now)
                self.after_io()

    def _deadline(self) -> float:
        if self.quic._close_at is None:  # nothing sent or received yet: no timer
            return math.inf
        t = self.quic.get_timer()
        return math.inf if t is None else t

    def receive(self, data: bytes, addr: Any, now: float) -> None:
        self.quic.receive_datagram(data, addr, now)

    def started_handshake(self) -> bool:
        """Whether a packet of this (server) connection decrypted, so its handshake began."""
        return bool(self.quic._state != QuicConnectionState.FIRSTFLIGHT)

    # ---------------------------------------------------------------- stateless reset
    def peer_reset_tokens(self) -> list[bytes]:
        """The Stateless Reset tokens the peer gave for its connection IDs we know."""
        quic = self.quic
        return [c.stateless_reset_token for c in [quic._peer_cid, *quic._peer_cid_available]
                if c.stateless_reset_token]

    def peer_reset(self) -> None:
        """The peer answered with a Stateless Reset: it has no state for this connection
        (it restarted, or dropped it). RFC 9000 section 10.3: end it at once, sending nothing."""
        if self.terminated is None:
            log.info("QUIC peer at %s sent a stateless reset (it restarted or lost the connection)",
                     self.quic._network_paths[0].addr if self.quic._network_paths else "?")
            self._terminate("the peer reset the connection (stateless reset: it restarted or lost its state)")

    def after_receive(self) -> None:
        """Process events and wake readers and senders, but leave transmitting to
        :meth:`flush`: a handler woken here usually answers at once, and its send
        transmits (with the ACK) — one ``datagrams_to_send`` instead of two.
        ``answer_expected``: data arrived on a bidirectional stream (a call or its reply),
        which a woken task may answer at once."""
        self.answer_expected = False
        self._process_events()
        if self._leave_first_peer_cid and self.quic._peer_cid_available and self.terminated is None:
            self._leave_first_peer_cid = False
            self.quic.change_connection_id()
        self.dirty = True
        self._progress.set()
        self._progress = trio.Event()

    def flush(self) -> None:
        if self.dirty:
            self.after_io()

    def after_io(self, piggyback_ack: bool = False) -> None:
        """Process events, transmit, re-arm the timer, wake senders waiting for ACKs.

        aioquic holds an ACK back for 1 ms, so a reply sent sooner would go without it and
        a separate ACK-only datagram (one more wake-up of the peer) would follow. When the
        application is sending anyway (``piggyback_ack``), pending ACKs ride along now; so do
        they when a push arrived whole (its sender's ``send_frame`` waits for them: 1 ms
        and a timer wake-up more per hop otherwise)."""
        self._process_events()
        if piggyback_ack or self._ack_now:
            self._ack_now = False
            space = self.quic._spaces.get(tls.Epoch.ONE_RTT)
            if space is not None and space.ack_at is not None:
                space.ack_at = trio.current_time()
        self.transmit()
        self.dirty = False
        deadline = self._deadline()
        if deadline != self._timer_scope.deadline:  # re-registering a deadline has a cost
            self._timer_scope.deadline = deadline
        self._progress.set()
        self._progress = trio.Event()

    def transmit(self) -> None:
        datagrams = self.quic.datagrams_to_send(now=trio.current_time())
        if datagrams:
            self.endpoint.send_many(datagrams)

    def _process_events(self) -> None:
        quic = self.quic
        while (ev := quic.next_event()) is not None:
            if isinstance(ev, events.StreamDataReceived):
                stream = self.streams.get(ev.stream_id)
                if stream is None:
                    stream = self._new_peer_stream(ev.stream_id)
                    if stream is None:
                        continue
                stream.feed(ev.data, ev.end_stream)
                if not ev.stream_id & 2:
                    self.answer_expected = True
                elif ev.end_stream:
                    self._ack_now = True
            elif isinstance(ev, events.StreamReset):
                stream = self.streams.get(ev.stream_id)
                if stream is not None:
                    stream.fail(f"stream reset by the peer (code {ev.error_code})")
            elif isinstance(ev, events.StopSendingReceived):
                stream = self.streams.get(ev.stream_id)
                if stream is not None:
                    stream.stop_sending = True
                self._reset(ev.stream_id, ev.error_code)
            elif isinstance(ev, events.HandshakeCompleted):
                self.handshake_done.set()
                self.endpoint.handshake_ended(self)
            elif isinstance(ev, events.ConnectionIdIssued):
                self.add_cid(ev.connection_id)
            elif isinstance(ev, events.ConnectionIdRetired):
                self._cids.discard(ev.connection_id)
                self.endpoint.forget_cid(ev.connection_id, self)
            elif isinstance(ev, events.ConnectionTerminated):
                why = ev.reason_phrase or f"error code {ev.error_code:#x}"
                self._terminate(f"connection terminated: {why}")
        if self.budget.used > self.max_unread and self.terminated is None:
            log.warning("peer sent %d bytes that no reader is taking (cap %d); closing the connection",
                        self.budget.used, self.max_unread)
            self.quic.close(error_code=0x11, reason_phrase="receive buffer exceeded")
            self.transmit()
            self._terminate(f"the peer exceeded the receive buffer ({self.max_unread} unread bytes)")

    def _is_local(self, sid: int) -> bool:
        return (sid & 1) == (0 if self.is_client else 1)

    def _new_peer_stream(self, sid: int) -> QStream | None:
        if self._is_local(sid) or self._finished[sid & 3].is_done(sid) or self.terminated is not None:
            return None  # late data for a stream we already closed
        stream = self.streams[sid] = QStream(sid, self.budget)
        if self.on_stream is not None:
            self.on_stream(stream)
        else:
            self.incoming_send.send_nowait(stream)
        return stream

    # ---------------------------------------------------------------- streams
    def open_stream(self, unidirectional: bool = False) -> QStream:
        if self.terminated is not None:
            raise PeerUnavailable(f"connection closed: {self.terminated}")
        sid = self.quic.get_next_available_stream_id(is_unidirectional=unidirectional)
        self.quic.send_stream_data(sid, b"", False)  # claims the ID now
        stream = self.streams[sid] = QStream(sid, self.budget)
        return stream

    def forget(self, stream: QStream) -> None:
        self.streams.pop(stream.sid, None)
        if stream.buffered:  # unread bytes of an abandoned stream leave the budget
            self.budget.used -= stream.buffered
            stream.buffered = 0
            stream.chunks.clear()
        if not self._is_local(stream.sid):
            self._finished[stream.sid & 3].finish(stream.sid)

    def _reset(self, sid: int, code: int) -> None:
        try:
            self.quic.reset_stream(sid, code)
        except (ValueError, AssertionError):
            pass

    def abort(self, stream: QStream, code: int) -> None:
        """Reset our sending half and ask the peer to stop sending (cancellation)."""
        if self.terminated is not None:
            return
        self._reset(stream.sid, code)
        if not stream.fin:
            try:
                self.quic.stop_stream(stream.sid, code)
            except (ValueError, AssertionError):
                pass
        self.after_io()

    def _unacked(self, sid: int) -> int:
        s = self.quic._streams.get(sid)
        if s is None:
            return 0
        sender = s.sender
        return int(sender._buffer_stop - sender._buffer_start)

    def _unacked_total(self) -> int:
        return sum(self._unacked(sid) for sid in self.streams)

    async def send(self, stream: QStream, data: bytes | memoryview, end: bool) -> None:
        """Queue ``data`` on the stream, waiting for ACK progress to bound buffered bytes."""
        view = memoryview(data)
        if len(view) == 0:
            self._check_send(stream)
            self.quic.send_stream_data(stream.sid, b"", end)
            self.after_io(piggyback_ack=True)
            return
        for off in range(0, len(view), SEND_CHUNK):
            while True:
                self._check_send(stream)
                if self._unacked(stream.sid) < self.send_buffer and self._unacked_total() < self.connection_send_buffer:
                    break
                await self._progress.wait()
            chunk = view[off:off + SEND_CHUNK]
            self.quic.send_stream_data(stream.sid, chunk, end and off + len(chunk) == len(view))  # type: ignore[arg-type]
            self.after_io(piggyback_ack=True)

    async def send_frame(self, stream: QStream, head: bytes, payloads: list[memoryview]) -> bool:
        """Send one whole frame and end the stream; small frames go out as one write.
        Returns whether it waited for the peer's ACK (a push always does, but for a stream
        aioquic had already dropped).

        On a unidirectional stream (a push: nothing answers it) this returns only once the
        peer acknowledged every byte, so a push into a connection that dies (a stateless
        reset from a restarted peer, the idle timeout) raises PeerUnavailable instead of
        vanishing. The wait is one round trip, spent by the pushing task only."""
        if sum(len(p) for p in payloads) <= COALESCE:
            await self.send(stream, b"".join([head, *payloads]), end=True)
        else:
            await self.send(stream, head, end=False)
            for i, p in enumerate(payloads):
                await self.send(stream, p, end=i == len(payloads) - 1)
        if stream.sid & 2:
            return await self._delivered(stream)
        return False

    async def _delivered(self, stream: QStream) -> bool:
        """Wait for the peer's ACK of the whole stream; whether this had to wait."""
        waited = False
        while True:
            self._check_send(stream)
            s = self.quic._streams.get(stream.sid)
            if s is None or s.sender.is_finished:
                return waited
            await self._progress.wait()
            waited = True

    def _check_send(self, stream: QStream) -> None:
        if self.terminated is not None:
            raise PeerUnavailable(f"connection closed: {self.terminated}")
        if stream.stop_sending:
            raise StreamAborted(f"the peer stopped stream {stream.sid}")

    def ping(self, uid: int) -> None:
        if self.terminated is None:
            self.quic.send_ping(uid)
            self.after_io()
