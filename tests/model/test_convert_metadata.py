"""GGUF metadata the converter must carry over: rope scaling, tokenizer split rules, BOS."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package is a runtime dependency; install pymesh")
torch = pytest.importorskip("torch", reason="torch is a runtime dependency; install pymesh")
transformers = pytest.importorskip("transformers", reason="transformers is the test reference (pip install -e .[test])")

from pymesh.errors import ConfigError  # noqa: E402
from pymesh.model.gguf_convert import convert_gguf  # noqa: E402
from pymesh.model.tokenizer import load_tokenizer  # noqa: E402
from tests.model.test_convert import HEAD_DIM, N_HEAD, N_KV, random_weights  # noqa: E402
from tests.model.tiny import tiny_gguf_vocab, write_tiny_gguf  # noqa: E402

THETA = 500000.0
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def _reference_rope_freqs(scaling: dict) -> np.ndarray:
    """The per-frequency divisors llama.cpp stores, derived from transformers' llama3 rope."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(hidden_size=N_HEAD * HEAD_DIM, num_attention_heads=N_HEAD, rope_theta=THETA,
                                   rope_scaling=dict(scaling), max_position_embeddings=131072)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base = 1.0 / (THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM))
    return (base / scaled.double()).float().numpy()


def _with_rope_freqs(freqs: np.ndarray):
    def extra(w) -> None:
        w.add_tensor("rope_freqs.weight", freqs.astype(np.float32))

    return extra


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(tmp_path: Path) -> None:
    freqs = _reference_rope_freqs(LLAMA3)
    # all three regimes present: unscaled, fully scaled, smoothed in between
    assert freqs.min() == pytest.approx(1.0) and freqs.max() == pytest.approx(8.0)
    assert ((freqs > 1.01) & (freqs < 7.99)).any()
    write_tiny_gguf(tmp_path / "m.gguf", random_weights(), n_head=N_HEAD, n_head_kv=N_KV, rope_theta=THETA,
                    extra=_with_rope_freqs(freqs))
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "hf", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"]["rope_type"] == "llama3"
    for key, value in LLAMA3.items():
        assert cfg["rope_scaling"][key] == value, key
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    inv = model.model.rotary_emb.inv_freq.double()
    base = 1.0 / (THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM))
    np.testing.assert_allclose((base / inv).numpy(), freqs, rtol=1e-5)


def test_unrecognised_rope_freqs_are_refused(tmp_path: Path) -> None:
    freqs = _reference_rope_freqs({**LLAMA3, "high_freq_factor": 2.0})
    write_tiny_gguf(tmp_path / "m.gguf", random_weights(), n_head=N_HEAD, n_head_kv=N_KV, rope_theta=THETA,
                    extra=_with_rope_freqs(freqs))
    with pytest.raises(ConfigError, match="rope_freqs"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "hf", progress=False)


def test_linear_rope_scaling_and_unsupported_types(tmp_path: Path) -> None:
    def linear(w) -> None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)

    write_tiny_gguf(tmp_path / "lin.gguf", random_weights(), n_head=N_HEAD, n_head_kv=N_KV, extra=linear)
    cfg = json.loads((convert_gguf(tmp_path / "lin.gguf", tmp_path / "lin", progress=False) / "config.json").read_text())
    assert cfg["rope_scaling"]["rope_type"] == "linear" and cfg["rope_scaling"]["factor"] == 4.0

    def yarn(w) -> None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)

    write_tiny_gguf(tmp_path / "yarn.gguf", random_weights(), n_head=N_HEAD, n_head_kv=N_KV, extra=yarn)
    with pytest.raises(ConfigError, match="'yarn'"):
        convert_gguf(tmp_path / "yarn.gguf", tmp_path / "yarn", progress=False)

    def partial(w) -> None:
        w.add_rope_dimension_count(HEAD_DIM // 2)

    write_tiny_gguf(tmp_path / "part.gguf", random_weights(), n_head=N_HEAD, n_head_kv=N_KV, extra=partial)
    with pytest.raises(ConfigError, match="partial rotary"):
        convert_gguf(tmp_path / "part.gguf", tmp_path / "part", progress=False)


TEXTS = [
    "the theater at the inn",
    "Digits 12345 and 2024, mixed a1b2c3; spaces   and\ttabs\n\nnewlines",
    "Ünïcödé, 日本語, emoji 🎉, the end",
    "<|im_start|>the<|im_end|> inline specials",
]


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "gpt2", "qwen2"])
@pytest.mark.parametrize("add_bos", [False, True])
def test_tokenizer_split_rules_and_bos_match_transformers(tmp_path: Path, pre: str, add_bos: bool) -> None:
    """transformers builds its own tokenizer from the same GGUF; pymesh's must agree.
    transformers splits "smollm" files without SmolLM's per-digit rule (SmolLM2's own
    tokenizer.json has it, and pymesh follows that), so for them text with digits is
    checked only against SPLIT_12."""
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, random_weights(), n_head=N_HEAD, n_head_kv=N_KV, pre=pre, add_bos=add_bos)
    mine = load_tokenizer(convert_gguf(path, tmp_path / "hf", progress=False))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        ids = mine.encode(text)
        if not (pre == "smollm" and any(c.isdigit() for c in text)):
            assert ids == theirs.encode(text), text
        if not text.startswith("<|im_start|>"):
            assert (ids[:1] == [1]) == add_bos
        assert mine.decode(ids) == theirs.decode(ids, skip_special_tokens=True) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    # the merges are used: " the" is one token
    assert len(mine.encode(" the", add_special_tokens=False)) == 1
    # and the split rule decides which merges can apply to " 12"
    pieces = [mine.decode([i]) for i in mine.encode(" 12", add_special_tokens=False)]
    assert pieces == SPLIT_12[pre]


