"""``pymesh model synth``: real shapes, random weights, loadable by generate, workers and transformers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from pymesh.cli.main import main
from pymesh.cli.model import add_arguments
from pymesh.errors import ConfigError
from pymesh.model.config import load_config, parse_config
from pymesh.model.fingerprint import model_id
from pymesh.model.rope import inverse_frequencies
from pymesh.model.span import load_span
from pymesh.model.synth import MARKER, SHAPES, plan_shards, synth_config, synth_model
from pymesh.model.tokenizer import load_tokenizer
from pymesh.model.weights import INDEX_FILE, SINGLE_FILE, WeightStore

LIKE = "llama-3.2-1b"

TEXTS = ["Hello, world!", "The year 2024 had 366 days; 1,000,000 is a million.",
         "日本語と中文, Emoji 🎉👍🏽, café naïve Ærøskøbing", "def f(n):\n    return n + 1\n\n\t  trailing  ", ""]


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-block llama-3.2-1b-shaped folder (full width and vocabulary), written by the CLI."""
    out = tmp_path_factory.mktemp("synth") / "llama-1b-2l"
    assert main(["model", "synth", "--like", LIKE, "--out", str(out), "--layers", "2", "--no-progress"]) == 0
    return out


def test_shapes_are_the_real_configs() -> None:
    one = parse_config(synth_config("llama-3.2-1b"))
    assert (one.hidden_size, one.num_hidden_layers, one.num_attention_heads, one.num_key_value_heads,
            one.head_dim, one.intermediate_size, one.vocab_size) == (2048, 16, 32, 8, 64, 8192, 128256)
    assert one.tie_word_embeddings and one.rope_theta == 500000.0
    assert one.rope_scaling == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    three = parse_config(synth_config("llama-3.2-3b"))
    assert (three.hidden_size, three.num_hidden_layers, three.num_attention_heads, three.num_key_value_heads,
            three.head_dim, three.intermediate_size, three.tie_word_embeddings) == (3072, 28, 24, 8, 128, 8192, True)
    eight = parse_config(synth_config("llama-3.1-8b"))
    assert (eight.hidden_size, eight.num_hidden_layers, eight.num_attention_heads, eight.num_key_value_heads,
            eight.head_dim, eight.intermediate_size, eight.vocab_size, eight.tie_word_embeddings
            ) == (4096, 32, 32, 8, 128, 14336, 128256, False)
    assert eight.rope_scaling is not None and eight.rope_scaling["factor"] == 8.0
    assert synth_config(LIKE, layers=3)["num_hidden_layers"] == 3


def test_cli_choices_are_the_shapes(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for like in SHAPES:
        assert parser.parse_args(["synth", "--like", like, "--out", "x"]).like == like
    with pytest.raises(SystemExit):
        main(["model", "synth", "--like", "llama-9b", "--out", "x"])
    assert "llama-3.2-1b" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="layers"):
        synth_config(LIKE, layers=17)


@pytest.mark.parametrize("like", list(SHAPES))
def test_rope_frequencies_match_transformers(like: str) -> None:
    transformers = pytest.importorskip("transformers", reason="transformers is the test reference")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    raw = synth_config(like)
    ref_cfg = transformers.LlamaConfig(**{k: v for k, v in raw.items() if k not in ("model_type", MARKER)})
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](ref_cfg, "cpu")
    torch.testing.assert_close(inverse_frequencies(parse_config(raw)), expected, atol=0, rtol=0)


