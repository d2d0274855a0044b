"""Fused kernels vs the pure-torch reference: a thin wrapper of ``pymesh bench kernels``.

    python bench/kernels.py [--json] [--out FILE] [--quick] [--threads 2] [--ops rms_norm,linear]
"""

from __future__ import annotations

import sys

from pymesh.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "kernels", *sys.argv[1:]]))
