"""Decode speed, pymesh vs transformers (fp32 and bf16) and the bandwidth ceiling.

Same as ``pymesh bench generate``; e.g. ``python bench/generate.py --json``.
"""

from __future__ import annotations

import sys

from pymesh.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "generate", *sys.argv[1:]]))
