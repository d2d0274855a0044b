"""``pymesh bench quant``: quantized forms vs float32 on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pymesh.cli.main import main
from tests.model.tiny import make_tiny_model

pytestmark = pytest.mark.timeout(300)


def test_bench_quant_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny = make_tiny_model(tmp_path)
    assert main(["bench", "quant", "--json", "--model-path", str(tiny), "--types", "q8_0,q4_0",
                 "--new-tokens", "6", "--prompts", "2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["dtype"], r["against"]) for r in rows] == [
        (t, a) for t in ("q8_0", "q4_0") for a in ("float32 folder", "own blocks in fp32")]
    for r in rows:
        assert r["weights"] == "quantized at load" and r["prompts"] == 2 and r["new_tokens"] == 6
        assert 0.0 <= r["top1_agreement"] <= 1.0 and 0 <= r["greedy_exact"] <= 2
        assert 0.0 <= r["mean_abs_dlogit"] <= r["max_abs_dlogit"]
    by = {(r["dtype"], r["against"]): r for r in rows}
    # 4-bit blocks move the logits further from the original weights than 8-bit ones
    assert by[("q4_0", "float32 folder")]["mean_abs_dlogit"] > by[("q8_0", "float32 folder")]["mean_abs_dlogit"] > 0


def test_bench_quant_rejects_unknown_types(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny = make_tiny_model(tmp_path)
    assert main(["bench", "quant", "--model-path", str(tiny), "--types", "q3_k"]) != 0
    assert "q3_k" in capsys.readouterr().err
