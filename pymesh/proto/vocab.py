"""Enumerations shared by every role: worker states, transports and RPC error codes.

Both are ``str`` enums, so a member compares equal to its wire spelling (``"online"``,
``"quic"``) and bencodes as that string; parsers turn peer strings into members with
``WorkerState.parse_untrusted`` / ``Transport.parse`` and never compare raw strings.
"""

from __future__ import annotations

import enum

from pymesh.errors import ConfigError, DecodeError


class WorkerState(str, enum.Enum):
    """A worker's announced state: loading its span, serving it, or leaving."""

    JOINING = "joining"
    ONLINE = "online"
    OFFLINE = "offline"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse_untrusted(cls, text: str) -> "WorkerState":
        try:
            return cls(text)
        except ValueError:
            raise DecodeError(f"unknown worker state {text[:32]!r}; expected joining, online or offline") from None


class Transport(str, enum.Enum):
    """How two nodes talk: QUIC over UDP, or TLS over TCP (the fallback)."""

    QUIC = "quic"
    TCP = "tcp"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, text: str, *, what: str = "--transport") -> "Transport":
        """A user-given transport name (a :class:`ConfigError` naming ``what`` otherwise)."""
        try:
            return cls(text)
        except ValueError:
            raise ConfigError(f"{what} {text!r}: choose quic or tcp") from None


class RpcErrorCode(str, enum.Enum):
    """The ``RemoteError`` codes the RPC layer itself answers with. Handlers answer with
    their own protocol's codes (the session protocol's ``ErrorCode``); a code is a string on
    the wire, so a caller compares ``exc.code`` with either enum's members."""

    NOT_FOUND = "not_found"    # no handler registered for the method
    INTERNAL = "internal"      # the handler raised something other than RemoteError

    def __str__(self) -> str:
        return self.value
