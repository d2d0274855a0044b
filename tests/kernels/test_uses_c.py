"""The ops really run in pymesh._C, and a missing _C is loud."""

from __future__ import annotations

import os

import pytest
import torch

from pymesh.model import ops, ops_ref
from pymesh.model.switches import SWITCHES
from tests.kernels.conftest import randn

pytestmark = pytest.mark.timeout(60)


def tiny_block(x: torch.Tensor, residual: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """One Llama-style decoder block, through the fused ops only (attention without softmax
    detail: the point is that every op is exercised the way the model calls it)."""
    hidden, heads, kv, d = 64, 4, 2, 16
    w = {name: randn(*shape, seed=i) * 0.1 for i, (name, shape) in enumerate({
        "qkv": ((heads + 2 * kv) * d, hidden), "o": (hidden, heads * d),
        "gate_up": (2 * 96, hidden), "down": (hidden, 96)}.items())}
    norm = torch.ones(hidden)
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.arange(32, dtype=torch.float32)[:, None] * inv
    cos, sin = angles.cos(), angles.sin()
    ops.fused_add_rms_norm(x, residual, norm, 1e-6)
    qkv = ops.linear(x, w["qkv"])
    q = qkv[..., : heads * d].view(-1, heads, d)
    k = qkv[..., heads * d:(heads + kv) * d].view(-1, kv, d)
    ops.rotary_embedding(q, k, pos, cos, sin)
    attn = ops.linear(q.reshape(x.shape[0], -1), w["o"])
    h = ops.rms_norm(attn + residual, norm, 1e-6)
    gate, up = ops.linear(h, w["gate_up"]).chunk(2, dim=-1)
    return ops.linear(ops.silu_and_mul(gate, up), w["down"])


def test_a_forward_goes_through_c() -> None:
    assert ops.using_c(), "pymesh._C is missing: rebuild with `pip install -e . --no-deps`"
    ops.reset_kernel_stats()
    with torch.inference_mode():
        out = tiny_block(randn(3, 64, seed=1), randn(3, 64, seed=2), torch.tensor([4, 5, 6]))
    assert torch.isfinite(out).all()
    stats = ops.kernel_stats()
    assert stats == {"rms_norm": 1, "fused_add_rms_norm": 1, "rotary_embedding": 1,
                     "silu_and_mul": 1, "linear": 4, "qlinear": 0}, stats


def test_require_c_is_set_by_the_test_command() -> None:
    if os.environ.get("PYMESH_REQUIRE_C") != "1":
        pytest.skip("PYMESH_REQUIRE_C is not set (the README's test command sets it)")
    assert SWITCHES.require_c, "tests/conftest.py must set the switch from PYMESH_REQUIRE_C"
    assert ops.using_c()


def test_missing_c_falls_back_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "_C", None)
    monkeypatch.setattr(ops, "_IMPORT_ERROR", "simulated")
    monkeypatch.setattr(ops, "_warned", set())
    monkeypatch.setattr(SWITCHES, "require_c", False)
    x, w = randn(2, 64, seed=3), randn(64, seed=4)
    ops.reset_kernel_stats()
    with pytest.warns(RuntimeWarning, match="pure-torch reference"):
        out = ops.rms_norm(x, w, 1e-6)
    torch.testing.assert_close(out, ops_ref.rms_norm_ref(x, w, 1e-6))
    assert ops.kernel_stats()["rms_norm"] == 0


def test_missing_c_is_an_error_under_require_c(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "_C", None)
    monkeypatch.setattr(ops, "_IMPORT_ERROR", "simulated")
    monkeypatch.setattr(SWITCHES, "require_c", True)   # what the CLI sets for PYMESH_REQUIRE_C=1
    with pytest.raises(ops.KernelUnavailableError, match="PYMESH_REQUIRE_C=1 forbids"):
        ops.silu_and_mul(randn(2, 8), randn(2, 8))
    with pytest.raises(ops.KernelUnavailableError):
        ops.linear(randn(1, 8), randn(4, 8))


def test_grad_mode_inputs_use_the_reference_or_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    w = randn(64, seed=5).requires_grad_()
    monkeypatch.setattr(SWITCHES, "require_c", True)
    with pytest.raises(ops.KernelUnavailableError, match="inference_mode"):
        ops.rms_norm(randn(2, 64), w, 1e-6)
    with torch.inference_mode():
        ops.rms_norm(randn(2, 64), w, 1e-6)


def test_kernels_release_the_gil() -> None:
    """A long kernel in one thread must not stop Python code in another."""
    import threading
    import time

    w = randn(4096, 4096, seed=6)
    x = randn(8, 4096, seed=7)
    ticks = 0
    done = threading.Event()

    def spin() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            time.sleep(0)

    t = threading.Thread(target=spin)
    t.start()
    try:
        start = ticks
        for _ in range(20):
            ops.linear(x, w)
        progressed = ticks - start
    finally:
        done.set()
        t.join(5)
    assert progressed > 500, f"only {progressed} ticks while the kernel ran: GIL held?"
