"""How the QUIC driver adapts aioquic's ``QuicConnection`` through its internals.

No public aioquic API exposes what pymesh needs here: a check that the internals the driver
reads exist, a pacer that treats sub-millisecond waits as zero, and Stateless Reset tokens
derived from the node's identity. Tested with aioquic 1.7.2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from aioquic.quic.connection import QuicConnection

from pymesh.errors import LocalProtocolError

if TYPE_CHECKING:
    from pymesh.proto.reset_tokens import ResetTokens


#: aioquic internals the driver reads (no public API exposes them): the pacer, stream send
#: buffers (unacknowledged bytes), packet spaces (ACK timing), the close timer, the peer
#: certificate, the connection state and connection IDs with their stateless reset tokens
#: (aioquic draws tokens at random and never checks received ones). Tested with aioquic 1.7.2.
_INTERNALS = ("_loss", "_streams", "_spaces", "_close_at", "_state", "_host_cids", "_peer_cid",
              "_peer_cid_available", "_replenish_connection_ids", "_network_paths", "_get_or_create_stream")


def check_internals(quic: QuicConnection) -> None:
    missing = [name for name in _INTERNALS if not hasattr(quic, name)]
    if missing or not hasattr(quic._loss, "_pacer"):
        import aioquic

        raise LocalProtocolError(
            f"pymesh's QUIC driver needs aioquic 1.x internals ({', '.join(missing) or '_loss._pacer'} missing "
            f"in aioquic {getattr(aioquic, '__version__', '?')}); install aioquic 1.7 or use transport='tcp'"
        )


def relax_pacing(quic: QuicConnection) -> None:
    pacer = quic._loss._pacer
    original = pacer.next_send_time

    def next_send_time(now: float) -> float | None:
        t = original(now)
        if t is None or t - now < 0.001:
            return None
        return t

    pacer.next_send_time = next_send_time  # type: ignore[method-assign,assignment]


def derive_reset_tokens(quic: QuicConnection, tokens: "ResetTokens", register: Callable[[bytes], None]) -> None:
    """Give each connection ID this side issues the reset token derived from the node's
    identity (see :mod:`pymesh.proto.reset_tokens`) instead of aioquic's random one, now
    and whenever aioquic issues more. A client's first connection ID has no token (QUIC
    cannot announce one for it) and keeps none.

    IDs issued later are routed to this connection (``register``) at once, not when
    aioquic's ConnectionIdIssued event is processed: the peer may use an ID as soon as
    it has it, and a packet for an unknown ID is answered with a Stateless Reset."""
    def derive() -> None:
        for c in quic._host_cids:
            if c.stateless_reset_token:
                c.stateless_reset_token = tokens.token(c.cid)

    original = quic._replenish_connection_ids

    def replenish() -> None:
        original()
        derive()
        for c in quic._host_cids:
            register(c.cid)

    derive()
    quic._replenish_connection_ids = replenish  # type: ignore[method-assign]
