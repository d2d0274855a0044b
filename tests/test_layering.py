"""The package's layering, checked from the source (docs/INTERFACES.md draws the same table).

Every ``import pymesh.X`` / ``from pymesh.X import ...`` anywhere in a module (top level or
inside a function) counts: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "pymesh"

#: layer -> the layers it may import (besides itself). "pymesh" is the package root
#: (``__version__``, ``PROTOCOL_VERSION``); "_C" the compiled kernels.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "pymesh": {"errors"},
    "proto": {"errors", "pymesh"},
    "net": {"proto", "errors", "pymesh"},
    "settings": {"errors", "net"},
    "model": {"proto", "errors", "pymesh", "_C"},
    "worker": {"model", "net", "proto", "settings", "errors", "pymesh"},
    "client": {"model", "net", "proto", "settings", "errors", "pymesh"},
    "monitor": {"net", "proto", "settings", "errors", "pymesh"},
    "api": {"client", "model", "net", "proto", "settings", "errors", "pymesh"},
    "demo": {"api", "worker", "client", "monitor", "model", "net", "proto", "settings", "errors", "pymesh"},
    "bench": {"api", "demo", "worker", "client", "model", "net", "proto", "settings", "errors", "pymesh"},
    "cli": {"api", "demo", "bench", "worker", "client", "monitor", "model", "net", "proto", "settings", "errors",
            "pymesh"},
    "__main__": {"cli"},
}

#: modules of pymesh/proto may import nothing outside the standard library but these
PROTO_THIRD_PARTY = {"cryptography"}


def layer_of_path(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("").parts
    if len(rel) == 1:
        return "pymesh" if rel[0] == "__init__" else rel[0]
    return rel[0]


def layer_of_module(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 1:
        return "pymesh"
    return parts[1] if (PKG / parts[1]).is_dir() or (PKG / f"{parts[1]}.py").exists() or parts[1] == "_C" \
        else "pymesh"


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "pymesh":
                out.extend((node.lineno, f"pymesh.{a.name}") for a in node.names)
            else:
                out.append((node.lineno, node.module))
    return out


MODULES = sorted(PKG.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_module_respects_layering(path: Path) -> None:
    me = layer_of_path(path)
    allowed = ALLOWED[me] | {me}
    bad = [f"line {line}: {name} ({layer_of_module(name)})" for line, name in imports(path)
           if name.startswith("pymesh") and layer_of_module(name) not in allowed]
    assert not bad, f"{path.relative_to(PKG)} (layer {me}) may import only {sorted(allowed)}; found: {bad}"


@pytest.mark.parametrize("path", sorted((PKG / "proto").rglob("*.py")), ids=lambda p: p.name)
def test_proto_imports_no_io_or_ml_library(path: Path) -> None:
    import sys

    stdlib = set(sys.stdlib_module_names)
    bad = [name for _, name in imports(path)
           if not name.startswith("pymesh") and name.split(".")[0] not in stdlib | PROTO_THIRD_PARTY]
    assert not bad, f"pymesh/proto/{path.name} is sans-I/O and torch-free, yet imports {bad}"


def test_roles_never_import_each_other() -> None:
    # the rule the table above encodes, stated on its own for the reader of a failure
    for role, other in (("worker", "client"), ("client", "worker")):
        for path in (PKG / role).rglob("*.py"):
            hits = [name for _, name in imports(path) if name.startswith(f"pymesh.{other}")]
            assert not hits, f"{path.relative_to(PKG)} imports {hits}: share vocabulary through pymesh.proto"


def test_modules_stay_small() -> None:
    long = {str(p.relative_to(PKG)): n for p in MODULES
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert not long, f"modules over 500 lines (split them along responsibility lines): {long}"


def test_layer_table_covers_every_package() -> None:
    layers = {layer_of_path(p) for p in MODULES}
    assert layers <= set(ALLOWED), f"layers without a rule here: {sorted(layers - set(ALLOWED))}"
