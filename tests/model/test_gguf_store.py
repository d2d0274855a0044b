"""GGUF files served as they are: GGUFStore, load_span / load_head / load_config /
load_tokenizer on a .gguf path against the folder the converter makes from the same file."""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package is a runtime dependency; install pymesh")
torch = pytest.importorskip("torch", reason="torch is a runtime dependency; install pymesh")

from pymesh.errors import ConfigError  # noqa: E402
from pymesh.model.config import load_config  # noqa: E402
from pymesh.model.gguf_convert import convert_gguf  # noqa: E402
from pymesh.model.gguf_file import GGUFFile, open_gguf_untrusted  # noqa: E402
from pymesh.model.gguf_store import GGUFStore  # noqa: E402
from pymesh.model.head import load_head  # noqa: E402
from pymesh.model.quant import QTensor  # noqa: E402
from pymesh.model.span import load_span  # noqa: E402
from pymesh.model.tokenizer import load_tokenizer  # noqa: E402
from tests.model.test_convert import HIDDEN, LAYERS, N_HEAD, N_KV, random_weights  # noqa: E402
from tests.model.tiny import write_tiny_gguf  # noqa: E402

#: types kept as blocks, served as floats, and dequantized at load (K-quants: random blocks)
BLOCK_TYPES = ("Q8_0", "Q4_0", "Q4_1")
TYPES = (*BLOCK_TYPES, "F32", "F16", "Q4_K", "Q6_K")
MATRICES = ("w_qkv", "w_o", "w_gate_up", "w_down")


def _pair(tmp_path: Path, qtype: str, *, tied: bool = True, **kw: Any) -> tuple[Path, Path]:
    """A tiny GGUF of ``qtype`` and the float32 folder converted from it."""
    path = tmp_path / f"tiny.{qtype}.gguf"
    write_tiny_gguf(path, random_weights(tied=tied), n_head=N_HEAD, n_head_kv=N_KV, qtype=qtype, **kw)
    return path, convert_gguf(path, tmp_path / f"hf-{qtype}", progress=False)


def _as_float(w: Any) -> torch.Tensor:
    return w.dequantize(torch.float32) if isinstance(w, QTensor) else w


