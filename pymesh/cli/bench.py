"""``pymesh bench [PART] [--json] [--out FILE] [--quick]``.

Each part is a module ``pymesh.bench.<part>`` with ``add_arguments(parser)``,
``run_rows(args, progress) -> list[dict]`` and ``render(rows) -> rich Table``.
Without a part, every part runs in turn and the rows are tagged with ``part``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

PARTS = ("kernels", "generate", "transport", "dht", "swarm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the rows as JSON to stdout")
    parser.add_argument("--out", default=None, help="also write the rows as JSON to this file")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and sizes (about 2 minutes in all)")
    sub = parser.add_subparsers(dest="part", metavar="PART")
    for part in PARTS:
        sp = sub.add_parser(part, help=f"the {part} benchmark")
        sp.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the rows as JSON to stdout")
        sp.add_argument("--out", default=argparse.SUPPRESS, help="also write the rows as JSON to this file")
        sp.add_argument("--quick", action="store_true", default=argparse.SUPPRESS, help="fewer repetitions")
        module = _module(part)
        if module is not None:
            module.add_arguments(sp)


def _module(part: str):  # type: ignore[no-untyped-def]
    try:
        return importlib.import_module(f"pymesh.bench.{part}")
    except ModuleNotFoundError as exc:
        if exc.name == f"pymesh.bench.{part}":
            return None
        raise


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    parts = [args.part] if args.part else list(PARTS)
    all_rows: list[dict] = []
    for part in parts:
        module = _module(part)
        if module is None:
            console.print(f"[yellow]bench {part}: not available in this build[/]")
            if args.part:
                return 2
            continue
        if not args.part:
            # Running all parts: give each part its own defaults.
            sp = argparse.ArgumentParser()
            module.add_arguments(sp)
            part_args = sp.parse_args([])
            for key in ("json", "out", "quick"):
                setattr(part_args, key, getattr(args, key))
        else:
            part_args = args
        with Progress(console=console, transient=True) as progress:
            rows = module.run_rows(part_args, progress)
        if not args.json:
            Console().print(module.render(rows))
        for row in rows:
            all_rows.append({"part": part, **row} if not args.part else row)
    if args.json:
        json.dump(all_rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(all_rows, f, indent=1)
    return 0
