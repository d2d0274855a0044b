"""The exception hierarchy shared by every layer of pymesh.

``PymeshError`` is the root. Protocol errors are split the way h11 splits them:
``LocalProtocolError`` means this process misused an API, ``RemoteProtocolError``
means a peer sent something invalid. Parsers of untrusted bytes raise one error
type each, always a subclass of ``RemoteProtocolError``.
"""

from __future__ import annotations


class PymeshError(Exception):
    """Root of every error pymesh raises on purpose."""


class LocalProtocolError(PymeshError):
    """This process used a protocol API in a way the protocol does not allow."""


class RemoteProtocolError(PymeshError):
    """A peer sent bytes or messages that violate the protocol."""


class DecodeError(RemoteProtocolError):
    """Bytes from the network could not be decoded (malformed, non-canonical, too big)."""


class VersionMismatch(RemoteProtocolError):
    """The peer speaks another protocol version."""

    def __init__(self, ours: int, theirs: object) -> None:
        super().__init__(
            f"protocol version mismatch: this node speaks version {ours}, the peer "
            f"speaks {theirs!r}; upgrade the older side so both run the same pymesh"
        )
        self.ours = ours
        self.theirs = theirs


class IdentityError(PymeshError):
    """A key, signature or peer ID is invalid or does not match what was expected."""


class PeerUnavailable(PymeshError):
    """A peer could not be reached, timed out, or closed the connection."""


class ConnectionClosed(LocalProtocolError):
    """This node closed the connection itself (``aclose``) and then used it, or a call was
    still waiting when it did (trio's ClosedResourceError; the peer going away is
    :class:`PeerUnavailable`, trio's BrokenResourceError)."""


class ConfigError(PymeshError):
    """A model folder, config field or command-line option is invalid or unsupported."""
