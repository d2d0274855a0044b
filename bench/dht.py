"""Thin script: the DHT benchmark (same as ``pymesh bench dht``).

    python bench/dht.py [--json] [--sizes 100,1000,10000] [--lookups 500]
"""

from __future__ import annotations

import sys

from pymesh.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "dht", *sys.argv[1:]]))
