"""The error for tensors that arrive at run time with a shape the model cannot take."""

from __future__ import annotations

from pymesh.errors import PymeshError


class ShapeError(PymeshError, ValueError):
    """Hidden states, token ids or positions do not fit the span, head or KV cache they were
    given to: the caller's (or a peer's) mistake at run time, not a configuration problem."""
