"""Parse a Hugging Face ``config.json`` into a validated :class:`ModelConfig`.

Supported: the Llama family (``llama``, ``mistral``, ``qwen2``, ``phi3``). Only the
structural fields (sizes, layer and head counts) are required; everything else
takes the default that ``transformers`` gives it for that model type. Both
spellings of the rotary settings are read: ``rope_theta`` / ``rope_scaling``
(files on the hub) and ``rope_parameters`` (what transformers 5 writes).
Anything pymesh cannot run raises :class:`~pymesh.errors.ConfigError` naming the
field and the value.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pymesh.errors import ConfigError
from pymesh.model.gguf_file import is_gguf

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "phi3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

#: transformers' per-architecture defaults for the optional fields pymesh reads.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
                  attention_bias=False, sliding_window=None),
    "mistral": dict(max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
                    attention_bias=False, sliding_window=4096, num_key_value_heads=8),
    "qwen2": dict(max_position_embeddings=32768, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None,
                  attention_bias=True, sliding_window=None, num_key_value_heads=32),
    "phi3": dict(max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=32000,
                 attention_bias=False, sliding_window=None),
}
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_DEFAULT_THETA = 10_000.0


@dataclass(frozen=True)
class ModelConfig:
    """The structure of one Llama-family model, as pymesh runs it."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_id: list[int] = field(default_factory=list)

    @property
    def qkv_bias(self) -> bool:
        """Whether q, k and v projections carry a bias (Qwen2 always, Llama with attention_bias)."""
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        """Whether the output projection carries a bias (Llama's attention_bias; never Qwen2)."""
        return self.attention_bias and self.model_type != "qwen2"

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read and validate ``model_dir/config.json``, or a GGUF file's metadata (the config.json
    the converter would write for it)."""
    if is_gguf(model_dir):
        from pymesh.model.gguf_convert import GGUFModel

        model = GGUFModel.open(model_dir)
        try:
            return parse_config(model.config("float32"))
        except ConfigError as exc:
            raise ConfigError(f"{model.path}: {exc}") from None
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist: --model-path must be a Hugging Face model folder "
                          f"(config.json + model.safetensors)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not readable JSON ({exc}); re-download or re-convert the model") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(raw).__name__}")
    try:
        return parse_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"config field {name}={value!r} must be an integer >= {minimum}")
    return value


def _float(name: str, value: Any, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"config field {name}={value!r} must be a finite number")
    if positive and value <= 0:
        raise ConfigError(f"config field {name}={value!r} must be > 0")
    return float(value)


def _optional_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"config field {name}={value!r} must be a non-negative integer or null")
    return value


def _eos_list(value: Any) -> list[int]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out: list[int] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise ConfigError(f"config field eos_token_id={value!r} must be an integer or a list of integers")
        out.append(item)
    return out


def _rope(raw: Mapping[str, Any], max_pos: int) -> tuple[float, dict[str, Any] | None]:
    """Resolve (rope_theta, scaling dict or None) from either spelling, as transformers does."""
    params = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"config field rope_scaling/rope_parameters={params!r} must be an object or null")
    if any(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"config field rope_parameters={params!r}: per-layer-type rotary settings are not supported")
    theta = _float("rope_theta", params.get("rope_theta", raw.get("rope_theta", _DEFAULT_THETA)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"config field rope_type={rope_type!r} is not supported "
                          f"(pymesh runs {', '.join(SUPPORTED_ROPE_TYPES)})")
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ConfigError(f"config field partial_rotary_factor={partial!r} is not supported (only 1.0)")
    if rope_type == "default":
        return theta, None
    scaling: dict[str, Any] = {"rope_type": rope_type, "factor": _float("rope_scaling.factor", params.get("factor"))}
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            scaling[key] = _float(f"rope_scaling.{key}", params.get(key))
        if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
            raise ConfigError(f"config field rope_scaling={params!r}: high_freq_factor must exceed low_freq_factor")
        omp = params.get("original_max_position_embeddings", max_pos)
        scaling["original_max_position_embeddings"] = _int("rope_scaling.original_max_position_embeddings", omp)
    return theta, scaling


def parse_config(raw: Mapping[str, Any]) -> ModelConfig:
    """Validate a parsed config.json dict; raises ConfigError naming the offending field."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"config field model_type={model_type!r} is not supported "
                          f"(pymesh runs {', '.join(SUPPORTED_MODEL_TYPES)})")
    defaults = _DEFAULTS[model_type]
    for name in _REQUIRED:
        if name not in raw:
            raise ConfigError(f"config field {name} is missing (required for model_type {model_type!r})")
    hidden = _int("hidden_size", raw["hidden_size"])
    heads = _int("num_attention_heads", raw["num_attention_heads"])
    layers = _int("num_hidden_layers", raw["num_hidden_layers"])
    inter = _int("intermediate_size", raw["intermediate_size"])
    vocab = _int("vocab_size", raw["vocab_size"])
    kv_heads = raw.get("num_key_value_heads", defaults.get("num_key_value_heads"))
    kv_heads = heads if kv_heads is None else _int("num_key_value_heads", kv_heads)
    if heads % kv_heads:
        raise ConfigError(f"config field num_key_value_heads={kv_heads} must divide num_attention_heads={heads}")
    head_dim = raw.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(f"config field num_attention_heads={heads} must divide hidden_size={hidden} "
                              f"when head_dim is not given")
        head_dim = hidden // heads
    head_dim = _int("head_dim", head_dim, minimum=2)
    if head_dim % 2:
        raise ConfigError(f"config field head_dim={head_dim} must be even for rotary embeddings")
    act = raw.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"config field hidden_act={act!r} is not supported (only silu)")
    if raw.get("mlp_bias"):
        raise ConfigError(f"config field mlp_bias={raw['mlp_bias']!r} is not supported")
    if raw.get("pretraining_tp", 1) not in (1, None):
        raise ConfigError(f"config field pretraining_tp={raw['pretraining_tp']!r} is not supported (only 1)")
    max_pos = _int("max_position_embeddings", raw.get("max_position_embeddings",
                                                           defaults["max_position_embeddings"]))
    theta, scaling = _rope(raw, max_pos)
    if model_type == "qwen2":
        attention_bias = True
        if raw.get("use_sliding_window", False):
            raise ConfigError(f"config field use_sliding_window={raw['use_sliding_window']!r} is not supported "
                              f"for qwen2 (per-layer sliding windows)")
        sliding = None
    else:
        attention_bias = bool(raw.get("attention_bias", defaults["attention_bias"]))
        sliding = _optional_int("sliding_window", raw.get("sliding_window", defaults["sliding_window"]))
        if model_type == "llama":
            sliding = None  # transformers' Llama ignores the field
        if sliding == 0:
            raise ConfigError("config field sliding_window=0 must be positive or null")
    return ModelConfig(
        model_type=model_type,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        rms_norm_eps=_float("rms_norm_eps", raw.get("rms_norm_eps", defaults["rms_norm_eps"])),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        sliding_window=sliding,
        bos_token_id=_optional_int("bos_token_id", raw.get("bos_token_id", defaults["bos_token_id"])),
        eos_token_id=_eos_list(raw.get("eos_token_id", defaults["eos_token_id"])),
    )
