"""Model ids: ``<name>@<fingerprint>``, so workers and clients agree on exact weights.

The fingerprint is a short SHA-256 over config.json (parsed and re-serialised
canonically, so whitespace does not matter) and, for every safetensors file, the
tensor names, shapes and dtypes from its header
(sorted by name, so the split into shards does not matter). Only headers are read: it costs
milliseconds even for a 100 GB model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from pymesh.errors import ConfigError
from pymesh.proto.records import MAX_MODEL_NAME, sanitize_model_name
from pymesh.model.weights import INDEX_FILE, SINGLE_FILE, read_safetensors_header, weight_files

FINGERPRINT_CHARS = 12

log = logging.getLogger(__name__)


def fingerprint(model_dir: str | Path) -> str:
    """Short hex hash of config.json plus the safetensors headers (names, shapes, dtypes)."""
    root = Path(model_dir)
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{root / 'config.json'} does not exist: --model-path must be a model folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{root / 'config.json'} is not readable JSON ({exc})") from None
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    files = sorted(set(weight_files(root).values()))
    if not files:
        raise ConfigError(f"{root} names no tensors in {INDEX_FILE} or {SINGLE_FILE}")
    entries: list[tuple[str, object, object]] = []
    for path in files:
        if not path.exists():
            raise ConfigError(f"shard {path} named in {INDEX_FILE} does not exist; re-download the model")
        header = read_safetensors_header(path)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(info, dict):
                raise ConfigError(f"{path}: header entry for {name} is not an object")
            entries.append((name, info.get("dtype"), info.get("shape")))
    # Sorted by tensor name: how the tensors are split into shards does not matter.
    for entry in sorted(entries, key=lambda e: e[0]):
        h.update(json.dumps(entry).encode())
    return h.hexdigest()[:FINGERPRINT_CHARS]


def model_id(model_dir: str | Path, name: str | None = None) -> str:
    """``<name>@<fingerprint>``. ``name`` (``--model-name``) must already be a valid model name
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
        folder = root.resolve().name
        label = sanitize_model_name(folder)
        if label != folder:
            log.info("model folder name %r is not a valid model name; the swarm will see it as %r "
                     "(use --model-name to choose another)", folder, label)
    return f"{label}@{fingerprint(root)}"
