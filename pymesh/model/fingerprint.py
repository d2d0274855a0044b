"""Model ids: ``<name>@<fingerprint>``, so workers and clients agree on exact weights.

The fingerprint is a short SHA-256 over config.json (parsed and re-serialised
canonically, so whitespace does not matter) and, for every tensor of every safetensors
file, sorted by tensor name (so the split into shards and the order of tensors inside a
file do not matter): its name, dtype, shape, byte length and a digest of *sampled bytes of
its values*. Two fine-tunes of one base model have the same names and shapes; the
sampled values tell them apart, so a worker serving one is never compared against a
worker serving the other (issue 12: spot checks compare workers only within one id).

Sampling (:func:`tensor_sample_digest`): a tensor of at most :data:`FULL_HASH_BYTES` is
hashed whole (norms, biases, small projections); a larger one contributes
:data:`SAMPLE_WINDOWS` windows of :data:`WINDOW_BYTES` at evenly spaced offsets of its
byte range, the first window at its first byte and the last ending at its last byte. The
file is read through a memory map, so only the pages holding those windows are touched:
about 4 KiB per tensor whatever its size. Measured on SmolLM2-135M fp32 (272 tensors, one
538 MB file): 20 ms with the file in the page cache, 0.32 s after dropping it from the
cache. The cost follows the tensor count, not the size: a 1B model has a few hundred tensors
too.

The limit, by design: a change confined to bytes outside every window of a large tensor
(one edited value in the middle of an embedding matrix) does not change the id. The
fingerprint separates *different models* (fine-tunes, merges, re-trainings, which move
every value), not a deliberate single-byte edit; a worker that computes with weights other
than the ones its id names is a lying worker, and that is what the client's spot checks
(re-running its span on another provider) catch. Hashing every byte would cost a full read
of the model at every start.

Quantized and GGUF weights: a GGUF file's fingerprint is that of the float32 folder the
converter makes from it (:mod:`pymesh.model.gguf_identity` computes it from the file's
metadata and the blocks holding the sampled windows), so a worker serving the file and a
client holding the folder agree on the base id; two GGUF quantizations of one model (Q4_K
vs Q8_0) dequantize to different values and so get different ids. Weights computed in a
block format carry it as a suffix (``name@fingerprint:q4_1``, :func:`quant_label`), so
their honest outputs are never judged against full-precision ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
from pathlib import Path
from typing import Any

from pymesh.errors import ConfigError
from pymesh.proto.records import MAX_MODEL_NAME, sanitize_model_name
from pymesh.model.gguf_file import is_gguf
from pymesh.model.weights import INDEX_FILE, SINGLE_FILE, read_safetensors_header, weight_files

FINGERPRINT_CHARS = 12
#: tensors up to this many bytes are hashed whole
FULL_HASH_BYTES = 64 * 1024
#: evenly spaced windows sampled from a larger tensor (the first at its start, the last at its end)
SAMPLE_WINDOWS = 16
#: bytes per window (16 x 256 = 4 KiB per large tensor)
WINDOW_BYTES = 256
#: bumped whenever what is hashed changes, so old and new ids can never collide
SCHEME = b"pymesh-fingerprint-v2:sampled-values"

log = logging.getLogger(__name__)


def sample_ranges(nbytes: int) -> list[tuple[int, int]]:
    """Byte ranges ``[a, b)`` relative to a tensor's first byte that its digest covers."""
    if nbytes <= FULL_HASH_BYTES:
        return [(0, nbytes)]
    span = nbytes - WINDOW_BYTES
    return [(a, a + WINDOW_BYTES) for a in (k * span // (SAMPLE_WINDOWS - 1) for k in range(SAMPLE_WINDOWS))]


def tensor_sample_digest(data: Any, begin: int, end: int) -> bytes:
    """SHA-256 of the sampled bytes of the tensor stored at ``data[begin:end]`` (a memory map)."""
    h = hashlib.sha256()
    for a, b in sample_ranges(end - begin):
        h.update(data[begin + a:begin + b])
    return h.digest()


def _data_offsets(path: Path, name: str, info: dict[str, Any], data_len: int) -> tuple[int, int]:
    """The header's ``data_offsets`` of ``name``, checked against the file's data section."""
    offsets = info.get("data_offsets")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len):
        raise ConfigError(f"{path}: tensor {name} has data_offsets {str(offsets)[:60]} outside the file's "
                          f"{data_len} data bytes; the file is truncated or corrupt: re-download the model")
    return offsets[0], offsets[1]


def _file_entries(path: Path) -> list[tuple[str, str]]:
    """(tensor name, JSON line to hash) for every tensor of one safetensors file."""
    if not path.exists():
        raise ConfigError(f"shard {path} named in {INDEX_FILE} does not exist; re-download the model")
    header = read_safetensors_header(path)
    entries: list[tuple[str, str]] = []
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(0)
            data_start = 8 + int.from_bytes(f.read(8), "little")
            data_len = size - data_start
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                for name, info in header.items():
                    if name == "__metadata__":
                        continue
                    if not isinstance(info, dict):
                        raise ConfigError(f"{path}: header entry for {name} is not an object")
                    a, b = _data_offsets(path, name, info, data_len)
                    digest = tensor_sample_digest(mm, data_start + a, data_start + b).hex()
                    entries.append((name, json.dumps([name, info.get("dtype"), info.get("shape"), b - a, digest])))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the tensors of {path}: {exc}") from None
    return entries


def fingerprint(model_dir: str | Path) -> str:
    """Short hex hash of config.json plus every tensor's name, dtype, shape, length and sampled
    values (see the module docstring for what the sampling does and does not separate). For a
    GGUF file: the fingerprint of the float32 folder the converter makes from it."""
    if is_gguf(model_dir):
        from pymesh.model.gguf_identity import gguf_fingerprint

        return gguf_fingerprint(model_dir, SCHEME, FINGERPRINT_CHARS)
    root = Path(model_dir)
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{root / 'config.json'} does not exist: --model-path must be a model folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{root / 'config.json'} is not readable JSON ({exc})") from None
    h = hashlib.sha256(SCHEME)
    h.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    files = sorted(set(weight_files(root).values()))
    if not files:
        raise ConfigError(f"{root} names no tensors in {INDEX_FILE} or {SINGLE_FILE}")
    entries: list[tuple[str, str]] = []
    for path in files:
        entries.extend(_file_entries(path))
    # Sorted by tensor name: how the tensors are split into shards does not matter.
    for _name, line in sorted(entries):
        h.update(line.encode())
    return h.hexdigest()[:FINGERPRINT_CHARS]


def quant_label(model_path: str | Path, quantize: str | None = None) -> str | None:
    """The quantization suffix of a model id: the block format the weights are computed in
    (``--quantize`` for a folder; for a GGUF file the type of most of its block weights, see
    :func:`pymesh.model.gguf_identity.gguf_quant_label`), None for float weights."""
    if is_gguf(model_path):
        if quantize is not None:
            raise ConfigError(f"{model_path} is served in its own quantization; --quantize {quantize} "
                              f"applies to model folders only: drop it, or pass a float model folder")
        from pymesh.model.gguf_identity import gguf_quant_label

        return gguf_quant_label(model_path)
    if quantize is not None:
        from pymesh.model.quant import qformat

        return qformat(quantize).name
    return None


def model_id(model_dir: str | Path, name: str | None = None, quantize: str | None = None) -> str:
    """``<name>@<fingerprint>``, plus ``:<quantization>`` when the weights are computed in a
    block format (``name@fingerprint:q4_1``); the part before the suffix is the *base id*. ``name`` (``--model-name``) must already be a valid model name
    (letters, digits, ``.``, ``-``, ``_``, ``:``); without it the folder's name is used,
    sanitised (:func:`pymesh.proto.records.sanitize_model_name`), with a log line when that
    changed it: a folder name is whatever the download tool chose, and records carry it to
    every monitor and log in the swarm."""
    root = Path(model_dir)
    if name is not None:
        if sanitize_model_name(name) != name or len(name) > MAX_MODEL_NAME:
            raise ConfigError(
                f"model name {name!r} must contain no '@' and only ASCII letters, digits, '.', '-', '_' "
                f"and ':' (at most {MAX_MODEL_NAME} characters); e.g. {sanitize_model_name(name)!r}"
            )
        label = name
    else:
        if is_gguf(root):  # the converted folder's name: the stem without its quantization tag
            from pymesh.model.gguf_identity import gguf_model_name

            folder = gguf_model_name(root)
        else:
            folder = root.resolve().name
        label = sanitize_model_name(folder)
        if label != folder:
            log.info("model name %r (from the path) is not a valid model name; the swarm will see it as %r "
                     "(use --model-name to choose another)", folder, label)
    base = f"{label}@{fingerprint(root)}"
    suffix = quant_label(root, quantize)
    return base if suffix is None else f"{base}:{suffix}"
