"""docs/INTERFACES.md's generated tables match the code they describe."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _gen():  # scripts/ is not a package: load the generator by path
    spec = importlib.util.spec_from_file_location("gen_interfaces", ROOT / "scripts" / "gen_interfaces.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_blocks_are_current() -> None:
    gen = _gen()
    text = (ROOT / "docs" / "INTERFACES.md").read_text(encoding="utf-8")
    names = [m.group(2) for m in gen.BLOCK.finditer(text)]
    assert sorted(names) == ["layers", "messages"], f"generated blocks in docs/INTERFACES.md: {names}"
    assert gen.regenerate(text) == text, "docs/INTERFACES.md is out of date: run scripts/gen_interfaces.py"


def test_every_session_message_is_in_the_doc() -> None:
    from pymesh.proto import session_wire
    from pymesh.proto.session_table import MESSAGES

    text = (ROOT / "docs" / "INTERFACES.md").read_text(encoding="utf-8")
    names = {getattr(session_wire, n) for n in ("INFO", "OPEN", "SET_NEXT", "CLOSE", "FORWARD", "STATS", "FLUSH",
                                                "LINK", "STEP", "OUT", "ERR")}
    assert names == {m.name for m in MESSAGES}
    for name in names:
        assert f"`{name}`" in text, f"{name} is missing from docs/INTERFACES.md"
