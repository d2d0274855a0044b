"""`pymesh serve` (HTTP, the openai SDK) against the Python API on the same local swarm.

``python bench/serve.py [ARGS]`` is ``pymesh bench serve [ARGS]`` (``--help`` lists ARGS).
"""

import sys

from pymesh.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "serve", *sys.argv[1:]]))
