"""The ``pymesh`` command: argument parsing, logging set-up, dispatch.

Each subcommand lives in its own module under ``pymesh.cli`` exposing
``add_arguments(parser)`` and ``run(args) -> int``. Those modules import nothing
heavy at module level (``pymesh bootstrap`` must never import torch), so the whole
parser can be built cheaply.

``main`` reads the environment once (:func:`pymesh.settings.load_settings`; a bad
``PYMESH_*`` value is a one-line error and exit status 2) and hands the result to the
subcommand as ``args.settings``. It also sets ``OMP_WAIT_POLICY`` before any subcommand can
import torch (OpenMP reads it when torch loads it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Sequence

from pymesh import __version__
from pymesh.cli.common import load_optional
from pymesh.monitor.text import printable, printable_lines

#: subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "bootstrap": ("pymesh.cli.bootstrap", "run a DHT bootstrap node (rendezvous for workers and clients)"),
    "worker": ("pymesh.cli.worker", "serve a span of transformer blocks to the swarm"),
    "relay": ("pymesh.cli.relay", "relay for workers and clients behind NAT (end-to-end encrypted circuits)"),
    "client": ("pymesh.cli.client", "generate text through the swarm (or test an echo chain)"),
    "serve": ("pymesh.cli.serve", "serve an OpenAI-compatible HTTP API in front of the swarm"),
    "generate": ("pymesh.cli.generate", "generate text in this process (the single-process baseline)"),
    "model": ("pymesh.cli.model", "fetch, convert and synthesize models (pull, convert, synth)"),
    "bench": ("pymesh.cli.bench", "run benchmarks side by side with their baselines"),
    "monitor": ("pymesh.cli.monitor", "live TUI of the swarm: workers, coverage, throughput"),
    "demo": ("pymesh.cli.demo", "start a local swarm on the embedded model and chat with it"),
    "identity": ("pymesh.cli.identity", "show the peer ID of an identity key file (for --allow-peers)"),
    "blocklist": ("pymesh.cli.blocklist", "list or edit the workers this machine's clients never route through"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pymesh",
        description="pymesh: run a large language model split across machines, BitTorrent-style.",
    )
    parser.add_argument("--version", action="version", version=f"pymesh {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors in the log")
    parser.add_argument("--log-file", default=None, help="also write the log to this file")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if only is not None and name != only:
            continue
        module = load_optional(module_name)
        if module is None:
            sp.set_defaults(_unavailable=name)
            continue
        module.add_arguments(sp)
        sp.set_defaults(_run=module.run)
    return parser


class SafeFormatter(logging.Formatter):
    """Log lines with control characters escaped (``\\x1b``, ``\\n``): a message may quote what a
    peer sent (a model id, a host, an error text), and an escape sequence in it must neither reach
    the terminal nor forge a line in a log file. Tracebacks keep their newlines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record), None)

    def formatException(self, ei: Any) -> str:
        return printable_lines(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return printable_lines(super().formatStack(stack_info))


def configure_logging(verbose: int, quiet: bool, log_file: str | None, env_level: str | None = None) -> None:
    """Root logging from -v / -q; ``env_level`` (``PYMESH_LOG_LEVEL``, a level name) wins."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose >= 2 else logging.INFO)
    if env_level:
        level = getattr(logging, env_level.upper(), level)
    handlers: list[logging.Handler] = []
    stream = logging.StreamHandler(sys.stderr)
    handlers.append(stream)
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    fmt = SafeFormatter("%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
    for h in handlers:
        h.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(level)
    if verbose < 3:
        for noisy in ("quic", "aioquic", "trio"):
            logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def main(argv: Sequence[str] | None = None) -> int:
    # Several pymesh processes share the CPU, so none may spin while waiting. OpenMP reads
    # this when torch loads it: set before any subcommand module (or its arguments) imports torch.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    # Build only the chosen subcommand's arguments: keeps start-up cheap.
    only = next((a for a in argv if a in SUBCOMMANDS), None)
    parser = build_parser(only)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "_unavailable", None):
        print(f"pymesh: the '{args._unavailable}' command is not available in this build yet", file=sys.stderr)
        return 2
    from pymesh.errors import PymeshError
    from pymesh.settings import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"pymesh {args.command}: error: {exc}", file=sys.stderr)
        return 2
    args.settings = settings
    configure_logging(args.verbose, args.quiet, args.log_file, settings.log_level)
    from pymesh.cli.common import apply_runtime_switches

    apply_runtime_switches(settings)

    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except PymeshError as exc:
        logging.getLogger("pymesh").debug("error detail", exc_info=True)
        print(f"pymesh {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
