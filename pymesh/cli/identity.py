"""``pymesh identity show FILE``: print the peer ID of a key file (for ``--allow-peers`` lists)."""

from __future__ import annotations

import argparse

from pymesh.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="identity_command", metavar="ACTION")
    show = sub.add_parser("show", help="print the peer ID of a key file",
                          description="Print the peer ID of an identity key file (one line), e.g. to "
                                      "build the file that --allow-peers reads. The key is only read.")
    show.add_argument("file", metavar="FILE", help="identity key file (e.g. ~/.pymesh/worker-7000.key)")


def run(args: argparse.Namespace) -> int:
    from pymesh.proto.identity import Identity

    if args.identity_command != "show":
        raise ConfigError("say what to do, e.g. `pymesh identity show FILE`")
    try:
        ident = Identity.load(args.file)
    except OSError as exc:
        raise ConfigError(f"identity file {args.file} cannot be read: {exc.strerror or exc}") from None
    print(ident.peer_id.to_text())
    return 0
