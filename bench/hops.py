"""The cost of each added hop: one session through 1, 2, 3, 5 workers over TCP and QUIC.

``python bench/hops.py [ARGS]`` is ``pymesh bench hops [ARGS]`` (``--help`` lists ARGS).
"""

import sys

from pymesh.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "hops", *sys.argv[1:]]))
