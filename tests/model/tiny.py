"""Tiny random Hugging Face models for architecture tests.

``make_tiny_model(tmp_path, arch="llama", **overrides)`` builds a seeded random model with
transformers (vocabulary 49152, SmolLM2's tokenizer copied in, so every CLI runs on it),
saves it with ``save_pretrained`` (safetensors) and returns the folder.

Import it as ``from tests.model.tiny import make_tiny_model`` (tests/conftest.py puts the
repository root on ``sys.path``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

VOCAB_SIZE = 49152
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

#: per-architecture defaults; anything can be overridden by keyword
BASE: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    # a larger init than transformers' 0.02 spreads the logits, so greedy decoding of a
    # random model rarely meets near ties
    "initializer_range": 0.1,
}

ARCHS = ("llama", "mistral", "qwen2", "phi3")


def _config(arch: str, overrides: dict[str, Any]) -> Any:
    import transformers

    kwargs = dict(BASE)
    if arch == "mistral":
        kwargs["sliding_window"] = 8
    if arch == "phi3":
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    kwargs.update(overrides)
    rope = kwargs.pop("rope_scaling", None)
    theta = kwargs.pop("rope_theta")
    classes = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "phi3": transformers.Phi3Config,
    }
    if arch not in classes:
        raise ValueError(f"make_tiny_model: unknown arch {arch!r}; choose one of {ARCHS}")
    cfg = classes[arch](**kwargs)
    # transformers 5 keeps rotary settings in rope_parameters; older versions in
    # rope_theta / rope_scaling. Set whichever this version has.
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    if hasattr(cfg, "rope_parameters"):
        params["rope_theta"] = theta
        params.setdefault("rope_type", "default")
        if rope:
            params.update(rope)
            params["rope_type"] = rope.get("rope_type", rope.get("type"))
        cfg.rope_parameters = params
    else:  # pragma: no cover - transformers 4
        cfg.rope_theta = theta
        cfg.rope_scaling = rope
    return cfg


def make_tiny_model(tmp_path: Path, arch: str = "llama", **overrides: Any) -> Path:
    """A seeded random ``arch`` model saved under ``tmp_path``; returns its folder.

    Special keywords: ``seed`` (default 0), ``tokenizer_dir`` (where SmolLM2's tokenizer
    files come from; default the cached converted SmolLM2), ``name`` (folder name).
    Everything else overrides the transformers config (e.g. ``head_dim=32``,
    ``rope_scaling={"rope_type": "llama3", ...}``, ``attention_bias=True``).
    """
    import torch
    import transformers

    seed = int(overrides.pop("seed", 0))
    tokenizer_dir = overrides.pop("tokenizer_dir", None)
    name = overrides.pop("name", f"tiny-{arch}")
    cfg = _config(arch, overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if arch == "qwen2":  # biases start at zero; make them count
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    if proj.bias is not None:
                        proj.bias.normal_(0.0, 0.1)
    model.eval()
    out = Path(tmp_path) / name
    n = 1
    while out.exists():
        n += 1
        out = Path(tmp_path) / f"{name}-{n}"
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer_dir is None:
        from pymesh.model.pull import pull_default_model

        tokenizer_dir = pull_default_model(progress=False)
    for fname in TOKENIZER_FILES:
        shutil.copy(Path(tokenizer_dir) / fname, out / fname)
    return out
