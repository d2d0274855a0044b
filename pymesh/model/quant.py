"""Quantized weight matrices kept in GGUF's block formats (Q8_0, Q4_0, Q4_1).

A :class:`QTensor` is a weight ``[out, in]`` stored as ``out`` rows of ``in / 32`` blocks,
byte for byte as a GGUF file stores them, so a memory-mapped file needs no conversion.
One block covers 32 consecutive input features of one output row:

=======  =====  ====================================================================
type     bytes  layout (little endian)
=======  =====  ====================================================================
q8_0     34     fp16 ``d``; int8 ``q[32]``.                 value = ``d * q[i]``
q4_0     18     fp16 ``d``; ``qs[16]``: element i < 16 is the low nibble of qs[i],
                element 16 + i the high nibble.              value = ``d * (q - 8)``
q4_1     20     fp16 ``d``; fp16 ``m``; ``qs[16]`` as q4_0.   value = ``d * q + m``
=======  =====  ====================================================================

:meth:`QTensor.dequantize` is the pure-torch reference every kernel is tested against;
:func:`quantize` computes the same blocks llama.cpp's reference quantizer does (through the
``gguf`` package), for ``--quantize`` on float folders.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch

from pymesh.errors import ConfigError
from pymesh.proto.records import QUANT_LABELS

log = logging.getLogger(__name__)

BLOCK = 32  # input features per block, every type here


@dataclass(frozen=True)
class QFormat:
    name: str
    ggml_type: int      # GGMLQuantizationType value in GGUF files
    block_bytes: int
    code: int           # the kernels' type code (csrc)


FORMATS: dict[str, QFormat] = {
    "q8_0": QFormat("q8_0", 8, 34, 0),
    "q4_0": QFormat("q4_0", 2, 18, 1),
    "q4_1": QFormat("q4_1", 3, 20, 2),
}
BY_GGML_TYPE = {f.ggml_type: f for f in FORMATS.values()}
# the formats a model id may name (records.QUANT_LABELS, the one list) are those computed here
assert tuple(FORMATS) == QUANT_LABELS, "pymesh.proto.records.QUANT_LABELS must list exactly FORMATS"


def qformat(name: str) -> QFormat:
    """The format called ``name``; ConfigError naming the supported ones otherwise."""
    fmt = FORMATS.get(name.lower())
    if fmt is None:
        raise ConfigError(f"unsupported quantization {name!r}; pymesh computes on {', '.join(FORMATS)}")
    return fmt


class QTensor:
    """A quantized ``[out_features, in_features]`` weight: ``data`` is uint8
    ``[out_features, in_features // 32 * block_bytes]``, row-major, one row per output feature."""

    __slots__ = ("fmt", "shape", "data")

    def __init__(self, qtype: str | QFormat, shape: Sequence[int], data: torch.Tensor) -> None:
        fmt = qtype if isinstance(qtype, QFormat) else qformat(qtype)
        if len(shape) != 2:
            raise ConfigError(f"a quantized weight is a matrix; got shape {tuple(shape)}")
        out_f, in_f = int(shape[0]), int(shape[1])
        if in_f <= 0 or in_f % BLOCK:
            raise ConfigError(f"{fmt.name} needs in_features to be a positive multiple of {BLOCK}, got {in_f}")
        row_bytes = in_f // BLOCK * fmt.block_bytes
        if data.dtype != torch.uint8 or tuple(data.shape) != (out_f, row_bytes):
            raise ConfigError(f"{fmt.name} weight of shape ({out_f}, {in_f}) needs uint8 data of shape "
                              f"({out_f}, {row_bytes}), got {data.dtype} {tuple(data.shape)}")
        self.fmt = fmt
        self.shape = (out_f, in_f)
        self.data = data

    @property
    def qtype(self) -> str:
        return self.fmt.name

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def is_cpu(self) -> bool:
        return bool(self.data.is_cpu)

    def nbytes(self) -> int:
        return int(self.data.numel())

    def is_contiguous(self) -> bool:
        return bool(self.data.is_contiguous())

    def data_ptr(self) -> int:
        return int(self.data.data_ptr())

    def rows(self, start: int, stop: int) -> "QTensor":
        """Output rows ``[start, stop)`` as a view (rows are independent blocks)."""
        return QTensor(self.fmt, (stop - start, self.in_features), self.data[start:stop])

    def __getitem__(self, item: slice) -> "QTensor":
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("a QTensor takes only a contiguous row slice")
        start, stop, _ = item.indices(self.out_features)
        return self.rows(start, max(start, stop))

    def to(self, device: torch.device | str) -> "QTensor":
        return QTensor(self.fmt, self.shape, self.data.to(device))

    def contiguous(self) -> "QTensor":
        return self if self.data.is_contiguous() else QTensor(self.fmt, self.shape, self.data.contiguous())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float ``[out, in]`` matrix these blocks stand for (the reference path)."""
        out_f, in_f = self.shape
        blocks = self.data.reshape(out_f, in_f // BLOCK, self.fmt.block_bytes)
        d = blocks[..., 0:2].contiguous().view(torch.float16).float()          # [out, nb, 1]
        if self.fmt.name == "q8_0":
            q = blocks[..., 2:].contiguous().view(torch.int8).float()
            w = d * q
        else:
            qs = blocks[..., 4:] if self.fmt.name == "q4_1" else blocks[..., 2:]
            q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()               # [out, nb, 32]
            if self.fmt.name == "q4_0":
                w = d * (q - 8.0)
            else:
                m = blocks[..., 2:4].contiguous().view(torch.float16).float()
                w = d * q + m
        return w.reshape(out_f, in_f).to(dtype)

    def __repr__(self) -> str:
        return f"QTensor({self.fmt.name}, shape={self.shape}, device={self.device})"


#: a weight matrix as the model code sees it
Weight = Union[torch.Tensor, QTensor]


def quantize(w: torch.Tensor, qtype: str) -> QTensor:
    """Quantize a float ``[out, in]`` matrix into ``qtype`` blocks (llama.cpp's reference
    rounding, through the ``gguf`` package), on the CPU."""
    fmt = qformat(qtype)
    if w.dim() != 2 or w.shape[1] % BLOCK:
        raise ConfigError(f"cannot quantize a tensor of shape {tuple(w.shape)} to {fmt.name}: "
                          f"it must be a matrix with in_features a multiple of {BLOCK}")
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    arr = w.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    blocks = gguf_quantize(arr, GGMLQuantizationType(fmt.ggml_type))
    data = torch.from_numpy(np.ascontiguousarray(blocks))
    return QTensor(fmt, tuple(w.shape), data)


def can_quantize(shape: Sequence[int]) -> bool:
    """Whether a weight of ``shape`` can be held in block formats."""
    return len(shape) == 2 and shape[1] > 0 and shape[1] % BLOCK == 0


def weight_nbytes(w: Weight) -> int:
    """Bytes a decode step reads for ``w``."""
    if isinstance(w, QTensor):
        return w.nbytes()
    return int(w.numel() * w.element_size())


def cat_rows(parts: Sequence[Weight]) -> Weight:
    """Stack weights along output rows; quantized parts must share one format (else every
    part is dequantized to the first float part's dtype, float32 when none)."""
    if not any(isinstance(p, QTensor) for p in parts):
        return torch.cat(list(parts))  # type: ignore[arg-type]
    fmts = {p.fmt for p in parts if isinstance(p, QTensor)}
    if len(fmts) == 1 and all(isinstance(p, QTensor) for p in parts):
        qparts = [p for p in parts if isinstance(p, QTensor)]
        fmt = qparts[0].fmt
        data = torch.cat([p.data for p in qparts])
        return QTensor(fmt, (int(data.shape[0]), qparts[0].in_features), data)
    floats = [p for p in parts if isinstance(p, torch.Tensor)]
    dtype = floats[0].dtype if floats else torch.float32
    log.info("joining weights of mixed types (%s): computing them in %s",
             ", ".join(sorted(f.name for f in fmts)), dtype)
    return torch.cat([p.dequantize(dtype) if isinstance(p, QTensor) else p for p in parts])


def majority_label(counts: dict[str, int]) -> str:
    """The label of a file that mixes types: the type of most of its block weights (ties:
    alphabetical); ``counts`` maps a type name to its number of block weight tensors."""
    if not counts:
        raise ConfigError("no block weights to name a quantization by")
    return min(counts, key=lambda k: (-counts[k], k))
