"""Tensors of a GGUF file, read by memory map (quantized blocks kept as they are).

Placeholder until the GGUF loader lands: opening a GGUF file says so.
"""

from __future__ import annotations

from pathlib import Path

from pymesh.errors import ConfigError


class GGUFStore:
    def __init__(self, path: str | Path) -> None:
        raise ConfigError(f"{path}: serving GGUF files directly is not built yet; convert it with "
                          f"`pymesh model convert` and pass the folder")
