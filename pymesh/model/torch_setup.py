"""The one place that turns user spellings into torch dtypes and sets torch's thread count."""

from __future__ import annotations

import os

import torch

from pymesh.errors import ConfigError

#: accepted spellings (flags, the Python API) -> torch dtype
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"bf16"`` / a ``torch.dtype`` -> ``torch.dtype`` (ConfigError otherwise)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ConfigError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ConfigError(f"--dtype {dtype!r} is not supported; use float32, bfloat16 or float16 "
                          "(or fp32, bf16, fp16)") from None


def available_cores() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_threads(shared: bool) -> int:
    """Half the cores for processes that share a machine (workers, clients), all for one alone.

    Measured on a loaded 2-core machine (SmolLM2 decode, one process): 1 thread 16 tok/s,
    2 threads 1.4 tok/s -- a thread that waits for a descheduled sibling stalls every matrix
    product, so processes sharing a machine must not each claim every core.
    """
    cores = available_cores()
    return max(1, cores // 2) if shared else cores


def configure_threads(threads: int | None, *, shared: bool = True) -> int:
    """Set torch's intra-op thread count before the first forward pass; returns it.

    ``threads`` None means :func:`default_threads`. ``OMP_WAIT_POLICY`` must already be
    set in the environment by the CLI (it is read when torch loads its OpenMP runtime).
    """
    if threads is None:
        threads = default_threads(shared)
    if threads < 1:
        raise ConfigError(f"--threads {threads} must be >= 1")
    torch.set_num_threads(threads)
    return threads
