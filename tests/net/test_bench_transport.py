"""Smoke test: the transport benchmark runs and emits its row schema (no timing asserts)."""

from __future__ import annotations

import argparse

import pytest
from rich.console import Console
from rich.progress import Progress

from pymesh.bench import transport

KEYS = {"transport", "packet_size", "rtt_us_median", "rtt_us_p99", "mb_per_s", "cpu_us_per_call", "cpu_mb_per_s"}


@pytest.mark.timeout(120)
def test_transport_bench_rows_schema() -> None:
    parser = argparse.ArgumentParser()
    transport.add_arguments(parser)
    args = parser.parse_args(["--cases", "udp-floor,pymesh-quic,aioquic-asyncio,pymesh-quic-default", "--rtt-calls", "20",
                              "--bulk-calls", "1", "--rounds", "1"])
    args.quick = True
    with Progress(console=Console(quiet=True)) as progress:
        rows = transport.run_rows(args, progress)
    assert [(r["transport"], r["packet_size"]) for r in rows] == [
        ("udp-floor", None), ("pymesh-quic", 1452), ("aioquic-asyncio", 1452),
        ("pymesh-quic", 16384), ("aioquic-asyncio", 16384), ("pymesh-quic-default", None)]
    for r in rows:
        assert set(r) == KEYS
        assert r["rtt_us_median"] > 0 and r["rtt_us_p99"] >= r["rtt_us_median"]
        assert (r["mb_per_s"] is None) == (r["transport"] == "udp-floor")
    console = Console(record=True, width=120)
    console.print(transport.render(rows))
    assert "aioquic-asyncio" in console.export_text()


def test_pymesh_rows_use_the_packet_size_they_name_and_default_rows_the_defaults() -> None:
    from pymesh.net.config import MAX_PACKET_SIZE, TransportConfig

    named = transport._pymesh_config(1452, "reno")
    assert (named.packet_size_to(loopback=True), named.packet_size_to(loopback=False)) == (1452, 1452)
    default = transport._pymesh_config(None, "cubic")
    assert default.packet_size_to(loopback=True) == MAX_PACKET_SIZE
    assert default.packet_size == TransportConfig().packet_size and default.congestion_control == "cubic"
