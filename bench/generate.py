"""Decode speed in one process: pymesh against transformers (float32, bfloat16) and the bandwidth ceiling.

``python bench/generate.py [ARGS]`` is ``pymesh bench generate [ARGS]`` (``--help`` lists ARGS).
"""

import sys

from pymesh.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "generate", *sys.argv[1:]]))
