"""The concurrent-session parts of ``pymesh bench swarm`` that need no swarm: prompts, rows,
and the single-process batch (N prompts as one batch give each prompt's own greedy tokens)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pymesh.bench.swarm import session_counts
from pymesh.bench.swarm_sessions import SESSION_KEYS, SessionsRun, SessionTiming, local_batched, prompts_for, row
from pymesh.errors import ConfigError


def test_session_counts_and_prompts() -> None:
    assert session_counts("8,1,4,4") == [1, 4, 8] and session_counts(None) == []
    for bad in ("0,2", "a,b"):
        with pytest.raises(ConfigError, match="--sessions"):
            session_counts(bad)
    prompts = prompts_for(list(range(10)), 3, 5)
    assert prompts == [[0, 1, 2, 3, 4], [1, 2, 3, 4, 5], [2, 3, 4, 5, 6]]
    with pytest.raises(ValueError):
        prompts_for(list(range(6)), 3, 5)


def test_row_figures() -> None:
    # two sessions started at 0: first tokens at 1 s and 3 s, 5 tokens each, last at 2 s and 5 s
    run = SessionsRun([SessionTiming(0.0, 1.0, 2.0, 5), SessionTiming(0.0, 3.0, 5.0, 5)], wall_s=5.0)
    r = row("tcp", 3, "m", run)
    assert set(r) == set(SESSION_KEYS)
    assert r["aggregate_tokens_per_s"] == 2.0                 # 10 tokens in 5 s
    assert r["per_session_tokens_per_s_p50"] == 3.0           # median of 4/1 and 4/2
    assert r["ttft_s_p50"] == 2.0                             # median of 1 and 3


@pytest.mark.timeout(120)
def test_local_batch_gives_each_prompts_greedy_tokens(tiny6_dir: Path) -> None:
    from pymesh.model.generate import LocalModel
    from pymesh.model.sampling import SamplingParams

    model = LocalModel.load(tiny6_dir)
    prompts = prompts_for(list(range(100, 140)), 3, 12)
    run = local_batched(model, prompts, 5)
    assert len(run.timings) == 3 and all(t.tokens == 5 for t in run.timings) and run.wall_s > 0
    for ids, got in zip(prompts, run.tokens):
        ref = list(model.generate_ids(ids, SamplingParams(max_new_tokens=5), eos_ids=[]))
        for i, (a, b) in enumerate(zip(got, ref)):
            if a != b:  # batch shapes change float sums: accepted only at a near tie of the reference
                with torch.inference_mode():
                    seq = ids + ref[:i]
                    out = model.span.forward(model.head.embed(torch.tensor([seq])), model.span.new_cache(len(seq)), 0)
                    top = torch.topk(model.head.logits(out[0, -1]), 2).values
                assert float(top[0] - top[1]) < 1e-3, f"token {i}: batched {got} vs alone {ref}"
                break
        else:
            assert got == ref
