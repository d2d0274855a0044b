"""``pymesh bench dht``: DHT lookup quality and cost on simulated networks.

``pymesh bench dht [--json] [--sizes 100,1000,10000]`` prints, per network size, the row
:func:`pymesh.proto.dht_sim.simulate` measures (success rate, rounds, messages, dead
queries; see that module); networks above ``--light-join-above`` nodes join lightly to
keep the run short.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from pymesh.proto.dht_sim import simulate

# -- pymesh bench dht ----------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="100,1000,10000",
                        help="comma-separated network sizes (default 100,1000,10000)")
    parser.add_argument("--lookups", type=int, default=500, help="lookups measured per size")
    parser.add_argument("--churn", type=float, default=0.2, help="fraction of nodes that leave before measuring")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--light-join-above", type=int, default=5000,
                        help="networks larger than this join lightly: own-ID lookup only, no "
                             "lookups into sparse far buckets (default 5000)")


def run_rows(args: argparse.Namespace, progress: Any) -> list[dict[str, Any]]:
    sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    lookups = int(args.lookups)
    if getattr(args, "quick", False):
        sizes = [s for s in sizes if s <= 1000] or sizes[:1]
        lookups = min(lookups, 200)
    rows = []
    for n in sizes:
        light = n > int(args.light_join_above)
        rows.append(simulate(n, lookups, churn=args.churn, seed=args.seed, join_refresh=0 if light else 160,
                             on_progress=_progress_bar(progress, f"dht: {n} nodes", n + lookups)))
    return rows


def _progress_bar(progress: Any, label: str, total: int) -> Callable[[int], None] | None:
    """A ``rich`` progress task as simulate()'s ``on_progress`` callback (None without one)."""
    if progress is None:
        return None
    task = progress.add_task(label, total=total)

    def update(done: int) -> None:
        progress.update(task, completed=done)

    return update


def render(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title="DHT lookups (simulated, 20% churn; goal: median rounds <= 4 at 1,000 nodes)")
    for col in ("nodes", "join", "success_rate", "median_rounds", "p95_rounds", "messages_per_lookup",
                "alpha-only success", "alpha-only median rounds", "dead queries/lookup"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["nodes"]), str(r.get("join", "")), f"{r['success_rate']:.3f}", f"{r['median_rounds']:.1f}",
                      f"{r['p95_rounds']:.1f}", f"{r['messages_per_lookup']:.1f}",
                      f"{r['alpha_only_success_rate']:.3f}", f"{r['alpha_only_median_rounds']:.1f}",
                      f"{r.get('dead_queries_per_lookup', 0.0):.2f}")
    return table
