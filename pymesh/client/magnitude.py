"""Always-on magnitude check per span boundary (issue 12, item 4).

The client holds only the embeddings, the final norm and the head, so it judges what crosses
a span boundary, not single layers: the hidden states a hop returned at boundary ``b`` (the
block index where that hop's span ends). Every output that passed a spot check teaches the
guard the range of per-row RMS seen at its boundary; once enough checked steps were seen
there (see :class:`MagnitudeGuard`), a row whose RMS lies outside ``[min / FACTOR, max * FACTOR]``
is a problem.

``FACTOR`` is 4: on SmolLM2, rows past position 0 of another text fell within x2.2 of a
range learned from one prefill and one decode step (docs/VERIFY_SPREAD.md). The band catches
gross faults (zeros, a wrong scale, exploding values); the test workers' 0.5-RMS noise raises a
row's RMS by only ~12%, so catching it is the spot checks' job. Memory is bounded: a running (count, min, max) per boundary, at most
``max_boundaries`` of them (a model's block count is far below the default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FACTOR = 4.0
MIN_STEPS = 2
MIN_ROWS = 16
MAX_BOUNDARIES = 4096


@dataclass
class _Range:
    steps: int = 0
    rows: int = 0
    low: float = math.inf
    high: float = 0.0

    def add(self, rms: torch.Tensor) -> None:
        rms = rms[torch.isfinite(rms) & (rms > 0)]
        if rms.numel() == 0:
            return
        self.steps += 1
        self.rows += int(rms.numel())
        self.low = min(self.low, float(rms.min()))
        self.high = max(self.high, float(rms.max()))


def row_rms(t: torch.Tensor) -> torch.Tensor:
    """float64 RMS of every row (last dimension) of ``t``, flattened to ``[rows]``."""
    if t.dim() == 0 or t.shape[-1] == 0:
        raise ValueError(f"hidden states need a non-empty last dimension, got shape {list(t.shape)}")
    x = t.detach().to(device="cpu", dtype=torch.float64).reshape(-1, t.shape[-1])
    return x.pow(2).mean(dim=1).sqrt()


def _split(t: torch.Tensor, pos: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMS of the rows at position 0, RMS of the other rows); ``pos`` is ``t``'s first position."""
    if pos != 0 or t.dim() < 3:
        return torch.empty(0, dtype=torch.float64), row_rms(t)
    return row_rms(t[..., :1, :]), row_rms(t[..., 1:, :])


class MagnitudeGuard:
    """Learns the per-row RMS range at each span boundary from checked outputs; flags outliers.

    Rows at position 0 (known when the caller passes ``pos=0`` with ``[batch, seq, hidden]``
    tensors) keep a range of their own: most models park a far larger residual there (an
    attention sink; SmolLM2's first row is 6x to 150x the others by boundary), and a band
    wide enough for both would catch nothing. A range judges only after ``min_steps`` checked
    steps and ``min_rows`` rows taught it (position-0 ranges: ``min_steps`` steps), since two
    single decode rows span too little (measured: rows of another text needed x5.5; after a
    prefill, x2.2).
    """

    def __init__(self, factor: float = FACTOR, min_steps: int = MIN_STEPS, min_rows: int = MIN_ROWS,
                 max_boundaries: int = MAX_BOUNDARIES) -> None:
        if not factor > 1.0 or not math.isfinite(factor):
            raise ValueError(f"the magnitude factor must be a finite number above 1, got {factor}")
        if min_steps < 1 or min_rows < 1 or max_boundaries < 1:
            raise ValueError("min_steps, min_rows and max_boundaries must be at least 1")
        self.factor = factor
        self.min_steps = min_steps
        self.min_rows = min_rows
        self.max_boundaries = max_boundaries
        self._ranges: dict[int, tuple[_Range, _Range]] = {}  # boundary -> (position 0, others)

    def learn(self, boundary: int, t: torch.Tensor, *, pos: int | None = None) -> None:
        """Widen ``boundary``'s ranges with the rows of ``t``, an output that passed a check.

        ``pos``: the position of ``t``'s first row (``[batch, seq, hidden]``), None if unknown.
        Rows that are not finite or all zero teach nothing; a new boundary beyond
        ``max_boundaries`` is ignored."""
        first, rest = _split(t, pos)
        ranges = self._ranges.get(boundary)
        if ranges is None:
            if len(self._ranges) >= self.max_boundaries:
                return
            ranges = self._ranges[boundary] = (_Range(), _Range())
        ranges[0].add(first)
        ranges[1].add(rest)

    def learned(self, boundary: int) -> int:
        """How many checked steps taught ``boundary``'s range of rows past position 0."""
        r = self._ranges.get(boundary)
        return r[1].steps if r else 0

    def band(self, boundary: int, *, first: bool = False) -> tuple[float, float] | None:
        """The accepted per-row RMS ``(low, high)`` at ``boundary`` (``first``: of position-0
        rows), or None until enough was learned."""
        ranges = self._ranges.get(boundary)
        if ranges is None:
            return None
        r = ranges[0] if first else ranges[1]
        if r.steps < self.min_steps or (not first and r.rows < self.min_rows):
            return None
        return r.low / self.factor, r.high * self.factor

    def problem(self, boundary: int, t: torch.Tensor, *, pos: int | None = None) -> str | None:
        """What is wrong with ``t``'s magnitude at ``boundary``, or None.

        Non-finite values are always a problem; a row's RMS outside its learned band is one
        once that band is learned (``pos`` as in :meth:`learn`)."""
        rms = row_rms(t)
        bad = ~torch.isfinite(rms)
        if bool(bad.any()):
            return f"row {int(bad.nonzero()[0])} at boundary {boundary} has non-finite values"
        first, rest = _split(t, pos)
        for is_first, values in ((True, first), (False, rest)):
            band = self.band(boundary, first=is_first)
            if band is None or values.numel() == 0:
                continue
            low, high = band
            out = (values < low) | (values > high)
            if bool(out.any()):
                i = int(out.nonzero()[0])
                where = "the position-0 row" if is_first else f"row {i}{' after position 0' if pos == 0 else ''}"
                return (f"{where} at boundary {boundary} has RMS {float(values[i]):.4g}, outside the learned "
                        f"range {low:.4g}..{high:.4g} (x{self.factor:g} around the checked steps)")
        return None
