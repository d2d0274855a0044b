"""Private swarms: the set of peers a node agrees to deal with (``--allow-peers FILE``).

The file lists one peer ID a line in its text form (what ``pymesh identity show KEYFILE``
prints); ``#`` starts a comment, blank lines are ignored. Every role that takes the flag
uses the same :class:`PeerAllowlist`: a worker serves only listed clients and pushes only
to listed workers, a client routes only through listed workers, and the monitor, routing
and placement ignore records signed by unlisted keys. No flag means no list: everyone is
allowed (an open swarm), which callers express as ``allow_peers=None``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from pymesh.errors import ConfigError, IdentityError
from pymesh.proto.identity import PeerID

#: an allowlist file larger than this is not a list of peer IDs (each line is ~53 bytes)
MAX_ALLOWLIST_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class PeerAllowlist:
    """An immutable set of allowed peers. ``peer in allowlist`` and :meth:`allows` agree."""

    peers: frozenset[PeerID]

    @classmethod
    def of(cls, peers: Iterable[PeerID]) -> "PeerAllowlist":
        return cls(frozenset(peers))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "PeerAllowlist":
        """Read ``path``; ConfigError naming the file (and the line) for anything wrong."""
        p = Path(path)
        try:
            size = p.stat().st_size
            if size > MAX_ALLOWLIST_BYTES:
                raise ConfigError(f"allowlist {p}: {size} bytes is too large for a list of peer IDs "
                                  f"(at most {MAX_ALLOWLIST_BYTES}); is this the right file?")
            data = p.read_bytes()
        except OSError as exc:
            raise ConfigError(f"allowlist {p} cannot be read: {exc.strerror or exc}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"allowlist {p} is not UTF-8 text: expected one peer ID a line") from None
        return cls.parse(text, source=str(p))

    @classmethod
    def parse(cls, text: str, *, source: str = "<allowlist>") -> "PeerAllowlist":
        """Parse the file format from a string (``source`` names it in errors)."""
        peers: set[PeerID] = set()
        for lineno, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                peers.add(PeerID.from_text(line))
            except IdentityError as exc:
                raise ConfigError(f"allowlist {source}, line {lineno}: {exc}; each line holds one peer ID "
                                  "as printed by `pymesh identity show KEYFILE`") from None
        if not peers:
            raise ConfigError(f"allowlist {source} lists no peer ID: an empty allowlist would refuse "
                              "every peer (add one peer ID a line, or drop --allow-peers)")
        return cls(frozenset(peers))

    def allows(self, peer: PeerID) -> bool:
        return peer in self.peers

    def __contains__(self, peer: object) -> bool:
        return peer in self.peers

    def __len__(self) -> int:
        return len(self.peers)

    def __iter__(self) -> Iterator[PeerID]:
        return iter(sorted(self.peers))


def allowed(allowlist: PeerAllowlist | None, peer: PeerID) -> bool:
    """True when there is no allowlist (an open swarm) or ``peer`` is on it."""
    return allowlist is None or allowlist.allows(peer)
