"""Tensors of the wrong shape at run time raise ShapeError (a ValueError), not ConfigError."""

from __future__ import annotations

import pytest
import torch

from pymesh.errors import ConfigError, PymeshError
from pymesh.model.kv_cache import KVCache
from pymesh.model.shapes import ShapeError


def test_cache_rejects_batch_and_positions_with_shape_error() -> None:
    cache = KVCache(2, 1, 2, 8, 4, dtype=torch.float32)
    cache.check(0, 8, 1)
    with pytest.raises(ShapeError, match="batch 2 but the KV cache was made for batch 1") as info:
        cache.check(0, 1, 2)
    assert not isinstance(info.value, ConfigError)
    assert isinstance(info.value, PymeshError) and isinstance(info.value, ValueError)
    with pytest.raises(ShapeError, match="do not fit a KV cache of 8 tokens"):
        cache.check(7, 2, 1)


def test_bad_cache_size_is_still_a_config_error() -> None:
    with pytest.raises(ConfigError):
        KVCache(2, 1, 2, 0, 4, dtype=torch.float32)


@pytest.mark.timeout(120)
def test_span_and_head_reject_wrong_shapes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pymesh.model.generate import LocalModel
    from tests.model.tiny import make_tiny_model

    model = LocalModel.load(make_tiny_model(tmp_path, num_hidden_layers=1))
    cache = model.span.new_cache(4)
    hidden = model.config.hidden_size
    with pytest.raises(ShapeError, match="hidden states must be"):
        model.span.forward(torch.zeros(1, 2, hidden + 1), cache, 0)
    with pytest.raises(ShapeError, match="token ids must be"):
        model.head.embed(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ShapeError, match="token ids must lie in"):
        model.head.embed(torch.tensor([[model.config.vocab_size]]))
