"""A local swarm of worker processes against single-process generation, over QUIC and TCP.

``python bench/swarm.py [ARGS]`` is ``pymesh bench swarm [ARGS]`` (``--help`` lists ARGS).
"""

import sys

from pymesh.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "swarm", *sys.argv[1:]]))
