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
        from tests.conftest import SETTINGS

        tokenizer_dir = pull_default_model(progress=False, root=SETTINGS.runtime.cache_root(),
                                           gguf=SETTINGS.runtime.smollm2_gguf)
    for fname in TOKENIZER_FILES:
        shutil.copy(Path(tokenizer_dir) / fname, out / fname)
    return out


# --- tiny GGUF files -------------------------------------------------------------------

#: fp16 scale fields of the K-quant blocks (byte offsets in a block; negative = from the
#: end). gguf cannot quantize K-quants, so tests fill their blocks with random bytes and
#: set these scales to a sane value.
K_QUANT_SCALE_OFFSETS = {"Q2_K": (-4, -2), "Q3_K": (-2,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (-2,)}

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MERGES = ("Ġ t", "h e", "Ġt he", "i n", "Ġ a", "Ġ 1", "1 2")  # the last two tell split rules apart
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


#: a SentencePiece-style ("llama") tiny vocabulary: pieces and scores after <unk> <s> </s>
#: and the 256 byte tokens; as long as the byte-level one, so the same weights fit both
SPM_PIECES = (("\u2581", -100.0), ("t", -101.0), ("h", -102.0), ("e", -103.0), ("he", -12.0),
              ("\u2581t", -11.0), ("\u2581the", -10.0))


def tiny_gguf_vocab(kind: str = "gpt2") -> list[str]:
    """gpt2: special tokens, the 256 byte-level characters, then the merged pieces of MERGES.
    llama: <unk> <s> </s>, the byte tokens <0x00>..<0xFF>, then SPM_PIECES."""
    from pymesh.model.tokenizer import _bytes_to_unicode

    if kind == "llama":
        return ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *(p for p, _ in SPM_PIECES)]
    return [*SPECIAL_TOKENS, *_bytes_to_unicode().values(), *(m.replace(" ", "") for m in MERGES)]


def permute_rotary(w: Any, n_head: int) -> Any:
    """llama.cpp's rotary permutation of a q/k projection (what its converter writes)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def quantize_like_gguf(w: Any, qtype_name: str, rng: Any) -> Any:
    """``w`` stored as ``qtype_name``: gguf's quantizer, or random blocks for K-quants."""
    import gguf
    import numpy as np

    qtype = gguf.GGMLQuantizationType[qtype_name]
    if qtype_name in K_QUANT_SCALE_OFFSETS:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows, cols = w.shape
        raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
        scale = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
        for off in K_QUANT_SCALE_OFFSETS[qtype_name]:
            start = off % size
            raw[:, :, start:start + 2] = scale
        return raw.reshape(rows, -1)
    return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)


def write_tiny_gguf(
    path: Path,
    weights: dict[str, Any],
    *,
    n_head: int,
    n_head_kv: int,
    qtype: str = "F32",
    arch: str = "llama",
    rms_eps: float = 1e-5,
    rope_theta: float = 10000.0,
    context: int = 256,
    rng: Any = None,
    skip_keys: tuple[str, ...] = (),
    pre: str = "smollm",
    tokenizer: str = "gpt2",
    add_bos: bool | None = None,
    extra: Any = None,
    qtypes: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write Hugging Face-named float32 numpy ``weights`` as a llama GGUF file.

    2-D projection and embedding tensors are stored as ``qtype``; norms stay F32 (as
    llama.cpp does). q/k are rotary-permuted like llama.cpp's converter. Returns the exact
    bytes-level tensors written (GGUF name -> stored array) for reference computations.
    ``tokenizer`` is "gpt2" (byte-level BPE) or "llama" (SentencePiece pieces and scores),
    ``pre`` is tokenizer.ggml.pre, ``add_bos`` tokenizer.ggml.add_bos_token (omitted when
    None), ``extra(writer)`` may add more metadata or tensors. ``qtypes`` maps GGUF tensor
    names to a type used for that tensor instead of ``qtype`` (a file that mixes types).
    """
    import gguf
    import numpy as np

    rng = rng or np.random.default_rng(0)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_block = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    layers = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("model.layers."))
    for i in range(layers):
        for hf, gg in per_block.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
            names[f"model.layers.{i}.{hf}.bias"] = f"blk.{i}.{gg}.bias"
    emb = weights["model.embed_tokens.weight"]
    vocab = tiny_gguf_vocab(tokenizer)
    assert emb.shape[0] == len(vocab), f"embedding rows {emb.shape[0]} != tiny vocab {len(vocab)}"
    w = gguf.GGUFWriter(str(path), arch)
    meta = {
        "block_count": lambda: w.add_block_count(layers),
        "context_length": lambda: w.add_context_length(context),
        "embedding_length": lambda: w.add_embedding_length(emb.shape[1]),
        "feed_forward_length": lambda: w.add_feed_forward_length(weights["model.layers.0.mlp.up_proj.weight"].shape[0]),
        "head_count": lambda: w.add_head_count(n_head),
        "head_count_kv": lambda: w.add_head_count_kv(n_head_kv),
        "layer_norm_rms_epsilon": lambda: w.add_layer_norm_rms_eps(rms_eps),
        "freq_base": lambda: w.add_rope_freq_base(rope_theta),
    }
    for key, add in meta.items():
        if key not in skip_keys:
            add()
    w.add_tokenizer_model(tokenizer)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.add_token_list(vocab)
    if tokenizer == "llama":  # unknown, control x2, bytes, normal pieces
        w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES))
        w.add_token_scores([0.0] * (3 + 256) + [score for _, score in SPM_PIECES])
        w.add_unk_token_id(0)
    else:
        w.add_tokenizer_pre(pre)
        w.add_token_types([3] * len(SPECIAL_TOKENS) + [1] * (len(vocab) - len(SPECIAL_TOKENS)))
        w.add_token_merges(list(MERGES))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)
    stored: dict[str, Any] = {}
    for hf, arr in weights.items():
        gname = names[hf]
        a = np.asarray(arr, dtype=np.float32)
        if arch != "llama":  # llama.cpp permutes q/k rows only for its llama architecture
            pass
        elif gname.endswith(("attn_q.weight", "attn_q.bias")):
            a = permute_rotary(a, n_head)
        elif gname.endswith(("attn_k.weight", "attn_k.bias")):
            a = permute_rotary(a, n_head_kv)
        kind = (qtypes or {}).get(gname, qtype)
        if a.ndim == 1 or kind == "F32":
            stored[gname] = (a, "F32")
            w.add_tensor(gname, a)
        else:
            q = quantize_like_gguf(a, kind, rng)
            stored[gname] = (q, kind)
            w.add_tensor(gname, q, raw_dtype=gguf.GGMLQuantizationType[kind])
    if extra is not None:
        extra(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored
