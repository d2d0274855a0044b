"""User mistakes at the CLI: each ends in bounded time with a non-zero exit, one
``pymesh <cmd>: error: ...`` line that names what is wrong, and no traceback."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from tests.e2e.helpers import error_line, pymesh_run
from tests.swarm.conftest import free_port

pytestmark = [pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("e2e-tiny-err"), num_hidden_layers=2, name="e2eerr", seed=2)


def _variant(tiny: Path, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    shutil.copytree(tiny, out)
    return out


def _fails(*args: str, timeout: float = 120) -> str:
    t0 = time.monotonic()
    res = pymesh_run(*args, timeout=timeout)
    assert res.returncode != 0, f"pymesh {' '.join(args)} succeeded:\n{res.stdout[-2000:]}"
    assert "Traceback" not in res.stderr, res.stderr[-4000:]
    assert time.monotonic() - t0 < timeout
    return error_line(res.stderr)


def test_folder_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("not a model")
    line = _fails("generate", "--model-path", str(tmp_path), "--prompt", "hi", "--max-tokens", "2")
    assert str(tmp_path) in line


def test_model_path_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    line = _fails("generate", "--model-path", str(missing), "--prompt", "hi", "--max-tokens", "2")
    assert "not exist" in line or "no such" in line.lower() or "not found" in line.lower(), line


def test_missing_tensor(tiny: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    bad = _variant(tiny, tmp_path, "missing-tensor")
    weights = load_file(str(bad / "model.safetensors"))
    name = next(k for k in weights if "layers.1.mlp.down_proj" in k)
    del weights[name]
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    line = _fails("generate", "--model-path", str(bad), "--prompt", "hi", "--max-tokens", "2")
    assert name in line


def test_unsupported_model_type(tiny: Path, tmp_path: Path) -> None:
    bad = _variant(tiny, tmp_path, "gpt2")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    for cmd in (["generate"], ["client", "--bootstrap", "127.0.0.1:9"]):
        line = _fails(*cmd, "--model-path", str(bad), "--prompt", "hi", "--max-tokens", "2")
        assert "gpt2" in line and "model_type" in line, line


def test_worker_rejects_layers_that_do_not_exist(tiny: Path) -> None:
    line = _fails("worker", "--bootstrap", f"127.0.0.1:{free_port()}", "--model-path", str(tiny),
                  "--layers", "1-5", "--host", "127.0.0.1", "--port", "0")
    assert "5" in line and ("0-1" in line or "2 layers" in line or "2 blocks" in line), line


def test_chain_naming_layers_that_do_not_exist(tiny: Path) -> None:
    t0 = time.monotonic()
    line = _fails("client", "--bootstrap", f"127.0.0.1:{free_port()}", "--model-path", str(tiny),
                  "--prompt", "hi", "--chain", ",".join(str(i) for i in range(24)))
    assert "2-23" in line and "0-1" in line, line
    assert time.monotonic() - t0 < 60, "a chain naming missing layers should fail at once"


def test_bootstrap_nobody_listens_on(tiny: Path) -> None:
    line = _fails("client", "--bootstrap", f"127.0.0.1:{free_port()}", "--model-path", str(tiny),
                  "--prompt", "hi", "--max-tokens", "2", timeout=150)
    assert line


@pytest.mark.parametrize("addr", [
    "127.0.0.1:99999", "127.0.0.1", "/ip4/127.0.0.1/udp", "/ip4/127.0.0.1/udp/9000/p2p/notapeerid",
    "/ip4/1.2.3/udp/9000",
])
def test_malformed_bootstrap_address(tiny: Path, addr: str) -> None:
    t0 = time.monotonic()
    line = _fails("client", "--bootstrap", addr, "--model-path", str(tiny), "--prompt", "hi", "--max-tokens", "2")
    assert addr in line or "address" in line or "peer ID" in line, line
    assert time.monotonic() - t0 < 60, "a malformed address should be refused before any network work"


def test_sampling_flags_out_of_range(tiny: Path) -> None:
    for flags in (["--temperature", "-1"], ["--top-p", "1.5"], ["--top-k", "-3"]):
        line = _fails("generate", "--model-path", str(tiny), "--prompt", "hi", *flags)
        assert flags[0].lstrip("-").split("-")[0] in line, (flags, line)


@pytest.mark.parametrize("cmd", [
    "generate",
    "worker",
])
def test_device_not_available(tiny: Path, cmd: str) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is not a mistake here")
    extra = (["--prompt", "hi", "--max-tokens", "2"] if cmd == "generate" else
             ["--bootstrap", f"127.0.0.1:{free_port()}", "--layers", "0-1", "--host", "127.0.0.1", "--port", "0"])
    line = _fails(cmd, "--model-path", str(tiny), "--device", "cuda", *extra)
    assert "cuda" in line.lower(), line


def test_negative_cache_budget_is_refused(tiny: Path) -> None:
    line = _fails("worker", "--bootstrap", f"127.0.0.1:{free_port()}", "--model-path", str(tiny), "--layers", "0-1",
                  "--host", "127.0.0.1", "--port", "0", "--cache-tokens", "-5", timeout=30)
    assert "cache" in line, line
