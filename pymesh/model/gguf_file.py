"""A GGUF file's header, parsed without trusting it, and its tensors by memory map.

:func:`open_gguf_untrusted` reads the key/value metadata and the tensor table of a GGUF
file (versions 2 and 3, little endian) and checks everything before it is used: every
length and count against the bytes left in the file, every tensor's dimensions against its
type's block size and its byte range against the file's data section. Any defect raises
:class:`~pymesh.errors.ConfigError`, never ``IndexError`` / ``struct.error`` or a huge
allocation (the ``gguf`` package's reader loops forever on an array count past the end of
the file, so it is not used for parsing). Tensor bytes are never read here: :meth:`GGUFFile.raw`
returns a view of the copy-on-write memory map, so only the pages of the tensors a caller
asks for are ever touched.

Also here, shared by the converter, the tensor store and the fingerprint: the Hugging Face
name of each GGUF tensor and the rotary row permutation llama.cpp applies to q/k.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pymesh.errors import ConfigError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
#: nesting of arrays inside arrays accepted in metadata (GGUF writers use none)
MAX_ARRAY_DEPTH = 2

# GGUF value types: struct format of the scalars, 8 = string, 9 = array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY, _BOOL = 8, 9, 7

def is_gguf(path: str | os.PathLike[str]) -> bool:
    """Whether ``--model-path`` names a GGUF file rather than a model folder."""
    p = Path(path)
    return p.suffix.lower() == ".gguf" and not p.is_dir()


# --- Hugging Face names -----------------------------------------------------------------

BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# Tensors llama.cpp keeps that a Hugging Face Llama folder does not (rope_freqs becomes
# config.rope_scaling; the others are precomputed caches).
_SKIPPED = re.compile(r"^(rope_freqs\.weight|blk\.\d+\.attn_rot_embd\.weight)$")
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_TOP_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")


def hf_tensor_name(name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, None for tensors HF does not keep."""
    if _SKIPPED.match(name):
        return None
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    m = _TOP_RE.match(name)
    if m and m.group(1) in TOP_NAMES:
        return f"{TOP_NAMES[m.group(1)]}.{m.group(2)}"
    raise ConfigError(f"GGUF tensor {name!r} has no Hugging Face Llama equivalent; this file is not a plain Llama model")


