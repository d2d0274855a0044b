"""Synthetic models: the shape of a real Llama, random weights, for speed and memory tests.

``synth_model("llama-3.2-1b", out)`` writes a Hugging Face folder that pymesh (and
transformers) load like the real model: config.json with that model's structure (rotary
scaling included), safetensors shards of the same tensor names, shapes and dtype, and a
byte-level BPE ``tokenizer.json`` with exactly ``vocab_size`` tokens. The weights are
random, so the text it generates is noise: config.json carries ``pymesh_synthetic`` and
README.txt says so.

Memory stays bounded whatever the size: tensors are generated in chunks of rows
(:data:`CHUNK_ELEMENTS` values at a time) and streamed into safetensors files written
here, header first; nothing holds a whole tensor. Each tensor has its own generator seeded
from (seed, tensor name), so the values do not depend on the shard layout.

Scale: projections and embeddings are normal with std :data:`INIT_STD` (transformers'
``initializer_range`` for Llama), norm weights are 1. With RMSNorm before every
projection, q/k/v, MLP and logits then stay around unit size through every layer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import torch

from pymesh.errors import ConfigError
from pymesh.model.config import ModelConfig, parse_config
from pymesh.model.weights import INDEX_FILE, SINGLE_FILE

log = logging.getLogger(__name__)

INIT_STD = 0.02
#: values generated per chunk (64 MB in float32)
CHUNK_ELEMENTS = 16 * 1024 * 1024
#: shards are cut before they pass this size (the real 1B ships as one 2.5 GB file)
MAX_SHARD_BYTES = 2 * 1024**3
MARKER = "pymesh_synthetic"
RANDOM_NOTE = "random weights: for speed and memory measurements only; the text it generates is noise"

_LLAMA_COMMON: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
    "attention_dropout": 0.0, "hidden_act": "silu", "initializer_range": INIT_STD, "mlp_bias": False,
    "max_position_embeddings": 131072, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "vocab_size": 128256, "bos_token_id": 128000, "eos_token_id": 128001, "use_cache": True,
    "num_key_value_heads": 8,
}


def _llama3_scaling(factor: float) -> dict[str, Any]:
    return {"factor": factor, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"}


#: the structural part of each real model's config.json (meta-llama's files on the hub)
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": {**_LLAMA_COMMON, "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
                     "head_dim": 64, "intermediate_size": 8192, "tie_word_embeddings": True,
                     "rope_scaling": _llama3_scaling(32.0)},
    "llama-3.2-3b": {**_LLAMA_COMMON, "hidden_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 24,
                     "head_dim": 128, "intermediate_size": 8192, "tie_word_embeddings": True,
                     "rope_scaling": _llama3_scaling(32.0)},
    "llama-3.1-8b": {**_LLAMA_COMMON, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "intermediate_size": 14336, "tie_word_embeddings": False,
                     "rope_scaling": _llama3_scaling(8.0)},
}

_DTYPES = {"float32": (torch.float32, "F32", torch.int32), "bfloat16": (torch.bfloat16, "BF16", torch.int16)}

#: Llama 3's named special tokens (id offset from the first special id); the rest are reserved
_SPECIALS = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>",
             6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>",
             10: "<|python_tag|>"}
N_SPECIAL = 256
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def synth_config(like: str, dtype: str = "bfloat16", layers: int | None = None, seed: int = 0) -> dict[str, Any]:
    """config.json of the shape ``like``, marked synthetic; ``layers`` cuts the depth (tests)."""
    shape = SHAPES.get(like)
    if shape is None:
        raise ConfigError(f"no synthetic shape named {like!r}; choose one of {', '.join(SHAPES)}")
    if dtype not in _DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not supported for synthetic models; use float32 or bfloat16")
    raw = json.loads(json.dumps(shape))
    if layers is not None:
        if layers < 1 or layers > shape["num_hidden_layers"]:
            raise ConfigError(f"--layers {layers}: {like} has {shape['num_hidden_layers']} layers; give 1 to that")
        raw["num_hidden_layers"] = layers
    raw["torch_dtype"] = dtype
    raw[MARKER] = {"like": like, "seed": seed, "note": RANDOM_NOTE}
    return dict(raw)


def tensor_shapes(config: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a Llama checkpoint with ``config``'s structure, in file order."""
    h, inter, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (config.vocab_size, h))]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (q, h)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, q)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                (p + "mlp.down_proj.weight", (h, inter))]
    out.append(("model.norm.weight", (h,)))
    if not config.tie_word_embeddings:
        out.append(("lm_head.weight", (config.vocab_size, h)))
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def plan_shards(tensors: list[tuple[str, tuple[int, ...]]], itemsize: int, max_bytes: int
                ) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors grouped into shards of at most ``max_bytes`` (a larger tensor gets its own)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = _numel(shape) * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def _chunks(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> Iterator[torch.Tensor]:
    """The tensor's values, a block of rows at a time: ones for norms, N(0, INIT_STD) otherwise."""
    if len(shape) == 1:
        yield torch.ones(shape, dtype=dtype)
        return
    rows, cols = shape
    gen = torch.Generator().manual_seed(_tensor_seed(seed, name))
    step = max(1, CHUNK_ELEMENTS // cols)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        yield torch.randn((n, cols), generator=gen, dtype=torch.float32).mul_(INIT_STD).to(dtype)


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: str, seed: int,
                      advance: Callable[[int], None] = lambda n: None) -> None:
    """Stream ``tensors`` into one safetensors file: header, then each tensor chunk by chunk."""
    torch_dtype, tag, int_view = _DTYPES[dtype]
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt", MARKER: "random weights"}}
    offset = 0
    for name, shape in tensors:
        nbytes = _numel(shape) * itemsize
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, shape in tensors:
            for chunk in _chunks(name, shape, torch_dtype, seed):
                _write_tensor(f, chunk, int_view)
                advance(chunk.numel() * itemsize)


def _write_tensor(f: BinaryIO, chunk: torch.Tensor, int_view: torch.dtype) -> None:
    # numpy has no bfloat16: write the bits through an integer view of the same width
    f.write(chunk.contiguous().view(int_view).numpy().tobytes())


def _merge_strings(count: int) -> list[tuple[str, str]]:
    """``count`` BPE merges in GPT-2's byte alphabet, breadth first: a token of length k is
    (a token of length k-1) + (one letter), starting from letters and the space mark 'Ġ'."""
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    starts = ["Ġ"] + list(letters) + list(letters.upper())
    merges: list[tuple[str, str]] = []
    level = starts
    while len(merges) < count:
        nxt: list[str] = []
        for left in level:
            for right in letters:
                merges.append((left, right))
                nxt.append(left + right)
                if len(merges) == count:
                    return merges
        level = nxt
    return merges


def synth_tokenizer(vocab_size: int, bos_token_id: int, eos_token_id: int) -> tuple[Any, dict[str, Any]]:
    """(tokenizers.Tokenizer, tokenizer_config dict): byte-level BPE with exactly ``vocab_size``
    tokens: 256 byte tokens, generated merges, then Llama 3's special tokens at the top."""
    from pymesh.model.gguf_tokenizer import TOKEN_CONTROL, TOKEN_NORMAL, GGUFVocab, build_tokenizer, tokenizer_config
    from pymesh.model.tokenizer import _bytes_to_unicode

    n_special = min(N_SPECIAL, vocab_size // 2)
    n_merges = vocab_size - 256 - n_special
    if n_merges < 0:
        raise ConfigError(f"vocab_size {vocab_size} is too small for a byte-level vocabulary (256 byte tokens + specials)")
    first_special = vocab_size - n_special
    tokens = list(_bytes_to_unicode().values())
    merges = _merge_strings(n_merges)
    tokens += [a + b for a, b in merges]
    tokens += [_SPECIALS.get(i, f"<|reserved_special_token_{i}|>") for i in range(n_special)]
    types = [TOKEN_NORMAL] * first_special + [TOKEN_CONTROL] * n_special
    for name, index in (("bos", bos_token_id), ("eos", eos_token_id)):
        if not first_special <= index < vocab_size:
            raise ConfigError(f"{name}_token_id {index} is not one of the special ids {first_special}..{vocab_size - 1}")
    vocab = GGUFVocab(model="gpt2", pre="llama3", tokens=tokens, token_types=types,
                      merges=[f"{a} {b}" for a, b in merges], scores=[], bos_token_id=bos_token_id,
                      eos_token_id=eos_token_id, unk_token_id=None, pad_token_id=None, eot_token_id=None,
                      add_bos_token=True, chat_template=_CHAT_TEMPLATE)
    return build_tokenizer(vocab), tokenizer_config(vocab, 131072)


def _readme(like: str, seed: int, dtype: str) -> str:
    return (f"Synthetic model shaped like {like} ({dtype}, seed {seed}), written by `pymesh model synth`.\n\n"
            f"The weights are RANDOM: for speed and memory measurements only. Its config.json,\n"
            f"tensor names, shapes and vocabulary size match the real model; the text it\n"
            f"generates is noise. config.json carries the marker \"{MARKER}\".\n")


def synth_model(like: str, out: str | Path, *, dtype: str = "bfloat16", seed: int = 0, layers: int | None = None,
                progress: bool = True, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write the synthetic folder ``out`` (new or empty); returns it."""
    root = Path(out)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ConfigError(f"--out {root} exists and is not an empty folder; choose a new or empty folder")
    raw = synth_config(like, dtype, layers, seed)
    config = parse_config(raw)
    tensors = tensor_shapes(config)
    itemsize = torch.empty((), dtype=_DTYPES[dtype][0]).element_size()
    shards = plan_shards(tensors, itemsize, max_shard_bytes)
    total = sum(_numel(s) for _, s in tensors) * itemsize
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok, tok_cfg = synth_tokenizer(config.vocab_size, raw["bos_token_id"], raw["eos_token_id"])
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n", encoding="utf-8")
    (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": raw["bos_token_id"], "eos_token_id": raw["eos_token_id"], "do_sample": False}, indent=2) + "\n",
        encoding="utf-8")
    (tmp / "README.txt").write_text(_readme(like, seed, dtype), encoding="utf-8")
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    log.info("writing %s-shaped random weights: %d tensors, %.2f GB in %d file(s)", like, len(tensors), total / 1e9,
             len(shards))
    with _byte_progress(total, f"synth {like}", progress) as advance:
        for name, shard in zip(names, shards):
            write_safetensors(tmp / name, shard, dtype, seed, advance)
    if len(shards) > 1:
        weight_map = {t: name for name, shard in zip(names, shards) for t, _ in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    if root.exists():
        root.rmdir()
    tmp.rename(root)
    return root


class _byte_progress:
    """Context manager yielding ``advance(nbytes)``; a rich bar on stderr when enabled."""

    def __init__(self, total: int, description: str, enabled: bool) -> None:
        self.total, self.description, self.enabled = total, description, enabled
        self._progress: Any = None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                  TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
        self._progress.start()
        task = self._progress.add_task(self.description, total=self.total)
        progress = self._progress
        return lambda n: progress.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
