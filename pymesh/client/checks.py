"""Checks of what workers send back before the client uses it.

A hop's output must have the step's input shape ``[batch, seq, hidden]`` and dtype, and only
finite values: anything else cannot be a transformer block's output, and would crash the
head (an ``IndexError`` on a wrong shape) or poison the sampler. The session bans the hop
that sent it, for a wrong answer.
"""

from __future__ import annotations

from pymesh.proto.frames import TensorBlob


def output_problem_untrusted(blob: TensorBlob, dtype: str, shape: tuple[int, ...]) -> str | None:
    """Why ``blob`` cannot be the output of a step whose input had ``dtype`` and ``shape``
    (None: it can)."""
    import torch

    from pymesh.model.blobs import blob_to_tensor

    if blob.dtype != dtype:
        return f"output dtype {blob.dtype} instead of the input's {dtype}"
    if tuple(blob.shape) != tuple(shape):
        return (f"output shape {list(blob.shape)} instead of the input's {list(shape)} "
                "([batch, seq, hidden])")
    t = blob_to_tensor(blob)
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        return "output holds non-finite values (NaN or infinity)"
    return None
