"""``pymesh serve``'s /metrics counts the rows of each pass of the client's LM head."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trio
import trio.testing
from prometheus_client import generate_latest

from pymesh.api.metrics import Metrics
from pymesh.client.headbatch import HeadBatcher
from pymesh.model.head import load_head
from pymesh.model.sampling import Sampler, SamplingParams
from tests.model.tiny import make_tiny_model

pytestmark = pytest.mark.timeout(120)


def test_head_batch_rows_histogram(tmp_path: Path) -> None:
    head = load_head(make_tiny_model(tmp_path, "llama", num_hidden_layers=1, name="tinymetrics"))
    batcher = HeadBatcher(head)
    metrics = Metrics()
    metrics.watch(batcher)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for k in range(3):    # woken in one scheduler round: one pass of three rows
                nursery.start_soon(batcher.pick, torch.full((64,), float(k)), Sampler(SamplingParams()), [])
        await batcher.pick(torch.zeros(64), Sampler(SamplingParams()), [])

    trio.run(main)
    text = generate_latest(metrics.registry).decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("pymesh_api_head_batch_rows")}
    assert dict(batcher.batch_rows) == {3: 1, 1: 1}
    assert values["pymesh_api_head_batch_rows_count"] == 2 and values["pymesh_api_head_batch_rows_sum"] == 4
    assert values['pymesh_api_head_batch_rows_bucket{le="1.0"}'] == 1
