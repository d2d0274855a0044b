"""Shared test set-up: thread limits, the repository root on sys.path, model fixtures.

Fixtures:
- ``smollm2_dir``: SmolLM2-135M-Instruct converted to a float32 Hugging Face folder, cached
  under ``$PYMESH_CACHE`` (default ``~/.cache/pymesh``) across runs.
- ``smollm2_dir_bf16``: the same in bfloat16.
- ``smollm2_gguf``: the original Q4_1 GGUF file.
Tiny random models: ``from tests.model.tiny import make_tiny_model``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Several test processes share two cores: no spinning, explicit thread counts.
TEST_THREADS = int(os.environ.get("PYMESH_TEST_THREADS", "2"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", str(TEST_THREADS))
os.environ.setdefault("MKL_NUM_THREADS", str(TEST_THREADS))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Keys and the client's blocklist (`pymesh client` / `serve` write convictions there) live under
# PYMESH_HOME: this process and every child it starts use a throwaway one, never the real ~/.pymesh.
import atexit as _atexit  # noqa: E402
import shutil as _shutil  # noqa: E402
import tempfile as _tempfile  # noqa: E402

os.environ["PYMESH_HOME"] = _tempfile.mkdtemp(prefix="pymesh-test-home-")
_atexit.register(_shutil.rmtree, os.environ["PYMESH_HOME"], True)

# The test command exports PYMESH_REQUIRE_C=1 (a missing _C must fail the kernel tests): the
# model's process-wide switches come from the environment here, as the CLI sets them in its processes.
from pymesh.settings import load_settings as _load_settings  # noqa: E402

SETTINGS = _load_settings()
from pymesh.model.switches import set_switches as _set_switches  # noqa: E402

_set_switches(require_c=SETTINGS.runtime.require_c, fast_decode=SETTINGS.runtime.fast_decode)

try:  # bounded property tests, no per-example deadline (the CPU is shared and contended)
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile(
        "pymesh", deadline=None, max_examples=int(os.environ.get("PYMESH_HYPOTHESIS_EXAMPLES", "100"))
    )
    _hyp_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "pymesh"))
except ImportError:  # pragma: no cover - hypothesis is a test extra
    pass


@pytest.fixture(autouse=True, scope="session")
def _torch_threads() -> None:
    """Pin torch's intra-op threads when a test module imported torch."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(TEST_THREADS)


def _pull(dtype: str) -> Path:
    from pymesh.errors import PymeshError
    from pymesh.model.pull import pull_default_model

    try:
        return pull_default_model(progress=False, dtype=dtype, root=SETTINGS.runtime.cache_root(),
                                  gguf=SETTINGS.runtime.smollm2_gguf)
    except PymeshError as exc:
        if "could not download" in str(exc):
            pytest.skip(f"SmolLM2 is not cached and cannot be downloaded: {exc}")
        raise


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return _pull("float32")


@pytest.fixture(scope="session")
def smollm2_dir_bf16() -> Path:
    return _pull("bfloat16")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from pymesh.errors import PymeshError
    from pymesh.model.pull import default_gguf

    try:
        return default_gguf(progress=False, root=SETTINGS.runtime.cache_root(),
                            override=SETTINGS.runtime.smollm2_gguf)
    except PymeshError as exc:
        if "could not download" in str(exc):
            pytest.skip(f"the SmolLM2 GGUF is not cached and cannot be downloaded: {exc}")
        raise


@pytest.fixture(autouse=True)
def _restore_logging():  # type: ignore[no-untyped-def]
    """CLI entry points run in-process by some tests set logger levels and handlers
    (as the CLI is meant to); undo that so later tests' log capture sees everything."""
    import logging

    root = logging.getLogger()
    saved_root = (root.level, list(root.handlers))
    saved = {name: lg.level for name, lg in logging.root.manager.loggerDict.items()
             if isinstance(lg, logging.Logger)}
    yield
    root.setLevel(saved_root[0])
    root.handlers[:] = saved_root[1]
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if isinstance(lg, logging.Logger):
            lg.setLevel(saved.get(name, logging.NOTSET))
