"""Sampling: greedy, seeded draws, top-k / top-p masks, repetition penalty, stop strings, flags."""

from __future__ import annotations

import argparse

import pytest
import torch

from pymesh.errors import ConfigError
from pymesh.model.sampling import (Sampler, SamplingParams, StopText, add_sampling_arguments,
                                   apply_repetition_penalty, sampling_params_from_args, top_k_mask, top_p_mask)


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs).log()


def test_greedy_is_default_and_argmax() -> None:
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert SamplingParams().greedy
    assert Sampler(SamplingParams()).sample(logits, []) == int(logits.argmax())


def test_seeded_sampling_is_reproducible_and_varies() -> None:
    logits = torch.zeros(50)
    params = SamplingParams(temperature=1.0, seed=1234)
    a = [Sampler(params).sample(logits, []) for _ in range(3)]
    s1, s2 = Sampler(params), Sampler(params)
    seq1 = [s1.sample(logits, []) for _ in range(40)]
    seq2 = [s2.sample(logits, []) for _ in range(40)]
    assert seq1 == seq2 and len(set(a)) == 1
    assert len(set(seq1)) > 10  # a uniform distribution really is sampled
    other = Sampler(SamplingParams(temperature=1.0, seed=99))
    assert [other.sample(logits, []) for _ in range(40)] != seq1


def test_top_k_keeps_exactly_k() -> None:
    logits = torch.tensor([0.1, 3.0, 2.0, -1.0, 5.0])
    masked = top_k_mask(logits, 2)
    assert torch.isfinite(masked).tolist() == [False, True, False, False, True]
    assert torch.equal(top_k_mask(logits, 0), logits)
    sampler = Sampler(SamplingParams(temperature=5.0, top_k=2, seed=0))
    assert {sampler.sample(logits, []) for _ in range(200)} == {1, 4}


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    logits = logits_of([0.05, 0.5, 0.3, 0.15])
    assert torch.isfinite(top_p_mask(logits, 0.5)).tolist() == [False, True, False, False]
    assert torch.isfinite(top_p_mask(logits, 0.7)).tolist() == [False, True, True, False]
    assert torch.isfinite(top_p_mask(logits, 0.9)).tolist() == [False, True, True, True]
    assert torch.isfinite(top_p_mask(logits, 0.01)).tolist() == [False, True, False, False]
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.7, seed=3))
    seen = {sampler.sample(logits, []) for _ in range(300)}
    assert seen == {1, 2}


def test_top_p_matches_transformers_warper() -> None:
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = torch.randn(1, 500, generator=torch.Generator().manual_seed(5)) * 3
    for p in (0.3, 0.8, 0.95):
        ref = TopPLogitsWarper(p)(torch.zeros(1, 1, dtype=torch.long), logits.clone())
        assert torch.equal(torch.isfinite(top_p_mask(logits, p)), torch.isfinite(ref))


def test_repetition_penalty_follows_transformers() -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]
    ref = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[0, 1, 1]]), logits[None].clone())[0]
    assert torch.equal(out, ref)
    assert logits.tolist() == [2.0, -2.0, 1.0, 0.5]  # input untouched
    # greedy would pick 0; penalised it picks 2
    assert Sampler(SamplingParams(repetition_penalty=3.0)).sample(logits, [0]) == 2


def test_stop_text_never_prints_stop_string() -> None:
    st = StopText(["</end>", "STOP"])
    out = [st.push(p) for p in ["Hello ", "wor", "ld <", "/en", "d> more"]]
    assert "".join(out) == "Hello world " and st.stopped
    assert st.push("x") == "" and st.flush() == ""
    st = StopText(["STOP"])
    assert st.push("ST") == "" and st.push("AY") == "STAY" and st.flush() == ""
    assert st.push("end S") == "end " and st.flush() == "S" and not st.stopped
    assert StopText([]).push("anything") == "anything"


def test_cli_flags_and_validation() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-tokens", type=int, default=None)
    add_sampling_arguments(parser)
    args = parser.parse_args(["--temperature", "0.7", "--top-k", "40", "--top-p", "0.9", "--repetition-penalty",
                              "1.1", "--seed", "7", "--stop", "A", "--stop", "B", "--max-tokens", "5"])
    p = sampling_params_from_args(args)
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.seed, p.stop, p.max_new_tokens) == \
        (0.7, 40, 0.9, 1.1, 7, ["A", "B"], 5)
    assert sampling_params_from_args(parser.parse_args([])) == SamplingParams()
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(repetition_penalty=0), dict(stop=[""])):
        with pytest.raises(ConfigError):
            SamplingParams(**bad)  # type: ignore[arg-type]
