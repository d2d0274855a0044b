"""Memory-mapped access to exactly the tensors one role needs.

A model folder holds ``model.safetensors`` or ``model.safetensors.index.json`` plus
shards. :class:`WeightStore` maps tensor names to files from the index (or from
the single file's header) and opens a shard with ``safe_open`` only when a tensor
in it is requested, so a worker serving blocks 10-19 never reads blocks 0-9.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import torch

from pymesh.errors import ConfigError
from pymesh.model.gguf_file import is_gguf
from pymesh.model.quant import Weight, can_quantize, quantize as quantize_weight

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: safetensors headers larger than this are refused (a real header is a few MB at most).
MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, reading only the header bytes."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                raise ConfigError(f"{path} is too short to be a safetensors file; re-download it")
            size = int.from_bytes(prefix, "little")
            if size > MAX_HEADER_BYTES:
                raise ConfigError(f"{path} declares a {size}-byte header (limit {MAX_HEADER_BYTES}); "
                                  f"the file is corrupt or not safetensors")
            blob = f.read(size)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if len(blob) != size:
        raise ConfigError(f"{path} is truncated inside its header; re-download it")
    try:
        header = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} has an unreadable header ({exc}); re-download it") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{path} has a header that is not a JSON object")
    return header


def weight_files(model_dir: str | Path) -> dict[str, Path]:
    """Tensor name -> file holding it, from the index or the single file's header."""
    root = Path(model_dir)
    index = root / INDEX_FILE
    single = root / SINGLE_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"{index} is not a valid safetensors index ({exc!r}); re-download the model") from None
        if not isinstance(weight_map, dict):
            raise ConfigError(f"{index}: weight_map must be an object")
        out: dict[str, Path] = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard.startswith("."):
                raise ConfigError(f"{index}: tensor {name!r} maps to an invalid shard name {shard!r}")
            out[str(name)] = root / shard
        return out
    if single.exists():
        return {name: single for name in read_safetensors_header(single) if name != "__metadata__"}
    raise ConfigError(f"{root} holds neither {SINGLE_FILE} nor {INDEX_FILE}; "
                      f"point --model-path at a Hugging Face model folder")


class WeightStore:
    """Reads named tensors from a model folder, lazily opening only the shards it needs."""

    def __init__(self, model_dir: str | Path) -> None:
        self.root = Path(model_dir)
        self.files = weight_files(self.root)
        self._open: dict[Path, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _handle(self, path: Path) -> Any:
        handle = self._open.get(path)
        if handle is None:
            from safetensors import safe_open

            if not path.exists():
                raise ConfigError(f"shard {path} named in {INDEX_FILE} does not exist; re-download the model")
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own error types
                raise ConfigError(f"cannot open {path} as safetensors: {exc}") from None
            self._open[path] = handle
        return handle

    def get(self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str = "cpu"
            ) -> torch.Tensor:
        """Tensor ``name`` converted to ``dtype`` on ``device``; ConfigError if missing or mis-shaped."""
        path = self.files.get(name)
        if path is None:
            where = self.root / (INDEX_FILE if (self.root / INDEX_FILE).exists() else SINGLE_FILE)
            raise ConfigError(f"tensor {name} is missing from {where}; the folder does not match its config.json")
        try:
            tensor = self._handle(path).get_tensor(name)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"cannot read tensor {name} from {path}: {exc}") from None
        if tuple(tensor.shape) != tuple(shape):
            raise ConfigError(f"tensor {name} in {path} has shape {tuple(tensor.shape)}, "
                              f"config.json implies {tuple(shape)}")
        out: torch.Tensor = tensor.to(device=device, dtype=dtype).contiguous()
        return out

    def get_weight(self, name: str, shape: Sequence[int], dtype: torch.dtype,
                   device: torch.device | str = "cpu", quantize: str | None = None) -> Weight:
        """A weight matrix: ``quantize`` (``q8_0``/``q4_0``/``q4_1``) computes those blocks from
        the stored values (a shape the blocks cannot hold stays in ``dtype``, with a log line)."""
        if quantize is None:
            return self.get(name, shape, dtype, device)
        w = self.get(name, shape, torch.float32, "cpu")
        if not can_quantize(shape):
            log.info("%s %s cannot be held in %s blocks (in_features not a multiple of 32): kept in %s",
                     name, tuple(shape), quantize, dtype)
            return w.to(device=device, dtype=dtype)
        return quantize_weight(w, quantize).to(device)

    def close(self) -> None:
        self._open.clear()

    def __enter__(self) -> "WeightStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TensorStore(Protocol):
    """What :class:`WeightStore` (a folder) and :class:`pymesh.model.gguf_store.GGUFStore` (a
    GGUF file) both offer, under Hugging Face tensor names."""

    def get(self, name: str, shape: Sequence[int], dtype: torch.dtype,
            device: torch.device | str = "cpu") -> torch.Tensor: ...

    def get_weight(self, name: str, shape: Sequence[int], dtype: torch.dtype,
                   device: torch.device | str = "cpu", quantize: str | None = None) -> Weight: ...

    def close(self) -> None: ...

    def __enter__(self) -> "TensorStore": ...

    def __exit__(self, *exc: object) -> None: ...


def open_store(model_path: str | Path) -> TensorStore:
    """The tensor store of a model folder (:class:`WeightStore`) or a GGUF file
    (:class:`pymesh.model.gguf_store.GGUFStore`)."""
    if is_gguf(model_path):
        from pymesh.model.gguf_store import GGUFStore

        return GGUFStore(model_path)
    return WeightStore(model_path)


def progress_iter(items: Sequence[Any], description: str, enabled: bool) -> Iterator[Any]:
    """Iterate ``items``, with a rich progress bar on stderr when ``enabled``."""
    if not enabled:
        yield from items
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(description, total=len(items))
        for item in items:
            yield item
            progress.advance(task)
