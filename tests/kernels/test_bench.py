"""The kernel benchmark runs and emits its JSON schema (no timing is asserted)."""

from __future__ import annotations

import argparse
import os
from typing import Any

import pytest
from rich.console import Console
from rich.progress import Progress

from pymesh.bench import kernels

pytestmark = pytest.mark.timeout(120)


def run_quick(ops: str) -> list[dict[str, Any]]:
    """The benchmark's rows for `ops` with a tiny sampling budget on one thread."""
    parser = argparse.ArgumentParser()
    kernels.add_arguments(parser)
    args = parser.parse_args(["--ops", ops, "--budget", "0.001", "--threads", "1"])
    args.quick = True
    with open(os.devnull, "w") as sink, Progress(console=Console(file=sink), transient=True) as progress:
        return kernels.run_rows(args, progress)


def test_rows_have_the_schema_and_render() -> None:
    rows = run_quick("rms_norm,rotary")
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


def test_linear_rows_run_1_to_32_beside_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Linear's rows axis covers batched decode (1..32 rows) and prefill, each row with
    torch's time (ref) beside the kernel's, medians and best samples (small shapes here)."""
    monkeypatch.setattr(kernels, "LINEAR_SHAPES", ((48, 40),))
    rows = run_quick("linear")
    assert {r["tokens"] for r in rows} == {1, 2, 4, 8, 16, 32, 512}
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    for r in rows:
        assert (r["out"], r["hidden"]) == (48, 40)
        assert {"ref_us", "fused_us", "ref_us_min", "fused_us_min", "gbps", "ref_gbps",
                "read_ceiling_gbps"} <= r.keys()
        assert 0 < r["fused_us_min"] <= r["fused_us"] and 0 < r["ref_us_min"] <= r["ref_us"]
    console = Console(record=True, width=200)
    console.print(kernels.render(rows))
    assert "48x40" in console.export_text()
