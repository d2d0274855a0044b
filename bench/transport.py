"""Transport benchmark (same as ``pymesh bench transport``).

    python bench/transport.py [--json] [--out FILE] [--quick] [--cases pymesh-quic,aioquic-asyncio,...]
"""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.progress import Progress

from pymesh.bench import transport


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON to stdout")
    parser.add_argument("--out", default=None, help="also write the rows as JSON to this file")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    transport.add_arguments(parser)
    args = parser.parse_args(argv)
    with Progress(console=Console(stderr=True), transient=True) as progress:
        rows = transport.run_rows(args, progress)
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        Console().print(transport.render(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
