"""Swarm speed: N local worker processes vs single-process generation, over QUIC and TCP.

Same as ``pymesh bench swarm``; e.g. ``python bench/swarm.py --json``.
"""

from __future__ import annotations

import sys

from pymesh.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "swarm", *sys.argv[1:]]))
