"""Torch <-> :class:`pymesh.proto.frames.TensorBlob` without copies where the memory allows it.

``tensor_to_blob`` hands the transport a byte view of a contiguous CPU tensor's own
storage (bfloat16 goes through a uint8 view, numpy has no bfloat16). ``blob_to_tensor``
wraps the received buffer with ``torch.frombuffer``; for a CUDA destination the bytes
are staged through pinned host memory and copied asynchronously.
"""

from __future__ import annotations

import sys

import torch

from pymesh.proto.frames import TensorBlob

_TO_NAME: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.int16: "int16",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.bool: "bool",
}
_FROM_NAME: dict[str, torch.dtype] = {v: k for k, v in _TO_NAME.items()}

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("pymesh.model.blobs assumes a little-endian host")


def tensor_to_blob(t: torch.Tensor) -> TensorBlob:
    """Zero-copy byte view of a CPU tensor (a contiguous copy is made only if it is not)."""
    if t.dtype not in _TO_NAME:
        raise ValueError(f"tensor dtype {t.dtype} cannot be sent; use one of {sorted(_FROM_NAME)}")
    if t.device.type != "cpu":
        t = t.to("cpu")
    if not t.is_contiguous():
        t = t.contiguous()
    shape = tuple(t.shape)
    if t.numel() == 0:
        return TensorBlob(_TO_NAME[t.dtype], shape, memoryview(b""))
    flat = t.reshape(-1)
    if t.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    data = memoryview(flat.view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]
    return TensorBlob(_TO_NAME[t.dtype], shape, data)


def pinned_allocator(nbytes: int) -> memoryview:
    """Receive buffers in pinned (page-locked) host memory, for ``RpcNode.allocator`` on a
    CUDA host: ``blob_to_tensor(b, "cuda")`` then copies them to the GPU asynchronously.

    Pinned memory is committed at once, so the transport charges each tensor's whole
    announced size to ``TransportConfig.max_inflight_per_node`` before calling this (the
    default, no allocator, commits memory only as bytes arrive)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    return memoryview(host.numpy())  # type: ignore[arg-type]  # the array keeps `host` alive


def blob_to_tensor(b: TensorBlob, device: str | torch.device = "cpu") -> torch.Tensor:
    """The blob's bytes as a tensor; on CPU it shares the received buffer (no copy)."""
    dtype = _FROM_NAME[b.dtype]
    if b.nbytes == 0:
        return torch.empty(b.shape, dtype=dtype, device=device)
    if b.data.readonly:
        raw = torch.frombuffer(bytearray(b.data), dtype=torch.uint8)
    else:
        raw = torch.frombuffer(b.data, dtype=torch.uint8)
    t = raw.view(dtype).reshape(b.shape)
    dev = torch.device(device)
    if dev.type == "cpu":
        return t
    if dev.type == "cuda":
        if t.is_pinned():  # received with pinned_allocator
            return t.to(dev, non_blocking=True)
        pinned = torch.empty(t.shape, dtype=dtype, pin_memory=True)
        pinned.copy_(t)
        return pinned.to(dev, non_blocking=True)
    return t.to(dev)
