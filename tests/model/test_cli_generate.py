"""``pymesh generate`` and ``pymesh bench generate`` end to end on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pymesh.cli.main import main
from pymesh.model.generate import generate
from pymesh.model.sampling import SamplingParams
from pymesh.model.tokenizer import load_tokenizer
from tests.model.tiny import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("cli"), "llama")


@pytest.mark.timeout(120)
def test_generate_json_matches_library(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model-path", str(tiny), "--prompt", "Hello there", "--max-tokens", "6",
                 "--json", "--threads", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"tokens", "text", "prompt_tokens", "prefill_s", "decode_tokens_per_s"}
    tok = load_tokenizer(tiny)
    assert out["prompt_tokens"] == len(tok.encode("Hello there"))
    expected = list(generate(tiny, "Hello there", params=SamplingParams(max_new_tokens=6)))
    assert out["tokens"] == expected and 1 <= len(expected) <= 6
    assert out["text"] == tok.decode(expected)
    assert out["prefill_s"] > 0 and out["decode_tokens_per_s"] >= 0


@pytest.mark.timeout(120)
def test_generate_streams_text_and_honours_stop(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model-path", str(tiny), "--prompt", "Hi", "--max-tokens", "12",
                 "--temperature", "0.8", "--seed", "3", "--threads", "1"]) == 0
    streamed = capsys.readouterr().out
    assert main(["generate", "--model-path", str(tiny), "--prompt", "Hi", "--max-tokens", "12",
                 "--temperature", "0.8", "--seed", "3", "--threads", "1", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert streamed == summary["text"] + "\n"  # same seed: same tokens, streamed == decoded
    text = summary["text"]
    if len(text) >= 4:  # stop on a piece of what it would generate: output ends before it
        stop = text[len(text) // 2:len(text) // 2 + 2]
        assert main(["generate", "--model-path", str(tiny), "--prompt", "Hi", "--max-tokens", "12",
                     "--temperature", "0.8", "--seed", "3", "--threads", "1", "--stop", stop]) == 0
        out = capsys.readouterr().out
        assert stop not in out and text.startswith(out.rstrip("\n"))


def test_generate_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model-path", str(tmp_path), "--prompt", "x"]) == 1
    assert "error" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_bench_generate_json_schema(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "generate", "--json", "--model-path", str(tiny), "--new-tokens", "4",
                 "--repeats", "1", "--threads", "1"]) == 0
    rows = json.loads(capsys.readouterr().out)
    floats, quants = ("float32", "bfloat16"), ("q8_0", "q4_1")
    assert {(r["engine"], r["dtype"]) for r in rows} == {
        (e, d) for e in ("pymesh", "ceiling") for d in floats + quants} | {("transformers", d) for d in floats}
    for r in rows:
        assert set(r) == {"engine", "dtype", "weights", "decode_tokens_per_s", "prefill_s", "weight_bytes_per_token"}
        assert r["decode_tokens_per_s"] > 0
        assert (r["prefill_s"] is None) == (r["engine"] == "ceiling")
        if r["engine"] == "pymesh":
            assert r["weights"] == ("float folder" if r["dtype"] in floats else "quantized at load")
    read = {r["dtype"]: r["weight_bytes_per_token"] for r in rows if r["engine"] == "pymesh"}
    # 4-bit blocks read fewer bytes than 8-bit ones, which read fewer than bf16, than fp32
    assert read["q4_1"] < read["q8_0"] < read["bfloat16"] < read["float32"]


def test_generate_ids_stops_on_eos_and_max_tokens(tiny: Path) -> None:
    from pymesh.model.generate import LocalModel

    model = LocalModel.load(tiny)
    free = list(model.generate_ids([1, 2, 3], SamplingParams(max_new_tokens=5), eos_ids=[]))
    assert len(free) == 5
    # with the third greedy token declared EOS, generation yields it and stops
    assert list(model.generate_ids([1, 2, 3], SamplingParams(max_new_tokens=5), eos_ids=[free[2]])) == \
        free[: free.index(free[2]) + 1]
    assert list(model.generate_ids([1, 2, 3], SamplingParams(max_new_tokens=0))) == []
    calls: list[list[int]] = []
    stopped = list(model.generate_ids([1, 2, 3], SamplingParams(max_new_tokens=5), eos_ids=[],
                                      stop_check=lambda g: calls.append(list(g)) or len(g) == 2))
    assert stopped == free[:2] and calls == [free[:1], free[:2]]


def test_generate_names_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model-path", str(tmp_path / "nope"), "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert "nope does not exist" in err
