"""A span whose weight matrices are quantized gives the same numbers through the decode plan
(pymesh._C.qlinear called from DecodePlan) as through the checked SpanModel path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pymesh.model import decode_plan, ops
from pymesh.model.decode_plan import DecodePlan
from pymesh.model.generate import LocalModel
from pymesh.model.quant import QTensor
from pymesh.model.switches import SWITCHES
from tests.model.test_decode_plan import _decode
from tests.model.tiny import make_tiny_model

needs_c = pytest.mark.skipif(not (ops.using_c() and hasattr(ops._C, "qlinear")),
                             reason="pymesh._C with qlinear is not built: the plan needs the kernel")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp(request.param), request.param)


@needs_c
@pytest.mark.timeout(120)
@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("dtype, batch", [(torch.float32, 1), (torch.float32, 3), (torch.bfloat16, 2)])
def test_quantized_plan_equals_checked_path(folder: Path, qtype: str, dtype: torch.dtype, batch: int,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    model = LocalModel.load(folder, dtype=dtype, quantize=qtype)
    assert isinstance(model.span.blocks[0].w_gate_up, QTensor)
    fast, plan = _decode(model, batch, 6)
    assert isinstance(plan, DecodePlan)
    monkeypatch.setattr(SWITCHES, "fast_decode", False)
    assert not decode_plan.fast_decode_enabled()
    before = ops.kernel_stats()["qlinear"]
    checked, plan = _decode(model, batch, 6)
    assert plan is False
    assert ops.kernel_stats()["qlinear"] > before  # the checked path ran the kernel too
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in zip(fast, checked):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
