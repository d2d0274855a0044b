"""What several subcommands share: the settings ``main`` read, device checks, flag overrides.

``pymesh.cli.main`` reads the environment once (:func:`pymesh.settings.load_settings`) and
puts the result on the parsed arguments as ``args.settings``; subcommands take their parts
from there (:func:`settings_of`) and let their flags override them. Imports nothing heavy.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from pymesh.errors import ConfigError
from pymesh.settings import Settings


def settings_of(args: argparse.Namespace) -> Settings:
    """The settings ``main`` attached to ``args`` (defaults for a namespace built elsewhere)."""
    settings = getattr(args, "settings", None)
    return settings if isinstance(settings, Settings) else Settings()


def threads_of(args: argparse.Namespace, settings: Settings) -> int | None:
    """``--threads`` if given, else ``PYMESH_THREADS`` (None: the caller's default)."""
    threads = getattr(args, "threads", None)
    return threads if threads is not None else settings.runtime.threads


def with_flags(settings: Settings, *, threads: int | None = None, max_blocks: int | None = None) -> Settings:
    """``settings`` with the flags that override a ``PYMESH_*`` value applied (None: unchanged)."""
    runtime, worker = settings.runtime, settings.worker
    if threads is not None:
        runtime = dataclasses.replace(runtime, threads=threads)
    if max_blocks is not None:
        worker = dataclasses.replace(worker, max_blocks=max_blocks)
    return dataclasses.replace(settings, runtime=runtime, worker=worker)


def apply_runtime_switches(settings: Settings) -> None:
    """Set the model's process-wide switches (pymesh.model.switches) from the settings."""
    from pymesh.model.switches import set_switches

    set_switches(require_c=settings.runtime.require_c, fast_decode=settings.runtime.fast_decode)


def check_device(device: str) -> None:
    """ConfigError (one line) for a device this machine does not have."""
    if device == "cpu":
        return
    if not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"--device {device!r} is not a device pymesh runs on; use cpu, cuda or cuda:N")
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this machine has no usable CUDA GPU (torch {torch.__version__}); "
                          "use --device cpu")
    index = int(device[5:]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")


def accepted_kwargs(target: object, **kwargs: object) -> dict[str, Any]:
    """Those ``kwargs`` that ``target``'s signature names.

    The roles adopt ``settings=`` one at a time (WorkerOptions, Swarm, SwarmClient); until a
    constructor has the parameter the CLI leaves it out rather than failing.
    """
    import inspect

    try:
        params = inspect.signature(target).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return {}
    return {k: v for k, v in kwargs.items() if k in params}