def test_folder_is_marked_random_and_loads(synth_dir: Path) -> None:
    raw = json.loads((synth_dir / "config.json").read_text())
    assert raw[MARKER]["like"] == LIKE and "random" in raw[MARKER]["note"]
    assert "RANDOM" in (synth_dir / "README.txt").read_text()
    config = load_config(synth_dir)
    assert config.num_hidden_layers == 2 and config.vocab_size == 128256
    assert (synth_dir / SINGLE_FILE).is_file() and not (synth_dir / INDEX_FILE).exists()
    with WeightStore(synth_dir) as store:
        embed = store.get("model.embed_tokens.weight", (128256, 2048), torch.float32)
        norm = store.get("model.layers.1.input_layernorm.weight", (2048,), torch.float32)
        assert "lm_head.weight" not in store  # tied, as the real 1B
    assert torch.all(norm == 1)
    assert 0.015 < float(embed[:4096].std()) < 0.025 and abs(float(embed[:4096].mean())) < 1e-3


def test_tokenizer_covers_the_vocabulary_and_round_trips(synth_dir: Path) -> None:
    tok = load_tokenizer(synth_dir)
    assert tok.vocab_size == 128256
    assert tok.bos_token_id == 128000 and tok.eos_token_ids == [128001]
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == 128000 and all(0 <= i < 128256 for i in ids)
        assert tok.decode(ids) == text
        decoder = tok.stream_decoder()
        assert "".join(decoder.push(i) for i in ids) + decoder.flush() == text
    assert len(tok.encode("the quick brown fox", add_special_tokens=False)) < len("the quick brown fox")
    assert tok.encode("<|eot_id|>", add_special_tokens=False) == [128009]
    chat = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert chat[0] == 128000 and chat.count(128006) == 2 and chat.count(128009) == 1
    assert tok.decode(chat, skip_special_tokens=False).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.timeout(300)
def test_generate_end_to_end_matches_transformers(synth_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model-path", str(synth_dir), "--prompt", "Hello there", "--max-tokens", "5",
                 "--json", "--threads", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["tokens"]) == 5 and all(0 <= t < 128256 for t in out["tokens"])
    pytest.importorskip("transformers", reason="transformers is the test reference")
    from tests.model._reference import assert_same_tokens, load_reference, reference_greedy

    ids = load_tokenizer(synth_dir).encode("Hello there")
    ref, gaps = reference_greedy(load_reference(synth_dir), ids, 5)
    assert_same_tokens(out["tokens"], ref, gaps)


def test_worker_span_loads_and_stays_finite(synth_dir: Path) -> None:
    assert model_id(synth_dir).startswith("llama-1b-2l@")
    span = load_span(synth_dir, 1, 2, device="cpu", dtype=torch.float32)
    cache = span.new_cache(8)
    x = torch.randn(1, 8, 2048) * 0.02
    out = span.forward(x, cache, 0)
    assert out.shape == (1, 8, 2048) and bool(torch.isfinite(out).all())


def test_shards_hold_the_same_values(synth_dir: Path, tmp_path: Path) -> None:
    """Sharding changes the files, not the values: each tensor is seeded by its name."""
    sharded = synth_model(LIKE, tmp_path / "sharded", layers=1, progress=False, max_shard_bytes=300 * 1024**2)
    index = json.loads((sharded / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) == 2 and not (sharded / SINGLE_FILE).exists()
    names = {"model.embed_tokens.weight": (128256, 2048), "model.layers.0.mlp.down_proj.weight": (2048, 8192),
             "model.norm.weight": (2048,)}
    with WeightStore(sharded) as a, WeightStore(synth_dir) as b:
        for name, shape in names.items():
            assert torch.equal(a.get(name, shape, torch.bfloat16), b.get(name, shape, torch.bfloat16))
    with pytest.raises(ConfigError, match="not an empty folder"):
        synth_model(LIKE, sharded, layers=1, progress=False)


def test_plan_shards_cuts_before_the_limit() -> None:
    tensors = [("a", (10,)), ("b", (30,)), ("c", (30,)), ("d", (5,))]
    assert [[n for n, _ in s] for s in plan_shards(tensors, 4, 160)] == [["a", "b"], ["c", "d"]]
    assert [[n for n, _ in s] for s in plan_shards(tensors, 4, 100)] == [["a"], ["b"], ["c"], ["d"]]  # too big alone: own shard
