"""Settings of the transport (QUIC and TCP); ``pymesh.settings`` fills them from the environment."""

from __future__ import annotations

from dataclasses import dataclass

from pymesh.errors import ConfigError
from pymesh.proto.frames import RECV_COMMIT_CHUNK, FrameLimits

#: ALPN protocol name of pymesh over QUIC (and TLS over TCP).
ALPN = "pymesh/1"
#: Largest QUIC datagram pymesh configures (see TransportConfig.packet_size).
MAX_PACKET_SIZE = 16384



@dataclass
class TransportConfig:
    """Knobs of the transport. Defaults suit an unknown Internet path.

    ``idle_timeout`` (``PYMESH_TRANSPORT_TIMEOUT`` via ``Settings.transport_config()``) bounds how long a silent peer is
    kept: keep-alive pings go out every third of it, and a peer that answers nothing for
    that long is declared gone (pending calls fail with ``PeerUnavailable``).
    """

    packet_size: int = 1200                 # QUIC max_datagram_size (1452 on Ethernet, 16 KB on loopback)
    # QUIC datagram size with a peer on a loopback address (the loopback MTU is 64 KiB, so
    # nothing on the path can drop them); None: packet_size there too. aioquic's cost is
    # mostly per datagram: an 8 KB round trip is 2 datagrams at 16 KB, 16 at 1200 bytes.
    loopback_packet_size: int | None = MAX_PACKET_SIZE
    max_frame_bytes: int = 512 * 1024 * 1024  # cap on one frame's tensor payload
    max_meta_bytes: int = 64 * 1024         # cap on one frame's bencoded metadata
    max_tensors: int = 64                   # cap on tensors per frame
    max_dims: int = 8                       # cap on dimensions per tensor
    idle_timeout: float = 30.0             # a silent peer is declared gone after this long
    connect_timeout: float = 10.0           # dial + TLS + identity handshake
    frame_timeout: float = 60.0             # a frame once started must complete within this
    tls: bool = True                        # TCP only: False = plaintext (benchmarks, trusted LANs)
    stream_window: int = 16 * 1024 * 1024   # QUIC per-stream receive credit advertised to the peer
    connection_window: int = 64 * 1024 * 1024  # QUIC connection receive credit; twice it caps the
                                            # bytes parked unread in streams (more closes the connection)
    send_buffer: int = 4 * 1024 * 1024      # QUIC: unacknowledged bytes per stream before send() waits
    connection_send_buffer: int = 16 * 1024 * 1024  # QUIC: the same bound over all streams of a connection
    congestion_control: str = "reno"        # aioquic algorithm name ("reno", "cubic", "pymesh-delay")
    max_concurrent_handlers: int = 256      # calls served at once per connection; more wait
    # Received payload held at once (pymesh.net.inflight): a frame is admitted against its
    # connection with the size it announces (larger than this: refused; no room: it waits
    # for the connection's earlier frames), and charged to the node as its bytes arrive
    # (no room: it waits; frame_timeout does not count that wait).
    max_inflight_per_connection: int = 512 * 1024 * 1024
    max_inflight_per_node: int = 1024 * 1024 * 1024

    def __post_init__(self) -> None:
        if not 1200 <= self.packet_size <= MAX_PACKET_SIZE:
            raise ConfigError(
                f"packet_size={self.packet_size} must be between 1200 and {MAX_PACKET_SIZE} bytes "
                "(aioquic writes a STREAM frame's length in 2 bytes, so larger packets corrupt streams)"
            )
        if self.loopback_packet_size is not None and not 1200 <= self.loopback_packet_size <= MAX_PACKET_SIZE:
            raise ConfigError(f"loopback_packet_size={self.loopback_packet_size} must be None or between 1200 "
                              f"and {MAX_PACKET_SIZE} bytes (see packet_size)")
        for name in ("idle_timeout", "connect_timeout", "frame_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"TransportConfig.{name} must be positive, got {getattr(self, name)}")
        if not RECV_COMMIT_CHUNK <= self.max_inflight_per_connection <= self.max_inflight_per_node:
            raise ConfigError(
                f"TransportConfig needs {RECV_COMMIT_CHUNK} <= max_inflight_per_connection "
                f"({self.max_inflight_per_connection}) <= max_inflight_per_node ({self.max_inflight_per_node}): "
                "a frame admitted on a connection must be able to fit in the node's budget"
            )

    def packet_size_to(self, loopback: bool) -> int:
        """The QUIC datagram size for a peer on a loopback address or elsewhere."""
        if loopback and self.loopback_packet_size is not None:
            return self.loopback_packet_size
        return self.packet_size

    @property
    def limits(self) -> FrameLimits:
        return FrameLimits(self.max_meta_bytes, self.max_frame_bytes, self.max_tensors, self.max_dims)
