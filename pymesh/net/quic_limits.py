"""A bound on the bytes aioquic itself holds for a connection's receive streams.

aioquic buffers an out-of-order STREAM frame from the stream's read position, zero-filling
the gap, and raises the peer's credit as offsets arrive rather than as the application
reads: 100 bytes at offset 16 MiB on each of 12 streams made a server hold ~216 MiB before
the peer had even authenticated. The driver's ``max_unread`` bounds what reached its own
queues; this guard extends it to aioquic's buffers. A frame that would grow them past what
is left of ``max_unread`` ends the connection with FLOW_CONTROL_ERROR before aioquic
allocates anything. In-order data (the common case: aioquic hands it straight over
without buffering) is never counted here, and is not slowed by a scan.
"""

from __future__ import annotations

from typing import Any, Callable

from aioquic.quic.connection import QuicConnection, QuicConnectionError
from aioquic.quic.packet import QuicErrorCode, QuicFrameType


def guard_stream_gaps(quic: QuicConnection, allowance: Callable[[], int]) -> None:
    """Check every STREAM frame that would extend a stream's reorder buffer against
    ``allowance()`` (bytes the connection may still hold, e.g. ``max_unread - unread``)."""
    original = quic._get_or_create_stream

    def held() -> int:
        return sum(len(s.receiver._buffer) for s in quic._streams.values())

    def get_or_create(frame_type: int, stream_id: int) -> Any:
        stream = original(frame_type, stream_id)
        receiver = stream.receiver
        if "handle_frame" in vars(receiver):
            return stream  # guarded already
        handle = receiver.handle_frame

        def handle_frame(frame: Any) -> Any:
            start, buffered = receiver._buffer_start, len(receiver._buffer)
            growth = frame.offset + len(frame.data) - start - buffered
            # only a frame that leaves a gap (or lands behind one) is buffered by aioquic
            if growth > 0 and (frame.offset > start or buffered) and held() + growth > allowance():
                raise QuicConnectionError(
                    error_code=QuicErrorCode.FLOW_CONTROL_ERROR, frame_type=QuicFrameType.STREAM_BASE,
                    reason_phrase=f"receive buffer exceeded: stream {stream_id} data at offset {frame.offset} "
                                  f"would make this side hold {held() + growth} bytes")
            return handle(frame)

        receiver.handle_frame = handle_frame  # type: ignore[method-assign]
        return stream

    quic._get_or_create_stream = get_or_create  # type: ignore[method-assign]
