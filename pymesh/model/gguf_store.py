"""Tensors of a GGUF file, read by memory map, quantized blocks kept as they are.

:class:`GGUFStore` offers what :class:`pymesh.model.weights.WeightStore` offers for a folder
(``get``, ``get_weight``, ``close``, a context manager), under Hugging Face tensor names.
Only the tensors asked for are touched: a worker serving blocks 10-19 never reads the pages
of blocks 0-9.

``get_weight`` returns Q8_0 / Q4_0 / Q4_1 matrices as :class:`~pymesh.model.quant.QTensor`
views of the file's bytes (the embeddings / LM head too); llama q/k rows are reordered into
Hugging Face's rotary layout exactly as the converter reorders its float rows (a permutation
of output rows, so it applies to rows of blocks). F32 / F16 / BF16 matrices come back as
float tensors in the run's dtype; any other type (Q4_K, Q6_K, Q5_0, ...) is dequantized to
the run's dtype at load, with one log line per file naming those types.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pymesh.errors import ConfigError
from pymesh.model.gguf_convert import GGUFModel
from pymesh.model.gguf_file import TensorInfo, rotary_row_order
from pymesh.model.quant import BY_GGML_TYPE, QTensor, Weight

log = logging.getLogger(__name__)

#: GGML types a matrix is served in as a plain float tensor (F32, F16, BF16)
FLOAT_TYPES = frozenset({0, 1, 30})
#: files whose dequantized-at-load types were already logged in this process
_LOGGED: set[Path] = set()


def dequantized_types(model: GGUFModel) -> list[str]:
    """Names of the types of ``model``'s matrices that neither stay blocks nor are floats."""
    return sorted({info.type_name for info, _ in model.hf_tensors()
                   if len(info.shape) == 2 and info.ggml_type not in FLOAT_TYPES
                   and info.ggml_type not in BY_GGML_TYPE})


class GGUFStore:
    """Reads Hugging Face-named tensors from a GGUF file (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.model = GGUFModel.open(path)
        self.path = self.model.path
        self.config = self.model.config("float32")
        self.infos: dict[str, TensorInfo] = {hf: info for info, hf in self.model.hf_tensors()}

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def _info(self, name: str, shape: Sequence[int]) -> TensorInfo:
        info = self.infos.get(name)
        if info is None:
            raise ConfigError(f"tensor {name} is missing from {self.path}; the file does not match its metadata")
        if tuple(info.shape) != tuple(shape):
            raise ConfigError(f"tensor {name} ({info.name}) in {self.path} has shape {tuple(info.shape)}, "
                              f"the GGUF metadata implies {tuple(shape)}")
        return info

    def get(self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str = "cpu"
            ) -> torch.Tensor:
        """Tensor ``name`` as float ``dtype`` on ``device`` (dequantized if the file holds blocks)."""
        info = self._info(name, shape)
        arr = self.model.read(info.name, self.config)
        out: torch.Tensor = torch.from_numpy(arr).to(device=device, dtype=dtype).contiguous()
        return out

    def get_weight(self, name: str, shape: Sequence[int], dtype: torch.dtype,
                   device: torch.device | str = "cpu", quantize: str | None = None) -> Weight:
        """A weight matrix in the type the file holds it in (see the module docstring)."""
        if quantize is not None:
            raise ConfigError(f"{self.path} is served in its own quantization; --quantize {quantize} applies "
                              f"to model folders only: drop it, or pass a float model folder")
        info = self._info(name, shape)
        fmt = BY_GGML_TYPE.get(info.ggml_type)
        if fmt is not None and len(info.shape) == 2:
            raw = self.model.file.raw(info.name)
            heads = self.model.rotary_heads(info.name, self.config)
            if heads is not None:
                raw = np.ascontiguousarray(raw[rotary_row_order(raw.shape[0], heads)])
            return QTensor(fmt, info.shape, torch.from_numpy(raw)).to(device)
        if info.ggml_type not in FLOAT_TYPES and self.path not in _LOGGED:
            _LOGGED.add(self.path)
            log.info("%s holds weights as %s, which pymesh does not compute on directly: they are "
                     "dequantized to %s at load", self.path, ", ".join(dequantized_types(self.model)),
                     str(dtype).removeprefix("torch."))
        return self.get(name, shape, dtype, device)

    def close(self) -> None:
        self.model.file.close()

    def __enter__(self) -> "GGUFStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
