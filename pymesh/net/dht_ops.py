"""What the DHT node's components need from the node (a Protocol, so they import no DHTNode)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from pymesh.proto.krpc import Addr, Contact, Response

if TYPE_CHECKING:
    from pymesh.net.dht_config import DHTConfig
    from pymesh.proto.dht_core import DHTCore
    from pymesh.proto.identity import Identity

#: What one lookup returns: (k closest that answered, every reply by node id).
LookupResult = tuple[list[Contact], dict[bytes, tuple[Contact, Response]]]


class DHTOps(Protocol):
    """What the node's components (records, bootstrapper) need from their DHT node: who it
    is, its sans-I/O core and config, and lookups, queries and token-carrying writes."""

    @property
    def identity(self) -> "Identity": ...

    @property
    def node_id(self) -> bytes: ...

    @property
    def config(self) -> "DHTConfig": ...

    @property
    def core(self) -> "DHTCore": ...

    async def lookup(self, target: bytes, method: bytes = b"find_node",
                     args: dict[bytes, object] | None = None) -> LookupResult: ...

    async def query(self, addr: Addr, method: bytes, args: dict[bytes, object] | None = None, *,
                    node_id: bytes | None = None, timeout: float | None = None) -> Response: ...

    async def write_to(self, closest: list[Contact], replies: dict[bytes, tuple[Contact, Response]],
                       method: bytes, args: dict[bytes, object]) -> int: ...
