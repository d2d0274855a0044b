"""The NAT topology harness moved to pymesh/bench/netns.py (``pymesh bench nat`` uses it too);
this re-export keeps ``from tests.nat.netns import ...`` working."""

from __future__ import annotations

from pymesh.bench.netns import *  # noqa: F401,F403
from pymesh.bench.netns import (  # noqa: F401  (private names tests use)
    NAT_RULES, PREFIX, Home, Host, NetnsError, Topology, _list_namespaces, netns_available,
    remove_stale_namespaces, standard_topology,
)
