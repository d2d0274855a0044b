"""make_tiny_model: the random models other tests build on are what they claim to be."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="torch is a runtime dependency; install pymesh")
transformers = pytest.importorskip("transformers", reason="transformers is the test reference (pip install -e .[test])")

from safetensors import safe_open  # noqa: E402

from pymesh.model.tokenizer import load_tokenizer  # noqa: E402
from tests.model.tiny import ARCHS, VOCAB_SIZE, make_tiny_model  # noqa: E402


@pytest.mark.timeout(120)
def test_each_arch_builds_loads_and_carries_smollm2_tokenizer(tmp_path: Path, smollm2_dir: Path) -> None:
    ids = torch.tensor([[1, 502, 9000, 31, 4]])
    for arch in ARCHS:
        folder = make_tiny_model(tmp_path, arch)
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["model_type"] == arch and cfg["vocab_size"] == VOCAB_SIZE
        assert (folder / "tokenizer.json").read_bytes() == (smollm2_dir / "tokenizer.json").read_bytes()
        assert load_tokenizer(folder).encode("Hello") == load_tokenizer(smollm2_dir).encode("Hello")
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.shape == (1, 5, VOCAB_SIZE) and torch.isfinite(logits).all()
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            names = set(f.keys())
        if arch == "phi3":
            assert "model.layers.0.self_attn.qkv_proj.weight" in names
            assert "model.layers.0.mlp.gate_up_proj.weight" in names
        if arch == "qwen2":
            with safe_open(str(folder / "model.safetensors"), "pt") as f:
                assert f.get_tensor("model.layers.0.self_attn.q_proj.bias").abs().sum() > 0
        if arch == "mistral":
            assert cfg["sliding_window"] == 8


def test_overrides_seed_and_rope_scaling(tmp_path: Path, smollm2_dir: Path) -> None:
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    a = make_tiny_model(tmp_path, head_dim=32, rope_scaling=scaling, tie_word_embeddings=True, seed=5)
    b = make_tiny_model(tmp_path, head_dim=32, rope_scaling=scaling, tie_word_embeddings=True, seed=5)
    c = make_tiny_model(tmp_path, seed=6)
    assert len({a, b, c}) == 3
    cfg = transformers.AutoConfig.from_pretrained(a)
    assert cfg.head_dim == 32 and cfg.tie_word_embeddings
    assert cfg.rope_parameters["rope_type"] == "llama3" and cfg.rope_parameters["factor"] == 8.0
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
