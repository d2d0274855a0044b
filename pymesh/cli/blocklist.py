"""``pymesh blocklist [--blocklist PATH] list|add PEER|remove PEER``: the workers clients never
route through (convicted of wrong answers by verified inference, or added by hand)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone

from pymesh.cli.common import add_blocklist_argument, blocklist_path_of
from pymesh.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_blocklist_argument(parser, "the blocklist file to read or change")
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    ls = sub.add_parser("list", help="list the blocklisted workers: peer, when, why, evidence file")
    ls.add_argument("--json", action="store_true", help="print the entries as JSON")
    add = sub.add_parser("add", help="blocklist a worker by hand")
    add.add_argument("peer", metavar="PEER", help="the worker's peer ID")
    add.add_argument("--why", default="added by hand", help="the reason kept with the entry")
    rm = sub.add_parser("remove", help="drop a worker's entry (clients may route through it again)")
    rm.add_argument("peer", metavar="PEER", help="the worker's peer ID (as `pymesh blocklist list` prints it)")


def _when(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{ts:.0f}"


def run(args: argparse.Namespace) -> int:
    from pymesh.client.blocklist import Blocklist
    from pymesh.errors import IdentityError
    from pymesh.monitor.text import printable
    from pymesh.proto.identity import PeerID

    path = blocklist_path_of(args)
    if path is None:
        raise ConfigError("--blocklist none names no file: give the blocklist's PATH (or leave the flag out "
                          "for $PYMESH_HOME/blocklist.json)")
    action = getattr(args, "action", None)
    if action is None:
        raise ConfigError("say what to do: pymesh blocklist list | add PEER | remove PEER")
    blocklist = Blocklist(path)
    if action == "list":
        entries = sorted(blocklist.load().values(), key=lambda e: e.when)
        if getattr(args, "json", False):
            json.dump([{"peer": e.peer.to_text(), "when": e.when, "why": e.why, "evidence": e.evidence}
                       for e in entries], sys.stdout, indent=1)
            sys.stdout.write("\n")
            return 0
        if not entries:
            print(f"blocklist {path}: no workers")
            return 0
        print(f"blocklist {path}: {len(entries)} worker(s)")
        print(f"{'peer':<52}  {'when (UTC)':<20}  {'why':<40}  evidence")
        for e in entries:
            # a hand-edited file may hold anything: escaped before it reaches the terminal
            print(f"{e.peer.to_text():<52}  {_when(e.when):<20}  {printable(e.why, 200):<40}  "
                  f"{printable(e.evidence, 300) if e.evidence else '-'}")
        return 0
    try:
        peer = PeerID.from_text(args.peer)
    except IdentityError as exc:
        raise ConfigError(f"{exc}") from None
    if action == "add":
        blocklist.add(peer, args.why)
        print(f"blocklisted {peer.to_text()} in {path}")
        return 0
    if blocklist.remove(peer):
        print(f"removed {peer.to_text()} from {path}")
        return 0
    print(f"pymesh blocklist: {peer.to_text()} is not on the blocklist {path}", file=sys.stderr)
    return 1
