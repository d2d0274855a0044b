"""The model id of a GGUF file: the same base id as the float32 folder converted from it.

:func:`gguf_fingerprint` hashes exactly what :func:`pymesh.model.fingerprint.fingerprint`
hashes for that folder, without writing it: the config.json the converter would write
(canonical JSON), and for each tensor the folder would hold (Hugging Face name, dtype F32,
shape, byte length) the digest of the sampled windows of its float32 bytes. Those windows
lie in the un-permuted float32 layout; each is computed by dequantizing only the blocks
that hold it, from the GGUF row the converter would put there (llama q/k rows are
permuted). SmolLM2-135M Q4_1: a few hundred blocks, not 135M values.

The quantization suffix (``name@fingerprint:q4_1``) is the type most of the file's block
weights are computed in (:func:`gguf_quant_label`); :func:`weight_types` counts every
matrix, the LM head included, for the worker record.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from pymesh.model.gguf_convert import GGUFModel
from pymesh.model.gguf_file import TensorInfo, dequantize_bytes, rotary_row_order
from pymesh.model.quant import BY_GGML_TYPE, majority_label

#: what a matrix served as a float tensor (in the run's dtype) is counted as
FLOAT_LABEL = "float"
#: a trailing quantization tag of a GGUF file name: ``Model.Q4_K_M.gguf``, ``Model-f16.gguf``
_QUANT_TAG = re.compile(r"[.-](?:I?Q\d+(?:_[A-Z0-9]+)*|B?F16|F32)$", re.IGNORECASE)


def gguf_model_name(path: str | os.PathLike[str]) -> str:
    """The file's stem without a trailing quantization tag (``SmolLM2-135M-Instruct.Q4_1``
    -> ``SmolLM2-135M-Instruct``): the name the converted folder gets."""
    stem = Path(path).stem
    return _QUANT_TAG.sub("", stem) or stem


def _window_bytes(model: GGUFModel, info: TensorInfo, order: np.ndarray | None, a: int, b: int) -> bytes:
    """Bytes ``[a, b)`` of the tensor's float32 Hugging Face layout, from the blocks holding them."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(info.ggml_type)]
    cols = info.shape[-1]
    raw = model.file.raw(info.name)
    e0, e1 = a // 4, -(-b // 4)
    parts = []
    for r in range(e0 // cols, (e1 - 1) // cols + 1):
        c0, c1 = max(e0 - r * cols, 0), min(e1 - r * cols, cols)
        b0, b1 = c0 // block, -(-c1 // block)
        row = int(order[r]) if order is not None else r
        vals = dequantize_bytes(info.ggml_type, raw[row, b0 * type_size:b1 * type_size], info.name)
        parts.append(vals.reshape(-1)[c0 - b0 * block:c1 - b0 * block])
    data = np.concatenate(parts).astype("<f4").tobytes()
    return data[a - e0 * 4:b - e0 * 4]


def _digest(model: GGUFModel, info: TensorInfo, cfg: dict[str, Any], nbytes: int) -> str:
    from pymesh.model.fingerprint import FULL_HASH_BYTES, sample_ranges

    h = hashlib.sha256()
    if nbytes <= FULL_HASH_BYTES or len(info.shape) == 1:
        whole = model.read(info.name, cfg).astype("<f4").tobytes()
        for a, b in sample_ranges(nbytes):
            h.update(whole[a:b])
        return h.hexdigest()
    heads = model.rotary_heads(info.name, cfg)
    order = rotary_row_order(info.rows, heads) if heads is not None else None
    for a, b in sample_ranges(nbytes):
        h.update(_window_bytes(model, info, order, a, b))
    return h.hexdigest()


def gguf_fingerprint(path: str | os.PathLike[str], scheme: bytes, chars: int) -> str:
    """:func:`pymesh.model.fingerprint.fingerprint` of the float32 folder the converter makes
    from ``path`` (``scheme`` and ``chars`` are that module's)."""
    model = GGUFModel.open(path)
    try:
        cfg = json.loads(json.dumps(model.config("float32")))  # as config.json would parse
        h = hashlib.sha256(scheme)
        h.update(json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode())
        entries = []
        for info, hf in model.hf_tensors():
            nbytes = int(np.prod(info.shape, dtype=np.int64)) * 4
            line = json.dumps([hf, "F32", list(info.shape), nbytes, _digest(model, info, cfg, nbytes)])
            entries.append((hf, line))
    finally:
        model.file.close()
    for _name, line in sorted(entries):
        h.update(line.encode())
    return h.hexdigest()[:chars]


def _compute_type(info: TensorInfo) -> str:
    fmt = BY_GGML_TYPE.get(info.ggml_type)
    return fmt.name if fmt is not None else FLOAT_LABEL


def _count_types(path: str | os.PathLike[str], blocks_only: bool) -> dict[str, int]:
    counts: dict[str, int] = {}
    for info, _hf in GGUFModel.open(path).hf_tensors():
        if len(info.shape) == 2 and (info.name.startswith("blk.") or not blocks_only):
            kind = _compute_type(info)
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def weight_types(path: str | os.PathLike[str]) -> dict[str, int]:
    """Every weight matrix of the file (the LM head / embeddings included) counted by the type
    it is computed in: ``q8_0`` / ``q4_0`` / ``q4_1``, or :data:`FLOAT_LABEL` for matrices served
    in the run's dtype (F32/F16/BF16, and types dequantized at load)."""
    return _count_types(path, blocks_only=False)


def gguf_quant_label(path: str | os.PathLike[str]) -> str | None:
    """The type most block weights (``blk.N.*`` matrices) are computed in; None when that is
    float (e.g. a file of Q4_K / Q6_K blocks, dequantized at load)."""
    counts = _count_types(path, blocks_only=True)
    if not counts:
        return None
    label = majority_label(counts)
    return None if label == FLOAT_LABEL else label