def rotary_row_order(rows: int, n_head: int) -> np.ndarray:
    """Index ``idx`` with ``hf[r] = gguf[idx[r]]``: undoes llama.cpp's interleaving of rotary
    pairs in a q or k projection (rows = heads * head_dim). A permutation of output rows, so it
    applies alike to float rows and to rows of quantized blocks."""
    if rows % (2 * n_head):
        raise ConfigError(f"cannot un-permute a rotary projection of {rows} rows over {n_head} heads")
    return np.arange(rows).reshape(n_head, rows // n_head // 2, 2).swapaxes(1, 2).reshape(rows)


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of rotary pairs in a q or k projection (rows = heads*dim)."""
    out: np.ndarray = w[rotary_row_order(w.shape[0], n_head)]
    return out


# --- the header -------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]   # outermost first, as torch / Hugging Face ((out, in) for a matrix)
    offset: int              # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(self.ggml_type).name

    @property
    def rows(self) -> int:
        """Rows of the (out, in) layout: every dimension but the innermost."""
        return int(np.prod(self.shape[:-1], dtype=np.int64)) if len(self.shape) > 1 else 1


class _Cursor:
    """Bounds-checked little-endian reads from the file's bytes."""

    def __init__(self, buf: Any, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.end = len(buf)
        self.path = path

    def fail(self, what: str) -> ConfigError:
        return ConfigError(f"{self.path} is not a readable GGUF file: {what} (at byte {self.pos}); "
                           f"the file is truncated or corrupt: re-download it")

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.end - self.pos:
            raise self.fail(f"{what} needs {n} bytes, {self.end - self.pos} are left")

    def scalar(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype == _STRING:
            return self.string(what)
        if vtype == _BOOL:
            return bool(self.scalar("<B", what))
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype != _ARRAY:
            raise self.fail(f"{what} has unknown value type {vtype}")
        if depth >= MAX_ARRAY_DEPTH:
            raise self.fail(f"{what} nests arrays deeper than {MAX_ARRAY_DEPTH}")
        itype = self.scalar("<I", what)
        count = self.scalar("<Q", what)
        if itype in _NUMPY or itype == _BOOL:
            dtype = np.dtype(_NUMPY.get(itype, "<u1"))
            self.need(count * dtype.itemsize, what)
            arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            return (arr != 0).tolist() if itype == _BOOL else arr.tolist()
        if itype not in (_STRING, _ARRAY):
            raise self.fail(f"{what} is an array of unknown value type {itype}")
        self.need(count * 8, what)  # every string or array takes at least 8 bytes
        return [self.value(itype, what, depth + 1) for _ in range(count)]


class GGUFFile:
    """The metadata and tensor table of one GGUF file; tensor bytes by memory map."""

    def __init__(self, path: Path, data: np.ndarray, metadata: dict[str, Any],
                 tensors: dict[str, TensorInfo]) -> None:
        self.path = path
        self._data: np.ndarray | None = data
        self.metadata = metadata
        self.tensors = tensors

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of tensor ``name`` as a uint8 ``[rows, row_bytes]`` view of the map
        (writable copy-on-write pages: writing never reaches the file)."""
        info = self.tensors.get(name)
        if info is None:
            raise ConfigError(f"{self.path}: tensor {name!r} is missing")
        if self._data is None:
            raise ConfigError(f"{self.path} is closed")
        flat = self._data[info.offset:info.offset + info.nbytes].view(np.ndarray)
        return flat.reshape(info.rows, info.nbytes // info.rows)

    def close(self) -> None:
        """Drop this object's reference to the map (views handed out keep theirs)."""
        self._data = None


def _tensor_info(cur: _Cursor, alignment: int) -> tuple[str, int, tuple[int, ...], int]:
    name = cur.string("a tensor name")
    n_dims = cur.scalar("<I", f"tensor {name!r}'s dimension count")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1-{MAX_DIMS} allowed)")
    dims = tuple(cur.scalar("<Q", f"tensor {name!r}'s dimensions") for _ in range(n_dims))
    ggml_type = cur.scalar("<I", f"tensor {name!r}'s type")
    offset = cur.scalar("<Q", f"tensor {name!r}'s offset")
    if offset % alignment:
        raise cur.fail(f"tensor {name!r}'s offset {offset} is not a multiple of the alignment {alignment}")
    return name, ggml_type, dims, offset


def _tensor_bytes(cur: _Cursor, name: str, ggml_type: int, dims: tuple[int, ...]) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise cur.fail(f"tensor {name!r} has unknown type {ggml_type}") from None
    if any(d < 1 for d in dims) or dims[0] % block:
        raise cur.fail(f"tensor {name!r} has dimensions {list(dims)}; the innermost must be a positive "
                       f"multiple of {block} for its type")
    n = type_size
    for d in dims:
        n *= d
        if n > cur.end * block:  # already larger than the file: stop before the product grows further
            raise cur.fail(f"tensor {name!r} with dimensions {list(dims)} is larger than the file")
    return n // block


#: the last parsed headers: loading a model reads the header for its config, tokenizer, span,
#: head and id (SmolLM2's 49k-token vocabulary: 0.4 s a parse). An entry is reused only when
#: the header's bytes still hash the same (mtimes are too coarse to tell quick rewrites apart).
_PARSED: dict[tuple[Path, int], tuple[bytes, int, dict[str, Any], dict[str, TensorInfo]]] = {}
_PARSED_KEEP = 2


def _header_digest(data: np.ndarray, end: int) -> bytes:
    import hashlib

    return hashlib.sha256(data[:end].tobytes()).digest()


def open_gguf_untrusted(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse ``path``'s header; ConfigError naming the defect if it is not a valid GGUF file.
    The parsed header of an unchanged file is reused (treat ``metadata`` as read-only)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"GGUF file {p} does not exist")
    try:
        data = np.memmap(p, dtype=np.uint8, mode="c")
    except (OSError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
        raise ConfigError(f"{p} is not a readable GGUF file: cannot map it ({exc})") from None
    key = (p.resolve(), len(data))
    cached = _PARSED.get(key)
    if cached is not None and _header_digest(data, cached[1]) == cached[0]:
        return GGUFFile(p, data, cached[2], cached[3])
    metadata, tensors, end = _parse(data, p)
    _PARSED.pop(key, None)
    while len(_PARSED) >= _PARSED_KEEP:
        del _PARSED[next(iter(_PARSED))]
    _PARSED[key] = (_header_digest(data, end), end, metadata, tensors)
    return GGUFFile(p, data, metadata, tensors)


def _parse(data: np.ndarray, p: Path) -> tuple[dict[str, Any], dict[str, TensorInfo], int]:
    """(metadata, tensors, where the header ends)."""
    cur = _Cursor(data, p)
    cur.need(8, "the magic and version")
    if bytes(data[:4]) != GGUF_MAGIC:
        raise ConfigError(f"{p} is not a readable GGUF file: it does not start with {GGUF_MAGIC!r}")
    cur.pos = 4
    version = cur.scalar("<I", "the version")
    if version not in SUPPORTED_VERSIONS:
        swapped = version.to_bytes(4, "little")[::-1]
        if int.from_bytes(swapped, "little") in SUPPORTED_VERSIONS:
            raise ConfigError(f"{p} is a big-endian GGUF file; pymesh reads little-endian GGUF only")
        raise cur.fail(f"version {version} is not supported (only {SUPPORTED_VERSIONS})")
    n_tensors = cur.scalar("<Q", "the tensor count")
    n_kv = cur.scalar("<Q", "the metadata count")
    cur.need(n_kv * 12, f"{n_kv} metadata entries")  # a key's length and a type at least
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("a metadata key")
        vtype = cur.scalar("<I", f"metadata {key!r}'s type")
        if key in metadata:
            raise cur.fail(f"metadata key {key!r} appears twice")
        metadata[key] = cur.value(vtype, f"metadata {key!r}")
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1 or alignment & (alignment - 1):
        raise cur.fail(f"general.alignment {alignment!r} is not a power of two")
    cur.need(n_tensors * 24, f"{n_tensors} tensor entries")  # name length, a dimension, type, offset
    table = [_tensor_info(cur, alignment) for _ in range(n_tensors)]
    data_start = -(-cur.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, ggml_type, dims, offset in table:
        if name in tensors:
            raise cur.fail(f"tensor {name!r} appears twice")
        nbytes = _tensor_bytes(cur, name, ggml_type, dims)
        start = data_start + offset
        if start + nbytes > cur.end:
            raise ConfigError(f"{p}: tensor {name!r} needs bytes {start}-{start + nbytes} but the file has "
                              f"{cur.end}; the file is truncated or corrupt: re-download it")
        tensors[name] = TensorInfo(name, ggml_type, tuple(reversed(dims)), start, nbytes)
    return metadata, tensors, cur.pos


def dequantize_bytes(ggml_type: int, raw: np.ndarray, name: str = "?") -> np.ndarray:
    """Whole blocks of type ``ggml_type`` (uint8 ``[..., n_blocks * type_size]``) as float32
    ``[..., n_blocks * block_size]``, by the ``gguf`` package (the values the converter writes)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(ggml_type)
    try:
        return np.asarray(dequantize(raw, qtype), dtype=np.float32)
    except NotImplementedError:
        raise ConfigError(
            f"tensor {name!r} has type {qtype.name}, which the gguf package cannot dequantize; "
            "re-quantize the model to another type"
        ) from None


def dequantize_rows(info: TensorInfo, raw: np.ndarray) -> np.ndarray:
    """Rows of ``info``'s stored bytes (uint8 ``[rows, row_bytes]``) as float32 ``[rows, in]``."""
    return dequantize_bytes(info.ggml_type, raw, info.name).reshape(raw.shape[0], info.shape[-1])
