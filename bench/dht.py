"""DHT lookups in the socket-free simulation: rounds and success rate at 100 to 10,000 nodes.

``python bench/dht.py [ARGS]`` is ``pymesh bench dht [ARGS]`` (``--help`` lists ARGS).
"""

import sys

from pymesh.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "dht", *sys.argv[1:]]))