@pytest.mark.parametrize("qtype", TYPES)
def test_span_and_head_hold_exactly_the_converted_values(tmp_path: Path, qtype: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    path, folder = _pair(tmp_path, qtype, tied=qtype != "Q4_0")
    with caplog.at_level(logging.INFO, logger="pymesh.model.gguf_store"):
        span = load_span(path, 0, LAYERS)
    ref = load_span(folder, 0, LAYERS)
    for got, want in zip(span.blocks, ref.blocks):
        for name in MATRICES:
            w = getattr(got, name)
            assert isinstance(w, QTensor) == (qtype in BLOCK_TYPES), (name, w)
            if isinstance(w, QTensor):
                assert w.qtype == qtype.lower()
            assert torch.equal(_as_float(w), getattr(want, name)), name
        assert torch.equal(got.ln_attn, want.ln_attn) and torch.equal(got.ln_mlp, want.ln_mlp)
    dequantized = [r.getMessage() for r in caplog.records if "dequantized" in r.getMessage()]
    if qtype in ("Q4_K", "Q6_K"):
        assert len(dequantized) == 1 and qtype in dequantized[0], dequantized
    else:
        assert not dequantized
    head, ref_head = load_head(path), load_head(folder)
    for name in ("embed_tokens", "lm_head"):
        w = getattr(head, name)
        assert isinstance(w, QTensor) == (qtype in BLOCK_TYPES)
        assert torch.equal(_as_float(w), getattr(ref_head, name)), name
    assert torch.equal(head.norm, ref_head.norm)
    # Same weights; block matrices run through the quantized kernels, which round the
    # activations to 8 bits (about 0.5% per matmul; measured 4% after these two random blocks).
    bound = 0.1 if qtype in BLOCK_TYPES else 1e-5
    x = torch.randn(1, 5, HIDDEN, generator=torch.Generator().manual_seed(0))
    out, ref_out = span(x, span.new_cache(8), 0), ref(x, ref.new_cache(8), 0)
    assert float((out - ref_out).norm() / ref_out.norm()) < bound
    ids = torch.tensor([[1, 50, 70, 90]])
    logits, ref_logits = head.logits(head.embed(ids)), ref_head.logits(ref_head.embed(ids))
    assert float((logits - ref_logits).norm() / ref_logits.norm()) < bound


def test_a_span_reads_only_its_own_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.gguf"
    weights = random_weights()
    weights.update({k.replace("layers.1.", "layers.2."): v for k, v in weights.items() if ".layers.1." in k})
    write_tiny_gguf(path, weights, n_head=N_HEAD, n_head_kv=N_KV, qtype="Q4_1")
    touched: list[str] = []
    original = GGUFFile.raw

    def recording(self: GGUFFile, name: str) -> np.ndarray:
        touched.append(name)
        return original(self, name)

    monkeypatch.setattr(GGUFFile, "raw", recording)
    load_span(path, 1, 2)
    assert touched and all(n.startswith("blk.1.") for n in touched), touched
    assert len(set(touched)) == 9  # 7 matrices + 2 norms
    touched.clear()
    load_head(path)
    assert set(touched) == {"token_embd.weight", "output_norm.weight"}


def test_quantize_shapes_and_missing_tensors_are_config_errors(tmp_path: Path) -> None:
    path, _ = _pair(tmp_path, "Q8_0")
    with pytest.raises(ConfigError, match="own quantization"):
        load_span(path, 0, 1, quantize="q4_0")
    with GGUFStore(path) as store:
        with pytest.raises(ConfigError, match=r"model\.norm\.weight.*\(256,\).*\(7,\)"):
            store.get("model.norm.weight", (7,), torch.float32)
        with pytest.raises(ConfigError, match=r"q_proj.*\(256, 256\).*\(256, 64\)"):
            store.get_weight("model.layers.0.self_attn.q_proj.weight", (256, 64), torch.float32)
        with pytest.raises(ConfigError, match="lm_head.weight is missing"):
            store.get_weight("lm_head.weight", (3, 3), torch.float32)


@pytest.mark.parametrize("tokenizer", ["gpt2", "llama"])
def test_config_and_tokenizer_come_from_the_metadata_as_the_folder_has_them(tmp_path: Path, tokenizer: str) -> None:
    path, folder = _pair(tmp_path, "Q4_1", tokenizer=tokenizer)
    assert load_config(path) == load_config(folder)
    mine, ref = load_tokenizer(path), load_tokenizer(folder)
    assert mine.eos_token_ids == ref.eos_token_ids and mine.bos_token_id == ref.bos_token_id
    assert mine.chat_template == ref.chat_template and mine.config == ref.config
    for text in ("the 123 then", "héllo\nthe", "<|im_start|>the"):
        assert mine.encode(text) == ref.encode(text)
    chat = [{"role": "user", "content": "the"}]
    assert mine.encode_chat(chat) == ref.encode_chat(chat)


def test_smollm2_gguf_serves_like_its_converted_folder(smollm2_gguf: Path, smollm2_dir: Path) -> None:
    """The embedded model: Q4_1 blocks and a Q8_0 tied head dequantize exactly to the folder."""
    assert load_config(smollm2_gguf) == load_config(smollm2_dir)
    mine, ref = load_tokenizer(smollm2_gguf), load_tokenizer(smollm2_dir)
    chat = [{"role": "user", "content": "What is the capital of France? 1234"}]
    assert mine.encode_chat(chat) == ref.encode_chat(chat) and mine.eos_token_ids == ref.eos_token_ids
    span, ref_span = load_span(smollm2_gguf, 29, 30), load_span(smollm2_dir, 29, 30)
    for name in MATRICES:
        w = getattr(span.blocks[0], name)
        assert isinstance(w, QTensor) and w.qtype == "q4_1"
        assert torch.equal(w.dequantize(), getattr(ref_span.blocks[0], name)), name
    head = load_head(smollm2_gguf)
    assert isinstance(head.lm_head, QTensor) and head.lm_head.qtype == "q8_0"
    assert torch.equal(head.embed_tokens.dequantize()[:1000], load_head(smollm2_dir).embed_tokens[:1000])


# --- corrupt files ----------------------------------------------------------------------


def _open_everything(path: Path) -> None:
    """What a worker does with a file: parse, config, and read a few tensors."""
    with GGUFStore(path) as store:
        store.get("model.norm.weight", (HIDDEN,), torch.float32)
        store.get_weight("model.layers.0.self_attn.q_proj.weight", (HIDDEN, HIDDEN), torch.float32)
    load_config(path)


def test_truncated_files_are_config_errors(tmp_path: Path) -> None:
    path, _ = _pair(tmp_path, "Q4_0")
    data = path.read_bytes()
    data_start = open_gguf_untrusted(path).tensors["token_embd.weight"].offset
    cuts = [0, 3, 7, 15, 23, 100, 5000, data_start - 1, data_start + 10, len(data) - 1]
    for cut in cuts:
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ConfigError):
            _open_everything(bad)


