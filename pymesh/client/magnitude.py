"""Always-on magnitude check per span boundary (issue 12, item 4).

The client holds only the embeddings, the final norm and the head, so it judges what crosses
a span boundary, not single layers: the hidden states a hop returned at boundary ``b`` (the
block index where that hop's span ends). Every output that passed a spot check teaches the
guard the range of per-row RMS seen at its boundary; once ``min_learned`` checked steps were
seen there, a row whose RMS lies outside ``[min / FACTOR, max * FACTOR]`` is a problem.

``FACTOR`` is 4: honest rows of one boundary vary a lot with the token (SmolLM2's first
position carries a ~6x larger residual than the rest, docs/VERIFY_SPREAD.md), so the band is
wide; it catches gross faults (zeros, wrong scale, exploding values), and spot checks catch
the rest. Memory is bounded: a running (count, min, max) per boundary, at most
``max_boundaries`` of them (a model's block count is far below the default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FACTOR = 4.0
MIN_LEARNED = 2
MAX_BOUNDARIES = 4096


@dataclass
class _Range:
    steps: int
    low: float
    high: float


def row_rms(t: torch.Tensor) -> torch.Tensor:
    """float64 RMS of every row (last dimension) of ``t``, flattened to ``[rows]``."""
    if t.dim() == 0 or t.shape[-1] == 0:
        raise ValueError(f"hidden states need a non-empty last dimension, got shape {list(t.shape)}")
    x = t.detach().to(device="cpu", dtype=torch.float64).reshape(-1, t.shape[-1])
    return x.pow(2).mean(dim=1).sqrt()


class MagnitudeGuard:
    """Learns the per-row RMS range at each span boundary from checked outputs; flags outliers."""

    def __init__(self, factor: float = FACTOR, min_learned: int = MIN_LEARNED,
                 max_boundaries: int = MAX_BOUNDARIES) -> None:
        if not factor > 1.0 or not math.isfinite(factor):
            raise ValueError(f"the magnitude factor must be a finite number above 1, got {factor}")
        if min_learned < 1 or max_boundaries < 1:
            raise ValueError("min_learned and max_boundaries must be at least 1")
        self.factor = factor
        self.min_learned = min_learned
        self.max_boundaries = max_boundaries
        self._ranges: dict[int, _Range] = {}

    def learn(self, boundary: int, t: torch.Tensor) -> None:
        """Widen ``boundary``'s range with the rows of ``t``, an output that passed a check.

        Rows that are not finite or are all zero are ignored (they teach nothing about scale);
        a new boundary beyond ``max_boundaries`` is ignored too."""
        rms = row_rms(t)
        rms = rms[torch.isfinite(rms) & (rms > 0)]
        if rms.numel() == 0:
            return
        low, high = float(rms.min()), float(rms.max())
        r = self._ranges.get(boundary)
        if r is None:
            if len(self._ranges) >= self.max_boundaries:
                return
            self._ranges[boundary] = _Range(1, low, high)
            return
        r.steps += 1
        r.low = min(r.low, low)
        r.high = max(r.high, high)

    def learned(self, boundary: int) -> int:
        """How many checked steps taught ``boundary``'s range."""
        r = self._ranges.get(boundary)
        return r.steps if r else 0

    def band(self, boundary: int) -> tuple[float, float] | None:
        """The accepted per-row RMS ``(low, high)`` at ``boundary``, or None until enough was learned."""
        r = self._ranges.get(boundary)
        if r is None or r.steps < self.min_learned:
            return None
        return r.low / self.factor, r.high * self.factor

    def problem(self, boundary: int, t: torch.Tensor) -> str | None:
        """What is wrong with ``t``'s magnitude at ``boundary``, or None.

        Non-finite values are always a problem; the RMS band applies once ``min_learned``
        checked steps were learned at this boundary."""
        rms = row_rms(t)
        bad = ~torch.isfinite(rms)
        if bool(bad.any()):
            return f"row {int(bad.nonzero()[0])} at boundary {boundary} has non-finite values"
        b = self.band(boundary)
        if b is None or rms.numel() == 0:
            return None
        low, high = b
        out = (rms < low) | (rms > high)
        if not bool(out.any()):
            return None
        i = int(out.nonzero()[0])
        return (f"row {i} at boundary {boundary} has RMS {float(rms[i]):.4g}, outside the learned "
                f"range {low:.4g}..{high:.4g} (x{self.factor:g} around {self.learned(boundary)} checked steps)")
