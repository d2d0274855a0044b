"""How far two honest workers' outputs for one span may differ, and the comparison itself.

A spot check re-runs a hop's span on a second worker and compares the two outputs row by row
(one row per position): the relative L2 error ``||out - ref|| / ||ref||`` of every row, the
check failing when the worst row exceeds :func:`tolerance`. Honest workers never agree bit
for bit: the checked worker ran prefill plus one-token decode steps (the C++ decode path),
the checker one chunk over all positions; thread counts and dtypes differ too. The bounds
below come from ``bench/verify_spread.py`` (table and command in docs/VERIFY_SPREAD.md):

- float32 against float32 on CPU (decode path against one chunk, 1 or 2 threads): worst row
  4.4e-6 on SmolLM2-135M, 1.8e-6 on a random tiny model; allowed 1e-3 (>200x).
- a pair with a 16-bit side: bf16 against fp32 is heavy-tailed (a few tokens in SmolLM2's
  early blocks amplify rounding): worst rows 0.035 (1 block), 0.074 (4), 0.087 (8), 0.13 (15),
  0.094 (30), p99 0.006-0.065; bf16 against bf16 at most 0.041. Allowed
  ``0.08 + 0.035 * log2(blocks)``, at most 0.25: 1.6x to 2.7x over the worst measured row.
- The test workers' corruption (Gaussian noise of 0.5 x the step's output RMS) gives a
  corrupted step a worst row of at least 0.36 (hidden size 64; 0.45 at SmolLM2's 576), so it
  fails the loosest bound (0.25) by 1.4x-1.8x, and the float32 bound by 360x.

float32 with a non-CPU side was not measured (no GPU in that run): it gets 0.02, twenty
times the CPU bound, still far below the noise. float16 is not measured either and gets the
bfloat16 bound (it has more mantissa bits). Rows that are not finite never pass; a zero
reference row passes only when the output row is zero too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: dtype spellings -> the precision class that sets the bound
_FULL = frozenset({"float32", "fp32", "torch.float32", "float64", "fp64", "torch.float64"})
_HALF = frozenset({"bfloat16", "bf16", "torch.bfloat16", "float16", "fp16", "half", "torch.float16"})

#: float32 pair, both on CPU: measured worst row grows from 2.6e-7 to 4.4e-6 with span length;
#: one ceiling for every length keeps >200x room for other CPUs and larger models
FP32_TOLERANCE = 1e-3
#: float32 pair with a non-CPU side (unmeasured: other kernels, maybe TF32)
FP32_DEVICE_TOLERANCE = 0.02
#: a pair with a 16-bit side: bound at one block and its growth per doubling of the span
HALF_TOLERANCE_BASE = 0.08
HALF_TOLERANCE_PER_LOG2_BLOCK = 0.035
HALF_TOLERANCE_MAX = 0.25
#: the corruption the test workers add, relative to a row's norm (for documentation and tests)
NOISE_RELATIVE_ERROR = 0.5


@dataclass(frozen=True)
class Comparison:
    """Outcome of comparing one span's output with the checker's: ``ok`` when within ``tolerance``."""

    ok: bool
    error: float        # the worst row's relative L2 error (inf when a row is not finite)
    tolerance: float
    worst_row: int      # index of that row in the flattened [batch*seq] rows


def _precision(dtype: str) -> str:
    d = dtype.strip().lower()
    if d in _FULL:
        return "full"
    if d in _HALF:
        return "half"
    raise ValueError(f"unknown dtype {dtype!r} for a tolerance; use float32, bfloat16 or float16")


def tolerance(dtype_a: str, dtype_b: str, blocks: int, device_a: str = "cpu", device_b: str = "cpu") -> float:
    """The largest worst-row relative error accepted between honest outputs of a ``blocks``-block span.

    Symmetric in the two sides. ValueError for an unknown dtype or ``blocks < 1``.
    """
    if blocks < 1:
        raise ValueError(f"a span has at least one block, got {blocks}")
    precisions = {_precision(dtype_a), _precision(dtype_b)}
    on_cpu = device_a.strip().lower().startswith("cpu") and device_b.strip().lower().startswith("cpu")
    if precisions == {"full"}:
        return FP32_TOLERANCE if on_cpu else FP32_DEVICE_TOLERANCE
    grown = HALF_TOLERANCE_BASE + HALF_TOLERANCE_PER_LOG2_BLOCK * math.log2(blocks)
    return min(grown, HALF_TOLERANCE_MAX)


def row_errors(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Relative L2 error of every position row, float64 ``[batch*seq]``.

    Rows are the last dimension. A zero reference row gives 0 when ``out``'s row is zero too,
    inf otherwise; a row with a non-finite value in either tensor gives inf.
    ValueError when the shapes differ.
    """
    if out.shape != ref.shape:
        raise ValueError(f"outputs to compare have different shapes: {list(out.shape)} and {list(ref.shape)}")
    if out.dim() == 0:
        raise ValueError("outputs to compare must have at least one dimension (the hidden size)")
    width = out.shape[-1]
    o = out.detach().to(device="cpu", dtype=torch.float64).reshape(-1, width)
    r = ref.detach().to(device="cpu", dtype=torch.float64).reshape(-1, width)
    finite = torch.isfinite(o).all(dim=1) & torch.isfinite(r).all(dim=1)
    o = torch.where(finite[:, None], o, torch.zeros_like(o))
    r = torch.where(finite[:, None], r, torch.zeros_like(r))
    diff = torch.linalg.vector_norm(o - r, dim=1)
    norm = torch.linalg.vector_norm(r, dim=1)
    inf = torch.full_like(diff, math.inf)
    err = torch.where(norm > 0, diff / torch.where(norm > 0, norm, torch.ones_like(norm)),
                      torch.where(diff > 0, inf, torch.zeros_like(diff)))
    return torch.where(finite, err, inf)


def compare(out: torch.Tensor, ref: torch.Tensor, dtype_a: str, dtype_b: str, blocks: int,
            device_a: str = "cpu", device_b: str = "cpu") -> Comparison:
    """Compare a checked worker's output ``out`` (``dtype_a`` on ``device_a``) with a checker's ``ref``.

    Never ``ok`` when a row is not finite or the tensors are empty. ValueError on a shape mismatch.
    """
    tol = tolerance(dtype_a, dtype_b, blocks, device_a, device_b)
    errors = row_errors(out, ref)
    if errors.numel() == 0:
        return Comparison(ok=False, error=math.inf, tolerance=tol, worst_row=-1)
    worst = int(torch.argmax(errors).item())
    error = float(errors[worst].item())
    return Comparison(ok=error <= tol, error=error, tolerance=tol, worst_row=worst)
