"""Fused kernels (pymesh._C) against the pure-torch reference, per op, dtype and token count.

``python bench/kernels.py [ARGS]`` is ``pymesh bench kernels [ARGS]`` (``--help`` lists ARGS).
"""

import sys

from pymesh.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "kernels", *sys.argv[1:]]))
