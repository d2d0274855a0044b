"""Ragged batches (several sequences' steps as one forward) give each sequence's solo numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pymesh.model.ragged import forward_ragged
from pymesh.model.shapes import ShapeError
from pymesh.model.span import load_span
from tests.model.tiny import make_tiny_model

CASES = {
    "llama": ("llama", {}),
    "mistral-window": ("mistral", {"sliding_window": 5}),
    "qwen2-bias": ("qwen2", {}),
    "phi3": ("phi3", {}),
}


@pytest.fixture(scope="module", params=list(CASES))
def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    arch, overrides = CASES[request.param]
    return make_tiny_model(tmp_path_factory.mktemp(request.param), arch, **overrides)


def _hidden(seed: int, seq: int, size: int) -> torch.Tensor:
    return torch.randn(1, seq, size, generator=torch.Generator().manual_seed(seed))


def test_ragged_matches_solo_runs_as_sequences_join_and_leave(folder: Path) -> None:
    """Four sequences with different prompts join at different steps, mix prefill chunks and
    decode rows in one pass, and leave; each one's outputs equal its solo run's."""
    span = load_span(folder, 0, 2)
    h = span.config.hidden_size
    # per sequence: the steps it takes (seq lengths), and the batch step at which it joins
    plans = {0: ([7, 1, 1, 1, 1, 1], 0), 1: ([3, 4, 1, 1], 1), 2: ([1, 1, 1], 2), 3: ([9, 1], 3)}
    solo: dict[int, list[torch.Tensor]] = {}
    for sid, (steps, _) in plans.items():
        cache, pos, outs = span.new_cache(32), 0, []
        for j, s in enumerate(steps):
            outs.append(span.forward(_hidden(100 * sid + j, s, h), cache, pos).clone())
            pos += s
        solo[sid] = outs
    caches = {sid: span.new_cache(32) for sid in plans}
    done = {sid: 0 for sid in plans}
    pos = {sid: 0 for sid in plans}
    sizes = set()
    for t in range(8):
        batch = [sid for sid, (steps, join) in plans.items() if join <= t and done[sid] < len(steps)]
        if not batch:
            break
        sizes.add(len(batch))
        items = [(_hidden(100 * sid + done[sid], plans[sid][0][done[sid]], h), caches[sid], pos[sid])
                 for sid in batch]
        outs = forward_ragged(span, items)
        for sid, (x, _, _), y in zip(batch, items, outs):
            assert y.shape == x.shape
            torch.testing.assert_close(y, solo[sid][done[sid]], rtol=1e-4, atol=1e-4)
            pos[sid] += x.shape[1]
            done[sid] += 1
    assert all(done[sid] == len(steps) for sid, (steps, _) in plans.items())
    assert len(sizes) >= 3, f"batch sizes should change step to step, got {sizes}"


def test_ragged_refuses_malformed_batches(folder: Path) -> None:
    span = load_span(folder, 0, 1)
    h = span.config.hidden_size
    cache = span.new_cache(8)
    with pytest.raises(ShapeError, match="at least one"):
        forward_ragged(span, [])
    with pytest.raises(ShapeError, match="one step per KV cache"):
        forward_ragged(span, [(_hidden(0, 1, h), cache, 0), (_hidden(1, 1, h), cache, 1)])
    with pytest.raises(ShapeError, match=r"\[1, seq"):
        forward_ragged(span, [(torch.zeros(2, 1, h), cache, 0)])
    with pytest.raises(ShapeError, match="do not fit"):
        forward_ragged(span, [(_hidden(0, 4, h), cache, 6)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_kernel_matches_torch_attention(folder: Path, dtype: torch.dtype,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode rows' attention kernel and torch's attention per row give the same outputs
    and leave the same caches (a prefill chunk rides along on the torch path)."""
    from pymesh.model import ops, ragged

    if not ops.using_c():
        pytest.skip("pymesh._C is not built: there is no kernel to compare")
    span = load_span(folder, 0, 2, dtype=dtype)
    h = span.config.hidden_size
    runs = []
    for use in (True, False):
        monkeypatch.setattr(ragged, "USE_KERNEL", use)
        caches = [span.new_cache(32) for _ in range(4)]
        for j, c in enumerate(caches):
            span.forward(_hidden(j, 5 + j, h).to(dtype), c, 0)
        outs = []
        for step in range(3):
            items = [(_hidden(10 * step + j, 1, h).to(dtype), c, 5 + j + step) for j, c in enumerate(caches[:3])]
            items.insert(1, (_hidden(50 + step, 3, h).to(dtype), caches[3], 8 + 3 * step))
            outs.append(forward_ragged(span, items))
        runs.append((outs, [c._kv.clone() for c in caches]))
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for a, b in zip(runs[0][0], runs[1][0]):
        for x, y in zip(a, b):
            torch.testing.assert_close(x.float(), y.float(), **tol)
    for x, y in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(x.float(), y.float(), **tol)
