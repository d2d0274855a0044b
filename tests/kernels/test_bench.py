"""The kernel benchmark runs and emits its JSON schema (no timing is asserted)."""

from __future__ import annotations

import argparse

import pytest
from rich.console import Console
from rich.progress import Progress

from pymesh.bench import kernels

pytestmark = pytest.mark.timeout(120)


def test_rows_have_the_schema_and_render() -> None:
    parser = argparse.ArgumentParser()
    kernels.add_arguments(parser)
    args = parser.parse_args(["--ops", "rms_norm,rotary", "--budget", "0.001", "--threads", "1"])
    args.quick = True
    with Progress(console=Console(file=open("/dev/null", "w")), transient=True) as progress:
        rows = kernels.run_rows(args, progress)
    assert {r["op"] for r in rows} == {"rms_norm", "rotary"}
    assert {r["tokens"] for r in rows} == {1, 2, 4, 8, 512}
    assert {r["hidden"] for r in rows} == {576, 4096}
    for r in rows:
        assert {"op", "tokens", "hidden", "dtype", "ref_us", "fused_us", "speedup"} <= r.keys()
        assert r["ref_us"] > 0 and r["fused_us"] > 0
        assert r["speedup"] == pytest.approx(r["ref_us"] / r["fused_us"], rel=0.02)
    console = Console(record=True, width=160)
    console.print(kernels.render(rows))
    assert "rms_norm" in console.export_text()


def test_unknown_op_is_refused() -> None:
    parser = argparse.ArgumentParser()
    kernels.add_arguments(parser)
    args = parser.parse_args(["--ops", "softmax"])
    with pytest.raises(SystemExit, match="unknown op"):
        kernels.run_rows(args, None)
