"""Transport round trips and throughput: pymesh QUIC and TCP against aioquic and a raw UDP floor.

``python bench/transport.py [ARGS]`` is ``pymesh bench transport [ARGS]`` (``--help`` lists ARGS).
"""

import sys

from pymesh.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "transport", *sys.argv[1:]]))