#: " 12" under each split rule, with merges "Ġ 1" (first) and "1 2": GPT-2 keeps the space on
#: the number, Llama 3 splits it off and groups digits, SmolLM splits every digit.
SPLIT_12 = {"gpt2": [" 1", "2"], "llama-bpe": [" ", "12"], "smollm": [" ", "1", "2"], "qwen2": [" ", "1", "2"]}


SPM_TEXTS = ["the theme", "hello there, the end", "  two leading spaces", "日本 🎉 bytes", "</s> inline", ""]


@pytest.mark.parametrize("add_bos", [None, False])
def test_sentencepiece_vocabulary_matches_transformers(tmp_path: Path, add_bos: bool | None) -> None:
    """Llama 2 / Mistral style files: pieces + scores, byte fallback; BOS on unless the file says no."""
    path = tmp_path / "spm.gguf"
    write_tiny_gguf(path, random_weights(), n_head=N_HEAD, n_head_kv=N_KV, tokenizer="llama", add_bos=add_bos)
    mine = load_tokenizer(convert_gguf(path, tmp_path / "hf", progress=False))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in SPM_TEXTS:
        ids = mine.encode(text)
        assert ids == theirs.encode(text), text
        assert mine.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
        assert (ids[:1] == [1]) == (add_bos is None)
        dec = mine.stream_decoder()
        assert "".join([dec.push(i) for i in ids] + [dec.flush()]) == mine.decode(ids)
    # merges come from the scores: " the" is one piece, "日" falls back to three byte tokens
    assert mine.encode("the", add_special_tokens=False) == [len(tiny_gguf_vocab("llama")) - 1]
    assert len(mine.encode("日", add_special_tokens=False)) == 1 + 3  # "▁" + three UTF-8 bytes


@pytest.mark.timeout(120)
def test_qwen2_gguf_round_trip_with_biases(tmp_path: Path) -> None:
    """qwen2 files: q/k/v biases, no rotary permutation; transformers runs the converted folder
    exactly like the original weights."""
    weights = random_weights(tied=True, seed=7)
    rng = np.random.default_rng(7)
    for i in range(2):
        for proj, rows in (("q_proj", N_HEAD * HEAD_DIM), ("k_proj", N_KV * HEAD_DIM), ("v_proj", N_KV * HEAD_DIM)):
            weights[f"model.layers.{i}.self_attn.{proj}.bias"] = rng.normal(0, 0.5, rows).astype(np.float32)
    write_tiny_gguf(tmp_path / "q.gguf", weights, n_head=N_HEAD, n_head_kv=N_KV, arch="qwen2", pre="qwen2",
                    rms_eps=1e-6, rope_theta=1e6)
    out = convert_gguf(tmp_path / "q.gguf", tmp_path / "hf", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["tie_word_embeddings"]
    ref_cfg = transformers.Qwen2Config(
        vocab_size=len(tiny_gguf_vocab()), hidden_size=N_HEAD * HEAD_DIM, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=N_HEAD, num_key_value_heads=N_KV, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
    )
    ref = transformers.Qwen2ForCausalLM(ref_cfg).eval()
    missing, unexpected = ref.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ref.tie_weights()
    conv = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 50, 70, 90, 3, 200, 17, 260, 12, 44]])
    with torch.no_grad():
        torch.testing.assert_close(conv(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
