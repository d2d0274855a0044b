"""The DHT benchmark's rows and table (tiny networks, so it runs in seconds)."""

from __future__ import annotations

import argparse

from rich.console import Console

from pymesh.bench import dht


def test_run_rows_and_render() -> None:
    parser = argparse.ArgumentParser()
    dht.add_arguments(parser)
    args = parser.parse_args(["--sizes", "40,80", "--lookups", "30", "--light-join-above", "60"])
    rows = dht.run_rows(args, None)
    assert [r["nodes"] for r in rows] == [40, 80]
    assert [r["join"] for r in rows] == ["full", "light"]
    for r in rows:
        assert set(r) >= {"nodes", "success_rate", "median_rounds", "p95_rounds", "messages_per_lookup"}
        assert 0.0 <= r["success_rate"] <= 1.0
        assert 1 <= r["median_rounds"] <= r["p95_rounds"]
        assert r["messages_per_lookup"] >= 8  # at least the k closest are asked
    console = Console(record=True, width=120)
    console.print(dht.render(rows))
    text = console.export_text()
    assert "success_rate" in text and "80" in text
