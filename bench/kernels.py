"""Fused kernels vs the pure-torch reference (same as ``pymesh bench kernels``).

    python bench/kernels.py [--json] [--out FILE] [--quick] [--threads 2] [--ops ...]
"""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.progress import Progress

from pymesh.bench import kernels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON to stdout")
    parser.add_argument("--out", default=None, help="also write the rows as JSON to this file")
    parser.add_argument("--quick", action="store_true", help="shorter sampling")
    kernels.add_arguments(parser)
    args = parser.parse_args(argv)
    with Progress(console=Console(stderr=True), transient=True) as progress:
        rows = kernels.run_rows(args, progress)
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        Console().print(kernels.render(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
