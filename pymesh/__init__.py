"""pymesh: pipeline-parallel LLM inference over a peer-to-peer swarm.

Importing the package has no side effects: subpackages are imported on use, so
``pymesh bootstrap`` never pulls in torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

#: Version of the wire protocol (DHT records and transport handshake). Bump on any
#: incompatible change; peers with another version are refused with a clear error.
PROTOCOL_VERSION = 1

__all__ = ["__version__", "PROTOCOL_VERSION"]
