"""Model identity of GGUF files: the base id equals the converted float32 folder's, the
quantization suffix names the type most block weights compute in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package is a runtime dependency; install pymesh")

from pymesh.errors import ConfigError  # noqa: E402
from pymesh.model.fingerprint import fingerprint, model_id, quant_label  # noqa: E402
from pymesh.model.gguf_convert import convert_gguf  # noqa: E402
from pymesh.model.gguf_identity import gguf_model_name, weight_types  # noqa: E402
from tests.model.test_convert import HEAD_DIM, LAYERS, N_HEAD, N_KV, random_weights  # noqa: E402
from tests.model.tiny import write_tiny_gguf  # noqa: E402

TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K")
#: the quantization suffix each all-one-type file gets (None: computed in float)
LABELS = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}


def _write(path: Path, qtype: str, *, tied: bool = True, seed: int = 0, **kw: object) -> Path:
    write_tiny_gguf(path, random_weights(tied=tied, seed=seed), n_head=N_HEAD, n_head_kv=N_KV, qtype=qtype,
                    **kw)  # type: ignore[arg-type]
    return path


@pytest.mark.parametrize("qtype", TYPES)
def test_fingerprint_equals_the_converted_folders(tmp_path: Path, qtype: str) -> None:
    """Every tensor but the norms is over 64 KiB in float32, so the sampled windows (and for
    q/k the permuted rows) are what is compared, not whole-tensor hashes."""
    for tied in (True, False):
        path = _write(tmp_path / f"m-{tied}.{qtype}.gguf", qtype, tied=tied)
        folder = convert_gguf(path, tmp_path / f"m-{tied}", progress=False)
        assert fingerprint(path) == fingerprint(folder), (qtype, tied)
        assert model_id(path).split(":")[0] == model_id(folder)
        assert quant_label(path) == LABELS.get(qtype)
        suffix = LABELS.get(qtype)
        assert model_id(path) == model_id(folder) + (f":{suffix}" if suffix else "")


def test_qwen2_fingerprint_with_biases_and_no_permutation(tmp_path: Path) -> None:
    weights = random_weights(seed=7)
    rng = np.random.default_rng(7)
    for i in range(LAYERS):
        for proj, rows in (("q_proj", N_HEAD * HEAD_DIM), ("k_proj", N_KV * HEAD_DIM), ("v_proj", N_KV * HEAD_DIM)):
            weights[f"model.layers.{i}.self_attn.{proj}.bias"] = rng.normal(0, 0.5, rows).astype(np.float32)
    path = tmp_path / "q.gguf"
    write_tiny_gguf(path, weights, n_head=N_HEAD, n_head_kv=N_KV, arch="qwen2", pre="qwen2", qtype="Q4_0")
    assert fingerprint(path) == fingerprint(convert_gguf(path, tmp_path / "q", progress=False))


def test_different_weights_or_quantizations_differ(tmp_path: Path) -> None:
    ids = {fingerprint(_write(tmp_path / f"{q}-{seed}.gguf", q, seed=seed))
           for q in ("Q8_0", "Q4_0") for seed in (0, 1)}
    assert len(ids) == 4


def test_a_mixed_file_is_named_by_most_of_its_block_weights(tmp_path: Path) -> None:
    # 14 block matrices: 11 Q4_0, 2 Q8_0, 1 Q4_K (served as float); the tied embeddings / head Q8_0
    over = {"blk.0.ffn_down.weight": "Q8_0", "blk.0.ffn_up.weight": "Q8_0", "token_embd.weight": "Q8_0",
            "blk.1.attn_v.weight": "Q4_K"}
    path = _write(tmp_path / "mixed.gguf", "Q4_0", qtypes=over)
    assert quant_label(path) == "q4_0"
    assert weight_types(path) == {"q4_0": 11, "q8_0": 3, "float": 1}
    # mostly K-quants: computed in float, no suffix; the record still lists the blocks
    over = {f"blk.{i}.{n}.weight": "Q8_0" for i in range(LAYERS) for n in ("attn_q", "attn_k")}
    path = _write(tmp_path / "k.gguf", "Q6_K", qtypes=over)
    assert quant_label(path) is None and weight_types(path) == {"float": 11, "q8_0": 4}
    assert ":" not in model_id(path)


def test_quantize_does_not_apply_to_a_gguf(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.gguf", "Q8_0")
    with pytest.raises(ConfigError, match="own quantization"):
        quant_label(path, "q4_0")
    with pytest.raises(ConfigError, match="own quantization"):
        model_id(path, quantize="q4_0")


@pytest.mark.parametrize(("stem", "name"), [
    ("SmolLM2-135M-Instruct.Q4_1", "SmolLM2-135M-Instruct"),
    ("Llama-3.2-1B-Instruct-Q4_K_M", "Llama-3.2-1B-Instruct"),
    ("qwen2.5-0.5b-instruct-q8_0", "qwen2.5-0.5b-instruct"),
    ("model.f16", "model"),
    ("model-BF16", "model"),
    ("Mistral-7B.IQ4_XS", "Mistral-7B"),
    ("Q4_0", "Q4_0"),          # nothing but a tag: kept
    ("phi-3.5-mini", "phi-3.5-mini"),
])
def test_default_name_drops_a_trailing_quantization_tag(stem: str, name: str) -> None:
    assert gguf_model_name(f"/x/{stem}.gguf") == name


def test_name_override_and_folder_of_the_same_name(tmp_path: Path) -> None:
    path = _write(tmp_path / "tiny.Q4_1.gguf", "Q4_1")
    folder = convert_gguf(path, tmp_path / "tiny", progress=False)
    assert model_id(path) == f"{model_id(folder)}:q4_1"
    assert model_id(path, name="mine").startswith("mine@")


def test_smollm2_gguf_and_its_folder_share_the_base_id(smollm2_gguf: Path, smollm2_dir: Path) -> None:
    assert fingerprint(smollm2_gguf) == fingerprint(smollm2_dir)
    assert model_id(smollm2_gguf) == f"{model_id(smollm2_dir)}:q4_1"
    assert weight_types(smollm2_gguf) == {"q4_1": 210, "q8_0": 1}
