"""``pymesh monitor --bootstrap ADDR [--model NAME] [--interval S] [--once]``."""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys

from pathlib import Path
from typing import Mapping

from pymesh.cli.common import add_allow_peers_argument, add_blocklist_argument, allow_peers_of, blocklist_path_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", action="append", required=True, metavar="ADDR",
                        help="bootstrap node address (HOST:PORT or /ip4/HOST/udp/PORT); repeatable")
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="show only this model (a name, or name@fingerprint)")
    parser.add_argument("--interval", type=float, default=2.0, metavar="S",
                        help="seconds between polls of the DHT (default 2)")
    parser.add_argument("--once", action="store_true",
                        help="print one snapshot as plain text and exit (for scripts)")
    parser.add_argument("--json", action="store_true",
                        help="with --once: print the snapshot as JSON (workers, per-model gaps) instead of tables")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="S",
                        help="how long one poll may take (default 5); with --once, how long to "
                             "wait for the first records")
    parser.add_argument("--blocks", type=int, default=None, metavar="N",
                        help="the model has N blocks (shows missing tail blocks as gaps; "
                             "otherwise the largest announced block bounds the map)")
    parser.add_argument("--host", default="0.0.0.0", help="address the monitor's DHT node binds")
    add_allow_peers_argument(parser, "show only workers whose records are signed by a listed peer")
    add_blocklist_argument(parser, "workers on this blocklist are marked flagged (re-read when it changes)")


class BlocklistWatch:
    """Peer text -> why of a blocklist file, re-read when its modification time or size
    changes (a client convicting a worker while the monitor runs shows at the next poll)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int] | None = None
        self._flags: dict[str, str] = {}

    def __call__(self) -> Mapping[str, str]:
        from pymesh.client.blocklist import Blocklist

        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = (0, -1)
        if stamp != self._seen:
            entries = Blocklist(self.path).load()   # BlocklistError: the caller decides
            self._flags = {p.to_text(): e.why for p, e in entries.items()}
            self._seen = stamp
        return self._flags


def run(args: argparse.Namespace) -> int:
    import trio
    from rich.console import Console

    from pymesh.settings import settings_of
    from pymesh.errors import ConfigError
    from pymesh.monitor.app import MonitorOptions, monitor_loop
    from pymesh.monitor.state import snapshot
    from pymesh.proto.addr import parse_addr

    path = blocklist_path_of(args)
    watch = None if path is None else BlocklistWatch(path)
    if watch is not None:
        watch()   # a malformed blocklist is one error line now, not a warning every poll
    if args.interval <= 0 or args.timeout <= 0:
        raise ConfigError("--interval and --timeout must be positive numbers of seconds")
    if args.blocks is not None and args.model is None:
        raise ConfigError("--blocks N needs --model NAME (the block count of which model?)")
    options = MonitorOptions(
        bootstrap=[parse_addr(a) for a in args.bootstrap],
        model=args.model,
        interval=args.interval,
        poll_timeout=args.timeout,
        host=args.host,
        model_blocks=None,
        settings=settings_of(args),
        allow_peers=allow_peers_of(args),
        flagged=watch,
    )
    if args.json and not args.once:
        raise ConfigError("--json prints one snapshot: use it together with --once")
    if args.once:
        # Plain text for scripts: no colours, no cursor control, a wide fixed layout.
        console = Console(color_system=None, width=160, soft_wrap=False, force_terminal=False,
                          file=io.StringIO() if args.json else None)
    else:
        console = Console()
    if args.blocks is not None:
        options.model_blocks = {args.model: args.blocks}
    if not args.verbose:
        # Log lines would tear the full-screen view (and clutter --once output): -v keeps them.
        logging.getLogger("pymesh").setLevel(logging.WARNING)
    try:
        state = trio.run(lambda: monitor_loop(options, console=console, once=args.once))
    except KeyboardInterrupt:
        return 0
    if args.json:
        json.dump(snapshot(state), sys.stdout, indent=1)
        sys.stdout.write("\n")
    if args.once and not state.workers and state.bootstrap_ok is False:
        print("pymesh monitor: the bootstrap node did not answer", file=sys.stderr)
        return 3
    return 0
