"""Placement counts quantized bytes per block (issue 15): block matrices at the block
format's bytes per 32 weights, norms and biases in the run dtype, so a machine takes about
7x more q4_0 blocks than float32 ones; and the worker CLI passes --quantize on."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pymesh.worker.placement import block_parameter_count, block_vector_count, blocks_that_fit
from pymesh.worker.placement import block_weight_bytes as _bytes

# a 7B Llama (hidden 4096, SwiGLU 11008, 32 heads of 128) and SmolLM2-135M (576, 1536, 9/3 heads of 64)
LLAMA7B = (4096, 11008, 32, 32, 128)
SMOL = (576, 1536, 9, 3, 64)


def block_weight_bytes(h: int, i: int, nh: int, nkv: int, hd: int, bias: bool = False, *, elem_bytes: int,
                       quant_block_bytes: int | None = None) -> int:
    return _bytes(block_parameter_count(h, i, nh, nkv, hd, bias), block_vector_count(h, nh, nkv, hd, bias),
                  elem_bytes=elem_bytes, quant_block_bytes=quant_block_bytes)


@pytest.mark.parametrize("shape", [LLAMA7B, SMOL])
def test_matrices_count_at_the_block_formats_bytes_per_weight(shape: tuple[int, int, int, int, int]) -> None:
    params = block_parameter_count(*shape)
    vectors = 2 * shape[0]                        # the two RMS norms
    assert block_weight_bytes(*shape, elem_bytes=4) == params * 4
    assert block_weight_bytes(*shape, elem_bytes=4, quant_block_bytes=34) == (params - vectors) * 34 // 32 + vectors * 4
    assert block_weight_bytes(*shape, elem_bytes=2, quant_block_bytes=18) == (params - vectors) * 18 // 32 + vectors * 2


def test_biases_stay_in_the_run_dtype() -> None:
    plain = block_weight_bytes(*SMOL, elem_bytes=4, quant_block_bytes=18)
    biased = block_weight_bytes(*SMOL, True, elem_bytes=4, quant_block_bytes=18)
    assert biased - plain == (9 + 2 * 3) * 64 * 4


def test_a_24_gib_machine_takes_about_7x_more_q4_blocks_than_fp32() -> None:
    avail = 24 << 30
    fits = {q: blocks_that_fit(avail, block_weight_bytes(*LLAMA7B, elem_bytes=4, quant_block_bytes=q), 0, 256 << 20,
                               10_000) for q in (None, 34, 20, 18)}
    assert 20 <= fits[None] <= 30                   # ~0.8 GB per fp32 block
    assert 6.8 <= fits[18] / fits[None] <= 7.3      # q4_0: 0.5625 bytes per weight vs 4
    assert 6.1 <= fits[20] / fits[None] <= 6.5      # q4_1: 0.625
    assert 3.6 <= fits[34] / fits[None] <= 3.9      # q8_0: 1.0625


def test_block_bytes_reads_the_config_and_the_quantization(tmp_path: Path) -> None:
    import json

    from pymesh.worker.runtime import block_bytes

    pytest.importorskip("transformers")
    from tests.model.tiny import make_tiny_model

    folder = make_tiny_model(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    f32, kv, n = block_bytes(str(folder), "float32")
    q4, kv4, n4 = block_bytes(str(folder), "float32", "q4_0")
    assert (kv, n) == (kv4, n4) == (2 * cfg["num_key_value_heads"] * (cfg["hidden_size"] // cfg["num_attention_heads"]) * 4,
                                    cfg["num_hidden_layers"])
    vectors = 2 * cfg["hidden_size"] * 4
    assert q4 - vectors == (f32 - vectors) // 4 * 18 // 32


def test_worker_cli_parses_quantize() -> None:
    from pymesh.cli import worker

    parser = argparse.ArgumentParser()
    worker.add_arguments(parser)
    args = parser.parse_args(["--bootstrap", "127.0.0.1:1", "--model-path", "x", "--quantize", "q4_1"])
    assert args.quantize == "q4_1"
    assert parser.parse_args(["--bootstrap", "127.0.0.1:1"]).quantize is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--bootstrap", "127.0.0.1:1", "--quantize", "q5_k"])


@pytest.mark.parametrize("module", ["client", "serve"])
def test_client_clis_parse_quantize_and_allow_mixed(module: str) -> None:
    import importlib

    from pymesh.cli.common import swarm_client_settings

    mod = importlib.import_module(f"pymesh.cli.{module}")
    parser = argparse.ArgumentParser()
    mod.add_arguments(parser)
    args = parser.parse_args(["--bootstrap", "127.0.0.1:1", "--model-path", "x", "--quantize", "q8_0",
                              "--allow-mixed"])
    assert args.quantize == "q8_0" and args.allow_mixed
    assert swarm_client_settings(args).client.allow_mixed
    plain = parser.parse_args(["--bootstrap", "127.0.0.1:1", "--model-path", "x"])
    assert plain.quantize is None and not swarm_client_settings(plain).client.allow_mixed


def test_a_gguf_files_blocks_count_in_its_own_format(tmp_path: Path) -> None:
    pytest.importorskip("gguf", reason="the gguf package is a runtime dependency; install pymesh")
    from pymesh.worker.runtime import block_bytes
    from tests.model.test_convert import N_HEAD, N_KV, random_weights
    from tests.model.tiny import write_tiny_gguf

    sizes = {}
    for qtype in ("F32", "Q4_0"):
        path = tmp_path / f"tiny.{qtype}.gguf"
        write_tiny_gguf(path, random_weights(tied=True), n_head=N_HEAD, n_head_kv=N_KV, qtype=qtype)
        sizes[qtype] = block_bytes(str(path), "float32")[0]
    assert 6.5 <= sizes["F32"] / sizes["Q4_0"] <= 7.2
