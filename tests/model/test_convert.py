"""GGUF -> Hugging Face conversion: tiny files of every storable type, errors, the real SmolLM2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package is a runtime dependency; install pymesh")
torch = pytest.importorskip("torch", reason="torch is a runtime dependency; install pymesh")

from safetensors.numpy import load_file  # noqa: E402

from pymesh.errors import ConfigError  # noqa: E402
from pymesh.model.gguf_convert import convert_gguf, unpermute_rotary  # noqa: E402
from tests.model.tiny import permute_rotary, tiny_gguf_vocab, write_tiny_gguf  # noqa: E402

HIDDEN, FFN, N_HEAD, N_KV, LAYERS = 256, 512, 4, 2, 2
HEAD_DIM = HIDDEN // N_HEAD

#: worst |error| / max|row| a round trip through each type may show
TOLERANCE = {"F32": 0.0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 1e-2, "Q5_0": 0.07, "Q5_1": 0.07, "Q4_0": 0.15, "Q4_1": 0.15}
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def _quantizable() -> list[str]:
    """Every type listed in TOLERANCE that this gguf version can quantize."""
    ok = []
    x = np.ones((1, 256), dtype=np.float32)
    for name in TOLERANCE:
        try:
            gguf.quants.quantize(x, gguf.GGMLQuantizationType[name])
        except NotImplementedError:
            continue
        ok.append(name)
    return ok


def random_weights(tied: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    vocab = len(tiny_gguf_vocab())
    w: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": rng.normal(0, 0.5, (vocab, HIDDEN)),
        "model.norm.weight": 1 + rng.normal(0, 0.1, HIDDEN),
    }
    if not tied:
        w["lm_head.weight"] = rng.normal(0, 0.5, (vocab, HIDDEN))
    kv = N_KV * HEAD_DIM
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + rng.normal(0, 0.1, HIDDEN)
        w[p + "post_attention_layernorm.weight"] = 1 + rng.normal(0, 0.1, HIDDEN)
        w[p + "self_attn.q_proj.weight"] = rng.normal(0, 0.2, (HIDDEN, HIDDEN))
        w[p + "self_attn.k_proj.weight"] = rng.normal(0, 0.2, (kv, HIDDEN))
        w[p + "self_attn.v_proj.weight"] = rng.normal(0, 0.2, (kv, HIDDEN))
        w[p + "self_attn.o_proj.weight"] = rng.normal(0, 0.2, (HIDDEN, HIDDEN))
        w[p + "mlp.gate_proj.weight"] = rng.normal(0, 0.2, (FFN, HIDDEN))
        w[p + "mlp.up_proj.weight"] = rng.normal(0, 0.2, (FFN, HIDDEN))
        w[p + "mlp.down_proj.weight"] = rng.normal(0, 0.2, (HIDDEN, FFN))
    return {k: v.astype(np.float32) for k, v in w.items()}


def test_rotary_unpermute_inverts_llama_cpp_permutation() -> None:
    rng = np.random.default_rng(1)
    for heads, rows in ((4, 256), (3, 192), (9, 576)):
        w = rng.normal(size=(rows, 7)).astype(np.float32)
        permuted = permute_rotary(w, heads)
        assert not np.array_equal(permuted, w)
        np.testing.assert_array_equal(unpermute_rotary(permuted, heads), w)
    bias = rng.normal(size=256).astype(np.float32)
    np.testing.assert_array_equal(unpermute_rotary(permute_rotary(bias, 4), 4), bias)


@pytest.mark.parametrize("qtype", _quantizable())
def test_tiny_gguf_each_type_converts_to_expected_values(tmp_path: Path, qtype: str) -> None:
    weights = random_weights(tied=qtype != "Q8_0")
    gguf_path = tmp_path / f"tiny-{qtype}.gguf"
    write_tiny_gguf(gguf_path, weights, n_head=N_HEAD, n_head_kv=N_KV, qtype=qtype)
    out = convert_gguf(gguf_path, tmp_path / "hf", progress=False)
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(weights)
    tol = TOLERANCE[qtype]
    for name, want in weights.items():
        have = got[name]
        assert have.shape == want.shape and have.dtype == np.float32, name
        scale = np.abs(want).max(axis=-1, keepdims=True)
        err = np.abs(have - want)
        assert (err <= tol * scale + 1e-7).all(), f"{name}: worst error {float((err / scale).max()):.4f} of row max, allowed {tol} for {qtype}"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (HIDDEN, FFN, LAYERS)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (N_HEAD, N_KV, HEAD_DIM)
    assert cfg["tie_word_embeddings"] == ("lm_head.weight" not in weights)
    assert cfg["vocab_size"] == len(tiny_gguf_vocab())


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_tiny_gguf_k_quants_match_gguf_dequantize(tmp_path: Path, qtype: str) -> None:
    """gguf cannot quantize K-quants: blocks are random bytes, the reference is gguf's own
    dequantizer on the stored bytes, un-permuted by the independent reference permutation."""
    weights = random_weights()
    gguf_path = tmp_path / f"tiny-{qtype}.gguf"
    stored = write_tiny_gguf(gguf_path, weights, n_head=N_HEAD, n_head_kv=N_KV, qtype=qtype)
    got = load_file(str(convert_gguf(gguf_path, tmp_path / "hf", progress=False) / "model.safetensors"))
    qt = gguf.GGMLQuantizationType[qtype]
    q = stored["blk.1.attn_q.weight"][0]
    want_q = gguf.quants.dequantize(q, qt).reshape(HIDDEN, HIDDEN)
    # undo permute_rotary with an explicit index map (not the converter's reshape)
    half = HEAD_DIM // 2
    idx = np.array([h * HEAD_DIM + (2 * (r % half) + r // half) for h in range(N_HEAD) for r in range(HEAD_DIM)])
    np.testing.assert_array_equal(got["model.layers.1.self_attn.q_proj.weight"], want_q[idx])
    down = gguf.quants.dequantize(stored["blk.0.ffn_down.weight"][0], qt).reshape(HIDDEN, FFN)
    np.testing.assert_array_equal(got["model.layers.0.mlp.down_proj.weight"], down)
    assert all(np.isfinite(v).all() for v in got.values())


@pytest.mark.timeout(120)
def test_tiny_gguf_model_runs_like_the_original_in_transformers(tmp_path: Path) -> None:
    """F32 round trip: transformers on the converted folder gives the original model's logits."""
    transformers = pytest.importorskip("transformers", reason="transformers is the test reference (pip install -e .[test])")
    weights = random_weights(tied=False, seed=3)
    write_tiny_gguf(tmp_path / "m.gguf", weights, n_head=N_HEAD, n_head_kv=N_KV, rms_eps=1e-6, rope_theta=5000.0)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "hf", progress=False)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tiny_gguf_vocab()), hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=N_HEAD, num_key_value_heads=N_KV, rms_norm_eps=1e-6, rope_theta=5000.0,
        tie_word_embeddings=False,
    )
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    conv = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 50, 70, 90, 3, 200, 17, 260, 12, 44]])
    with torch.no_grad():
        a, b = ref(ids).logits, conv(ids).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_bfloat16_output(tmp_path: Path) -> None:
    weights = random_weights()
    write_tiny_gguf(tmp_path / "m.gguf", weights, n_head=N_HEAD, n_head_kv=N_KV, qtype="Q8_0")
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "hf", dtype="bfloat16", progress=False)
    from safetensors.torch import load_file as load_torch

    got = load_torch(str(out / "model.safetensors"))
    ref = load_file(str(convert_gguf(tmp_path / "m.gguf", tmp_path / "f32", progress=False) / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    for k, v in ref.items():
        assert torch.equal(got[k], torch.from_numpy(v).to(torch.bfloat16)), k
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "m.gguf", random_weights(), n_head=N_HEAD, n_head_kv=N_KV, arch="gpt2")
    with pytest.raises(ConfigError, match="'gpt2'"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "hf", progress=False)


def test_tensor_type_gguf_cannot_dequantize_is_named(tmp_path: Path) -> None:
    import gguf as g

    weights = random_weights()
    path = tmp_path / "m.gguf"
    stored = write_tiny_gguf(path, weights, n_head=N_HEAD, n_head_kv=N_KV)
    # rewrite with one tensor stored as Q8_1 (no dequantizer in gguf)
    w = g.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    reader = g.GGUFReader(path)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == g.GGUFValueType.ARRAY else None
        w.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    block, size = g.GGML_QUANT_SIZES[g.GGMLQuantizationType.Q8_1]
    for name, (arr, _) in stored.items():
        if name == "blk.0.ffn_up.weight":
            raw = np.zeros((arr.shape[0], arr.shape[1] // block * size), dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=g.GGMLQuantizationType.Q8_1)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match="Q8_1"):
        convert_gguf(tmp_path / "bad.gguf", tmp_path / "hf", progress=False)


def test_missing_metadata_is_named(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "m.gguf", random_weights(), n_head=N_HEAD, n_head_kv=N_KV, skip_keys=("block_count",))
    with pytest.raises(ConfigError, match="llama.block_count"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "hf", progress=False)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ConfigError, match="not a readable GGUF"):
        convert_gguf(bad, tmp_path / "hf", progress=False)
    with pytest.raises(ConfigError, match="does not exist"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "hf", progress=False)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_smollm2_matches_transformers_gguf_loader(smollm2_gguf: Path, smollm2_dir: Path) -> None:
    """Every tensor of the converted SmolLM2 equals transformers' own GGUF import."""
    pytest.importorskip("transformers", reason="transformers is the test reference (pip install -e .[test])")
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    ref_cfg = AutoConfig.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(ref_cfg)
    ref = load_gguf_checkpoint(str(smollm2_gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    ours = load_file(str(smollm2_dir / "model.safetensors"))
    assert set(ours) == set(ref)
    for name, value in ours.items():
        np.testing.assert_array_equal(value, torch.as_tensor(ref[name]).float().numpy(), err_msg=name)
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings"):
        assert cfg[key] == getattr(ref_cfg, key), key
    assert cfg["rms_norm_eps"] == pytest.approx(ref_cfg.rms_norm_eps)
    assert cfg["rope_theta"] == pytest.approx(ref_cfg.rope_parameters["rope_theta"])
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["tie_word_embeddings"]) == (30, 576, True)


@pytest.mark.timeout(120)
def test_cli_convert_and_pull_is_idempotent(tmp_path: Path, smollm2_dir: Path) -> None:
    write_tiny_gguf(tmp_path / "m.gguf", random_weights(), n_head=N_HEAD, n_head_kv=N_KV, qtype="Q4_0")
    run = subprocess.run([sys.executable, "-m", "pymesh", "model", "convert", str(tmp_path / "m.gguf"),
                          str(tmp_path / "hf"), "--no-progress"], capture_output=True, text=True, timeout=100)
    assert run.returncode == 0, run.stderr
    assert Path(run.stdout.strip()) == tmp_path / "hf"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    # smollm2_dir is cached: a pull finds it and only prints the folder
    before = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    pull = subprocess.run([sys.executable, "-m", "pymesh", "model", "pull", "--no-progress"],
                          capture_output=True, text=True, timeout=100)
    assert pull.returncode == 0, pull.stderr
    assert Path(pull.stdout.strip()) == smollm2_dir
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == before
    bad = subprocess.run([sys.executable, "-m", "pymesh", "model", "pull", "llama-70b"],
                         capture_output=True, text=True, timeout=100)
    assert bad.returncode == 1 and "no embedded model named 'llama-70b'" in bad.stderr
