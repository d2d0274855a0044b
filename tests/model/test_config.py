"""config.json parsing: both rotary spellings, transformers' defaults, errors naming the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from pymesh.errors import ConfigError
from pymesh.model.config import load_config, parse_config
from pymesh.model.rope import inverse_frequencies

BASE = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": 100}
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def cfg(**kw: Any) -> Any:
    return parse_config({**BASE, **kw})


def test_defaults_follow_transformers() -> None:
    c = cfg()
    assert (c.num_key_value_heads, c.head_dim, c.rope_theta, c.rope_scaling) == (4, 16, 10000.0, None)
    assert (c.rms_norm_eps, c.max_position_embeddings, c.eos_token_id, c.bos_token_id) == (1e-6, 2048, [2], 1)
    assert not c.tie_word_embeddings and not c.attention_bias and c.sliding_window is None
    m = cfg(model_type="mistral", num_attention_heads=8)
    assert (m.sliding_window, m.num_key_value_heads, m.max_position_embeddings) == (4096, 8, 131072)
    q = cfg(model_type="qwen2", num_key_value_heads=2)
    assert q.attention_bias and q.qkv_bias and not q.o_bias and q.eos_token_id == [] and q.bos_token_id is None
    p = cfg(model_type="phi3")
    assert p.rms_norm_eps == 1e-5 and p.eos_token_id == [32000]


def test_mistral_default_kv_heads_must_divide() -> None:
    with pytest.raises(ConfigError, match="num_key_value_heads=8"):
        cfg(model_type="mistral")  # transformers' default of 8 KV heads does not divide 4 heads
    assert cfg(model_type="mistral", num_attention_heads=8, sliding_window=None).sliding_window is None


def test_both_rope_spellings_agree() -> None:
    hub = cfg(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", **LLAMA3})
    v5 = cfg(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3})
    old = cfg(rope_theta=500000.0, rope_scaling={"type": "llama3", **LLAMA3})
    assert hub == v5 == old
    assert hub.rope_theta == 500000.0 and hub.rope_scaling["rope_type"] == "llama3"
    assert cfg(rope_parameters={"rope_type": "default", "rope_theta": 1e5}).rope_theta == 1e5
    assert cfg(rope_parameters={"rope_type": "default", "rope_theta": 1e5}).rope_scaling is None
    lin = cfg(rope_scaling={"type": "linear", "factor": 2.0})
    assert lin.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_llama3_original_max_defaults_to_max_positions() -> None:
    scaling = {k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"}
    c = cfg(max_position_embeddings=4096, rope_scaling={"rope_type": "llama3", **scaling})
    assert c.rope_scaling["original_max_position_embeddings"] == 4096


@pytest.mark.parametrize("rope", [None, {"rope_type": "linear", "factor": 4.0}, {"rope_type": "llama3", **LLAMA3}])
def test_inverse_frequencies_match_transformers(rope: dict | None) -> None:
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    raw = {**BASE, "rope_theta": 500000.0, "max_position_embeddings": 131072, "rope_scaling": rope}
    ref_cfg = transformers.LlamaConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    kind = (rope or {}).get("rope_type", "default")
    if kind == "default":
        expected = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.int64).float() / 16))
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[kind](ref_cfg, "cpu")
    torch.testing.assert_close(inverse_frequencies(parse_config(raw)), expected, atol=0, rtol=0)


def test_eos_int_or_list_and_head_dim() -> None:
    assert cfg(eos_token_id=[5, 7]).eos_token_id == [5, 7]
    assert cfg(eos_token_id=9).eos_token_id == [9]
    c = cfg(head_dim=32, num_key_value_heads=2)
    assert (c.head_dim, c.q_size, c.kv_size) == (32, 128, 64)


@pytest.mark.parametrize("override, field", [
    ({"model_type": "gpt2"}, "model_type='gpt2'"),
    ({"model_type": None}, "model_type=None"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type='dynamic'"),
    ({"rope_scaling": {"rope_type": "linear"}}, "rope_scaling.factor=None"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"hidden_size": "64"}, "hidden_size='64'"),
    ({"num_attention_heads": 0}, "num_attention_heads=0"),
    ({"num_key_value_heads": 3}, "num_key_value_heads=3"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"head_dim": 7}, "head_dim=7"),
    ({"eos_token_id": "x"}, "eos_token_id='x'"),
    ({"rms_norm_eps": -1}, "rms_norm_eps=-1"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ({"model_type": "qwen2", "num_key_value_heads": 2, "use_sliding_window": True}, "use_sliding_window=True"),
])
def test_unsupported_fields_name_field_and_value(override: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        cfg(**override)
    assert field in str(info.value)


def test_missing_structural_field() -> None:
    raw = dict(BASE)
    del raw["intermediate_size"]
    with pytest.raises(ConfigError, match="intermediate_size is missing"):
        parse_config(raw)


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config.json does not exist"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "bert"}))
    with pytest.raises(ConfigError, match=r"config.json: config field model_type='bert'"):
        load_config(tmp_path)
