"""Peer addresses: ``HOST:PORT`` and the multiaddr-style form of the seed design.

Accepted spellings::

    127.0.0.1:9000
    [::1]:9000
    /ip4/192.168.1.10/tcp/9000
    /ip4/192.168.1.10/udp/9000/p2p/<peer id>
    /ip6/::1/udp/9000/quic
    /dns4/example.org/tcp/9000

The protocol part (tcp/udp/quic) is kept for display; callers decide which socket
the port means (DESIGN.md: a bootstrap's port is its DHT port).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from pymesh.errors import ConfigError
from pymesh.proto.identity import PeerID


@dataclass(frozen=True)
class PeerAddr:
    host: str
    port: int
    proto: str = ""
    peer_id: PeerID | None = None

    def hostport(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def to_multiaddr(self, proto: str | None = None) -> str:
        family = "ip6" if ":" in self.host else ("ip4" if _is_ipv4(self.host) else "dns4")
        text = f"/{family}/{self.host}/{proto or self.proto or 'udp'}/{self.port}"
        if self.peer_id is not None:
            text += f"/p2p/{self.peer_id.to_text()}"
        return text

    def __str__(self) -> str:
        return self.hostport()


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def _port(text: str, original: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigError(f"address {original!r}: port {text!r} is not a number in 1..65535")
    return int(text)


def parse_addr(text: str) -> PeerAddr:
    """Parse ``HOST:PORT`` or a multiaddr; raises ConfigError saying what is wrong."""
    original = text
    text = text.strip()
    if not text:
        raise ConfigError("empty address; expected HOST:PORT or /ip4/HOST/udp/PORT")
    if text.startswith("/"):
        parts = text.strip("/").split("/")
        host = proto = ""
        port: int | None = None
        peer: PeerID | None = None
        i = 0
        while i < len(parts):
            name = parts[i]
            arg = parts[i + 1] if i + 1 < len(parts) else None
            if name in ("ip4", "ip6", "dns", "dns4", "dns6"):
                if arg is None:
                    raise ConfigError(f"address {original!r}: /{name} needs a host")
                if name == "ip4" and not _is_ipv4(arg):
                    raise ConfigError(f"address {original!r}: {arg!r} is not an IPv4 address (a.b.c.d)")
                if name == "ip6" and not _is_ipv6(arg):
                    raise ConfigError(f"address {original!r}: {arg!r} is not an IPv6 address")
                host = arg
                i += 2
            elif name in ("tcp", "udp"):
                if arg is None:
                    raise ConfigError(f"address {original!r}: /{name} needs a port")
                port = _port(arg, original)
                proto = name
                i += 2
            elif name in ("quic", "quic-v1"):
                proto = "quic"
                i += 1
            elif name == "p2p":
                if arg is None:
                    raise ConfigError(f"address {original!r}: /p2p needs a peer ID")
                peer = PeerID.from_text(arg)
                i += 2
            else:
                raise ConfigError(
                    f"address {original!r}: unsupported component /{name}; "
                    "use /ip4|ip6|dns4/HOST/tcp|udp/PORT[/p2p/ID]"
                )
        if not host or port is None:
            raise ConfigError(f"address {original!r} needs both a host and a port")
        return PeerAddr(host, port, proto, peer)
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1:end + 2] != ":":
            raise ConfigError(f"address {original!r}: expected [IPV6]:PORT")
        return PeerAddr(text[1:end], _port(text[end + 2:], original))
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"address {original!r}: expected HOST:PORT (e.g. 127.0.0.1:9000)")
    return PeerAddr(host, _port(port_text, original))
