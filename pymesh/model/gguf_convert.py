"""Convert a Llama-family GGUF file (architectures ``llama`` and ``qwen2``) into a Hugging
Face model folder.

Output: ``config.json``, ``generation_config.json``, ``model.safetensors``,
``tokenizer.json`` and ``tokenizer_config.json`` (with the chat template).

Every tensor is dequantized with the ``gguf`` package, laid out as (out, in) (GGUF lists
dimensions innermost first), renamed to the Hugging Face name, and for ``attn_q`` /
``attn_k`` the rotary permutation llama.cpp's converter applies is undone. The safetensors
file is streamed tensor by tensor, so memory stays at one dequantized tensor.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pymesh.errors import ConfigError
from pymesh.model.gguf_file import (BLOCK_NAMES, GGUFFile, TensorInfo, dequantize_rows, hf_tensor_name,
                                    open_gguf_untrusted, rotary_row_order, unpermute_rotary)
from pymesh.model.gguf_tokenizer import GGUFVocab, build_tokenizer, tokenizer_config

__all__ = ["GGUFModel", "convert_gguf", "generation_config", "hf_tensor_name", "unpermute_rotary"]

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
#: architectures whose q/k rows llama.cpp's converter interleaves for its rotary layout
_PERMUTED_ARCHITECTURES = ("llama",)
DTYPES = ("float32", "bfloat16")

class _Meta:
    """Typed access to a GGUF file's key/value metadata, with errors naming the key."""

    def __init__(self, metadata: dict[str, Any], path: Path) -> None:
        self.fields = metadata
        self.path = path

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def need(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ConfigError(f"{self.path}: GGUF metadata key {key!r} is missing; cannot build config.json without it")
        return value


@dataclass
class GGUFModel:
    """The parts of a GGUF file the converter (and the GGUF tensor store) work from."""

    path: Path
    file: GGUFFile
    meta: _Meta
    arch: str

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> "GGUFModel":
        f = open_gguf_untrusted(path)
        meta = _Meta(f.metadata, f.path)
        arch = meta.need("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"{f.path}: GGUF architecture {arch!r} is not supported; pymesh converts {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        return cls(f.path, f, meta, arch)

    def hf_tensors(self) -> list[tuple[TensorInfo, str]]:
        """(GGUF tensor, Hugging Face name) for every tensor a converted folder holds, in file order."""
        out = []
        for info in self.file.tensors.values():
            hf = hf_tensor_name(info.name)
            if hf is not None:
                out.append((info, hf))
        return out

    def rotary_heads(self, name: str, cfg: dict[str, Any]) -> int | None:
        """The head count whose rotary row permutation GGUF tensor ``name`` carries (llama q/k)."""
        if self.arch not in _PERMUTED_ARCHITECTURES:
            return None
        if name.endswith(("attn_q.weight", "attn_q.bias")):
            return int(cfg["num_attention_heads"])
        if name.endswith(("attn_k.weight", "attn_k.bias")):
            return int(cfg["num_key_value_heads"])
        return None

    def tensor_names(self) -> list[str]:
        return list(self.file.tensors)

    def vocab(self) -> GGUFVocab:
        m = self.meta
        model = m.need("tokenizer.ggml.model")
        return GGUFVocab(
            model=model,
            pre=m.get("tokenizer.ggml.pre", "default"),
            tokens=m.need("tokenizer.ggml.tokens"),
            token_types=m.get("tokenizer.ggml.token_type", []),
            merges=m.get("tokenizer.ggml.merges", []),
            scores=m.get("tokenizer.ggml.scores", []),
            bos_token_id=m.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=m.get("tokenizer.ggml.eos_token_id"),
            unk_token_id=m.get("tokenizer.ggml.unknown_token_id"),
            pad_token_id=m.get("tokenizer.ggml.padding_token_id"),
            eot_token_id=m.get("tokenizer.ggml.eot_token_id"),
            # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise
            add_bos_token=bool(m.get("tokenizer.ggml.add_bos_token", model == "llama")),
            chat_template=m.get("tokenizer.chat_template"),
            add_space_prefix=bool(m.get("tokenizer.ggml.add_space_prefix", True)),
        )

    def _shape(self, name: str) -> tuple[int, ...]:
        info = self.file.tensors.get(name)
        if info is None:
            raise ConfigError(f"{self.path}: tensor {name!r} is missing")
        return info.shape

    def config(self, dtype: str) -> dict[str, Any]:
        """config.json (Llama) from the file's metadata."""
        try:
            return self._config(dtype)
        except (TypeError, ValueError, OverflowError) as exc:  # int()/float() of a value of the wrong type
            raise ConfigError(f"{self.path}: a GGUF metadata value has the wrong type ({exc}); "
                              f"the file is corrupt or not a Llama model") from None

    def _config(self, dtype: str) -> dict[str, Any]:
        a, m = self.arch, self.meta
        hidden = int(m.need(f"{a}.embedding_length"))
        n_head = int(m.need(f"{a}.attention.head_count"))
        n_kv = int(m.get(f"{a}.attention.head_count_kv", n_head))
        head_dim = int(m.get(f"{a}.attention.key_length", hidden // n_head))
        if int(m.get(f"{a}.attention.value_length", head_dim)) != head_dim:
            raise ConfigError(f"{self.path}: attention.key_length and value_length differ; not a Llama layout")
        rot = int(m.get(f"{a}.rope.dimension_count", head_dim))
        if rot != head_dim:
            raise ConfigError(f"{self.path}: rope.dimension_count {rot} != head_dim {head_dim} (partial rotary) is not supported")
        names = set(self.tensor_names())
        embd_shape = self._shape("token_embd.weight")
        vocab_size = int(m.get(f"{a}.vocab_size", embd_shape[0]))
        if vocab_size != embd_shape[0]:
            raise ConfigError(f"{self.path}: vocab_size {vocab_size} but token_embd has {embd_shape[0]} rows")
        cfg: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": int(m.need(f"{a}.feed_forward_length")),
            "num_hidden_layers": int(m.need(f"{a}.block_count")),
            "num_attention_heads": n_head,
            "num_key_value_heads": n_kv,
            "head_dim": head_dim,
            "vocab_size": vocab_size,
            "rms_norm_eps": float(m.need(f"{a}.attention.layer_norm_rms_epsilon")),
            "rope_theta": float(m.get(f"{a}.rope.freq_base", 10000.0)),
            "max_position_embeddings": int(m.get(f"{a}.context_length", 2048)),
            "tie_word_embeddings": "output.weight" not in names,
            "hidden_act": "silu",
            "attention_bias": "blk.0.attn_q.bias" in names,
            "mlp_bias": False,
            "initializer_range": 0.02,
            "use_cache": True,
            "torch_dtype": dtype,
        }
        if a == "qwen2":  # q/k/v always carry biases; no per-layer sliding windows
            cfg.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False)
            for key in ("attention_bias", "mlp_bias"):
                del cfg[key]
            if "blk.0.attn_q.bias" not in names:
                raise ConfigError(f"{self.path}: a qwen2 GGUF without blk.0.attn_q.bias is not a Qwen2 model")
        scaling = self._rope_scaling(cfg)
        if scaling is not None:
            cfg["rope_scaling"] = scaling
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = m.get(f"tokenizer.ggml.{key}")
            if v is not None:
                cfg[key] = int(v)
        return cfg

    def _rope_scaling(self, cfg: dict[str, Any]) -> dict[str, Any] | None:
        a, m = self.arch, self.meta
        kind = m.get(f"{a}.rope.scaling.type")
        if kind not in (None, "none"):
            if kind != "linear":
                raise ConfigError(f"{self.path}: rope scaling type {kind!r} is not supported (only linear and llama3)")
            return {"rope_type": "linear", "type": "linear", "factor": float(m.need(f"{a}.rope.scaling.factor"))}
        if "rope_freqs.weight" in self.tensor_names():
            return _infer_llama3_scaling(self.read("rope_freqs.weight"), cfg, self.path)
        return None

    def read(self, name: str, cfg: dict[str, Any] | None = None) -> np.ndarray:
        """One tensor, dequantized to float32, shaped (out, in); with ``cfg`` (the config)
        q/k rows are un-permuted into Hugging Face's rotary layout."""
        info = self.file.tensors.get(name)
        if info is None:
            raise ConfigError(f"{self.path}: tensor {name!r} is missing")
        arr = dequantize_rows(info, self.file.raw(name)).reshape(info.shape)
        heads = None if cfg is None else self.rotary_heads(name, cfg)
        if heads is not None:
            arr = arr[rotary_row_order(arr.shape[0], heads)]
        return np.ascontiguousarray(arr, dtype=np.float32)


def generation_config(vocab: GGUFVocab) -> dict[str, Any]:
    """``generation_config.json``: BOS, the end-of-sequence id(s) (eos and eot), padding."""
    eos = [i for i in (vocab.eos_token_id, vocab.eot_token_id) if i is not None]
    gen: dict[str, Any] = {"bos_token_id": vocab.bos_token_id,
                           "eos_token_id": sorted(set(eos)) if len(set(eos)) > 1 else (eos[0] if eos else None)}
    if vocab.pad_token_id is not None:
        gen["pad_token_id"] = vocab.pad_token_id
    return gen


def _infer_llama3_scaling(freqs: np.ndarray, cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    """Recover Llama 3.1's rope_scaling from the per-frequency divisors llama.cpp stores.

    The divisors are 1 for short wavelengths and ``factor`` for long ones; the usual
    parameters are assumed and checked by recomputing every divisor.
    """
    freqs = freqs.reshape(-1).astype(np.float64)
    factor = round(float(freqs.max()), 4)  # stored as float32
    low_ff, high_ff, orig_max = 1.0, 4.0, 8192
    guess = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low_ff,
        "high_freq_factor": high_ff,
        "original_max_position_embeddings": orig_max,
    }
    dim = cfg["head_dim"]
    inv = 1.0 / cfg["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * np.pi / inv
    low_wl = orig_max / low_ff
    high_wl = orig_max / high_ff
    smooth = (orig_max / wavelen - low_ff) / (high_ff - low_ff)
    expected = np.where(wavelen < high_wl, 1.0, np.where(wavelen > low_wl, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    if expected.shape != freqs.shape or not np.allclose(expected, freqs, rtol=1e-3):
        raise ConfigError(
            f"{path}: rope_freqs does not match Llama 3 rope scaling with the usual parameters; "
            "this rope scaling is not supported"
        )
    return guess


def _st_dtype(dtype: str) -> tuple[str, int]:
    return {"float32": ("F32", 4), "bfloat16": ("BF16", 2)}[dtype]


def _to_bytes(arr: np.ndarray, dtype: str) -> bytes:
    if dtype == "float32":
        return np.ascontiguousarray(arr, dtype="<f4").tobytes()
    import torch

    src = arr if arr.flags.writeable and arr.flags.c_contiguous else np.array(arr, dtype=np.float32)
    return torch.from_numpy(src).to(torch.bfloat16).view(torch.int16).numpy().tobytes()


def convert_gguf(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: str = "float32",
    progress: bool = True,
    on_tensor: Callable[[str], None] | None = None,
) -> Path:
    """Convert ``gguf_path`` into a Hugging Face folder ``out_dir``; returns the folder."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    model = GGUFModel.open(gguf_path)
    cfg = model.config(dtype)
    vocab = model.vocab()
    tokenizer = build_tokenizer(vocab)  # fail on a bad vocabulary before writing gigabytes
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    plan = [(info.name, hf, info.shape) for info, hf in model.hf_tensors()]
    _check_complete(plan, cfg, model.path)
    _write_safetensors(model, plan, cfg, out / "model.safetensors", dtype, progress, on_tensor)

    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation_config(vocab), indent=2) + "\n")
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(vocab, cfg["max_position_embeddings"]), indent=2) + "\n")
    log.info("converted %s into %s (%d tensors, %s)", model.path, out, len(plan), dtype)
    return out


def _check_complete(plan: list[tuple[str, str, tuple[int, ...]]], cfg: dict[str, Any], path: Path) -> None:
    have = {hf for _, hf, _ in plan}
    need = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(cfg["num_hidden_layers"]):
        need += [f"model.layers.{i}.{n}.weight" for n in BLOCK_NAMES.values()]
    missing = [n for n in need if n not in have]
    if missing:
        raise ConfigError(f"{path}: the GGUF lacks {len(missing)} tensors a Llama model needs, e.g. {missing[:3]}")


def _write_safetensors(
    model: GGUFModel,
    plan: list[tuple[str, str, tuple[int, ...]]],
    cfg: dict[str, Any],
    target: Path,
    dtype: str,
    progress: bool,
    on_tensor: Callable[[str], None] | None,
) -> None:
    """Stream tensors into ``target`` (written to a temporary name, renamed at the end)."""
    st_name, size = _st_dtype(dtype)
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "source": "pymesh gguf_convert"}}
    offset = 0
    for _, hf, shape in plan:
        n = int(np.prod(shape)) * size
        header[hf] = {"dtype": st_name, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = target.with_name(target.name + ".partial")
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("converting"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
        TimeElapsedColumn(), disable=not progress, transient=False, console=Console(stderr=True),
    )
    with bar, open(tmp, "wb") as f:
        task = bar.add_task("", total=len(plan))
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for gguf_name, hf, shape in plan:
            bar.update(task, description=gguf_name)
            arr = model.read(gguf_name, cfg)
            f.write(_to_bytes(arr, dtype))
            if on_tensor is not None:
                on_tensor(hf)
            bar.advance(task)
    os.replace(tmp, target)