def test_declared_sizes_past_the_file_never_allocate(tmp_path: Path) -> None:
    """Counts and dimensions near 2**64 are refused from the header, before any allocation."""
    path, _ = _pair(tmp_path, "Q8_0")
    data = bytearray(path.read_bytes())
    huge = struct.pack("<Q", 2**63 + 5)
    for offset in (8, 16):  # tensor count, metadata count
        bad = tmp_path / f"count{offset}.gguf"
        bad.write_bytes(bytes(data[:offset]) + huge + bytes(data[offset + 8:]))
        with pytest.raises(ConfigError, match="needs"):
            open_gguf_untrusted(bad)
    # the first tensor entry's dimension (token_embd: name length, name, n_dims, dims...)
    name = b"token_embd.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name) + 4
    bad = tmp_path / "dim.gguf"
    bad.write_bytes(bytes(data[:at]) + huge + bytes(data[at + 8:]))
    with pytest.raises(ConfigError):
        open_gguf_untrusted(bad)


def test_random_header_mutations_only_ever_raise_config_error(tmp_path: Path) -> None:
    """Bounded fuzz: 400 copies of a tiny file with 1-4 bytes overwritten (random bytes, or a
    random little-endian integer), a third each in the fixed header, the metadata and the tensor
    table: each either loads or raises ConfigError, never another exception."""
    path, _ = _pair(tmp_path, "Q4_1")
    data = path.read_bytes()
    name = b"token_embd.weight"
    table = data.index(struct.pack("<Q", len(name)) + name)
    end = open_gguf_untrusted(path).tensors[name.decode()].offset
    regions = ((0, 24), (24, table), (table, end))
    values = (0, 1, 255, 2**31, 2**32 - 1, 2**63, 2**64 - 1)
    rng = np.random.default_rng(15)
    bad = tmp_path / "fuzz.gguf"
    outcomes = {"ok": 0, "error": 0}
    for i in range(400):
        mutated = bytearray(data)
        lo, hi = regions[i % 3]
        at = int(rng.integers(lo, hi))
        if rng.random() < 0.5:
            n = int(rng.integers(1, 5))
            mutated[at:at + n] = rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()
        else:
            value = values[int(rng.integers(len(values)))] if rng.random() < 0.7 else int(rng.integers(0, 2**40))
            mutated[at:at + 8] = value.to_bytes(8, "little")
        bad.write_bytes(bytes(mutated))
        try:
            _open_everything(bad)
            outcomes["ok"] += 1
        except ConfigError:
            outcomes["error"] += 1
    assert outcomes["error"] > 100, outcomes  # the mutations do reach the parser's checks


def test_a_rewritten_file_is_parsed_again(tmp_path: Path) -> None:
    """Parsed headers are reused for an unchanged file only: a same-size rewrite (too quick for
    mtimes to differ) with other metadata is read anew; closing one handle leaves others usable."""
    path, _ = _pair(tmp_path, "Q8_0")
    data = bytearray(path.read_bytes())
    first = open_gguf_untrusted(path)
    again = open_gguf_untrusted(path)
    first.close()
    assert again.raw("output_norm.weight").size == HIDDEN * 4
    key = b"llama.context_length"
    at = data.index(key) + len(key) + 4  # after the key and its uint32 type
    assert struct.unpack_from("<I", data, at)[0] == 256
    data[at:at + 4] = struct.pack("<I", 999)
    path.write_bytes(bytes(data))
    assert open_gguf_untrusted(path).metadata["llama.context_length"] == 999
    assert load_config(path).max_position_embeddings == 999
