#!/usr/bin/env python3
"""Rewrite the generated blocks of docs/INTERFACES.md from the code.

Blocks sit between ``<!-- generated: NAME -->`` and ``<!-- end generated -->``:
``layers`` (tests/test_layering.py's ALLOWED table) and ``messages``
(pymesh.proto.session_table). ``--check`` exits 1 when the file is out of date
(tests/test_interfaces_doc.py runs the same check).

    .venv/bin/python scripts/gen_interfaces.py          # rewrite in place
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "INTERFACES.md"
BLOCK = re.compile(r"(<!-- generated: (\w+) -->\n)(.*?)(<!-- end generated -->)", re.S)


def render_layers() -> str:
    sys.path.insert(0, str(ROOT))
    from tests.test_layering import ALLOWED

    lines = ["| layer | may import |", "|---|---|"]
    for layer, deps in ALLOWED.items():
        lines.append(f"| `{layer}` | {', '.join(f'`{d}`' for d in sorted(deps)) or '(nothing of pymesh)'} |")
    return "\n".join(lines) + "\n"


def render_messages() -> str:
    from pymesh.proto.session_table import render_markdown

    return render_markdown()


RENDERERS = {"layers": render_layers, "messages": render_messages}


def regenerate(text: str) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group(2)
        if name not in RENDERERS:
            raise SystemExit(f"docs/INTERFACES.md: unknown generated block {name!r}")
        return m.group(1) + RENDERERS[name]() + m.group(4)

    return BLOCK.sub(sub, text)


def main(argv: list[str]) -> int:
    text = DOC.read_text(encoding="utf-8")
    new = regenerate(text)
    if "--check" in argv:
        if new != text:
            print("docs/INTERFACES.md is out of date: run scripts/gen_interfaces.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
