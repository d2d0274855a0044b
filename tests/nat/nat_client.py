"""Greedy generation through a swarm from inside a network namespace, as one JSON line.

    python tests/nat/nat_client.py BOOTSTRAP MODEL_DIR PROMPT N [--transport quic]
        [--kill-after K --kill LOG:PID[,LOG:PID]]

With ``--kill``: once K tokens came, SIGKILL the first listed process whose log shows it
opened a circuit to ``--kill-target`` (a relay in use; PIDs are global, only networks are
namespaced).
Prints {"tokens", "route" (with each hop's path), "recoveries", "killed"}.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("bootstrap")
    ap.add_argument("model")
    ap.add_argument("prompt")
    ap.add_argument("n", type=int)
    ap.add_argument("--transport", default="quic")
    ap.add_argument("--kill-after", type=int, default=0)
    ap.add_argument("--kill", default="")
    ap.add_argument("--kill-target", default="", help="the peer (short id) whose circuit the relay must carry")
    args = ap.parse_args()

    from pymesh.client.api import SwarmClient
    from pymesh.model.sampling import SamplingParams
    from pymesh.settings import load_settings

    victims = [(Path(p.rsplit(":", 1)[0]), int(p.rsplit(":", 1)[1])) for p in args.kill.split(",") if p]
    got: list[int] = []
    killed = None
    route_at_kill = None
    with SwarmClient([args.bootstrap], Path(args.model), transport=args.transport,
                     settings=load_settings()) as client:
        for token in client.generate(args.prompt, SamplingParams(max_new_tokens=args.n)):
            got.append(token)
            if victims and len(got) == args.kill_after:
                stats = client.last_stats
                route_at_kill = stats.route if stats is not None else None
                for log, pid in victims:
                    if f"to {args.kill_target} open" in log.read_text(errors="replace"):
                        os.kill(pid, signal.SIGKILL)
                        killed = pid
                        break
        stats = client.last_stats
    assert stats is not None
    json.dump({"tokens": got, "route": stats.route, "recoveries": stats.recoveries, "killed": killed,
               "route_at_kill": route_at_kill}, sys.stdout, default=str)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
