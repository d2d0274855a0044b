"""pymesh.settings: every PYMESH_* variable read once, documented, validated."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from pymesh.settings import ENV_VARS, FIELDS, Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "pymesh"
DOC = ROOT / "docs" / "SETTINGS.md"

#: a PYMESH_* name as a Python string literal (how settings.py and child-environment builders name it)
_PY_NAME = re.compile(r"""["'](PYMESH_[A-Z0-9_]+)["']""")
#: a PYMESH_* name the C++ reads (the other PYMESH_* in csrc/ are preprocessor macros)
_C_NAME = re.compile(r"""getenv\(\s*"(PYMESH_[A-Z0-9_]+)"\s*\)""")


def _source_names() -> set[str]:
    names: set[str] = set()
    for path in PKG.rglob("*.py"):
        names |= set(_PY_NAME.findall(path.read_text()))
    for path in (ROOT / "csrc").rglob("*"):
        if path.suffix in (".cpp", ".cu", ".h", ".cuh"):
            names |= set(_C_NAME.findall(path.read_text()))
    return names


def _doc_rows() -> dict[str, tuple[str, str]]:
    """name -> (meaning, default) from the table in docs/SETTINGS.md."""
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\|\s*`(PYMESH_[A-Z0-9_]+)`\s*\|(.*?)\|\s*`([^`]*)`\s*\|", line)
        if m:
            rows[m.group(1)] = (m.group(2).strip(), m.group(3))
    return rows


def test_every_name_in_the_source_is_listed_and_documented() -> None:
    source = _source_names()
    assert source - set(ENV_VARS) == set(), "read in the source but missing from settings.ENV_VARS"
    assert set(ENV_VARS) - source == set(), "listed in settings.ENV_VARS but read nowhere"
    documented = set(_doc_rows())
    assert documented == set(ENV_VARS), (documented ^ set(ENV_VARS))


def test_every_python_setting_has_a_field() -> None:
    cxx = {name for name in ENV_VARS if ENV_VARS[name].endswith(")") and "(C++" in ENV_VARS[name]}
    assert set(FIELDS) == set(ENV_VARS) - cxx
    for name, path in FIELDS.items():
        _field(Settings(), path)  # raises AttributeError for a stale path


def _field(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _doc_default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, Path):
        return str(value).replace(str(Path.home()), "~", 1)
    return str(value)


def test_documented_defaults_are_the_dataclass_defaults() -> None:
    rows = _doc_rows()
    defaults = Settings()
    for name, path in FIELDS.items():
        assert rows[name][1] == _doc_default(_field(defaults, path)), name
    # and reading an empty environment gives exactly those defaults
    assert load_settings({}) == defaults


def test_only_settings_and_the_cli_read_the_environment() -> None:
    """Library code takes settings objects; os.environ / getenv only in settings.py, cli/,
    and the builders of child-process environments in demo/ and bench/."""
    allowed_dirs = {PKG / "cli"}
    child_env_builders = {PKG / "demo" / "procs.py", PKG / "demo" / "swarm.py", PKG / "bench" / "swarm.py",
                          PKG / "bench" / "generate.py", PKG / "bench" / "transport.py", PKG / "bench" / "hops.py",
                          PKG / "bench" / "nat_swarm.py"}
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        if path == PKG / "settings.py" or path in child_env_builders or any(d in path.parents for d in allowed_dirs):
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\bos\.environ\b|\bgetenv\b|\benviron\[", code):
                offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert offenders == []


def test_child_environment_builders_only_copy_the_environment() -> None:
    """demo/ and bench/ pass os.environ on to children; they never read a value from it."""
    for rel in ("demo/procs.py", "demo/swarm.py", "bench/swarm.py", "bench/generate.py", "bench/transport.py",
                "bench/hops.py"):
        text = (PKG / rel).read_text()
        assert not re.search(r"os\.environ\.get|os\.environ\[|getenv", text), rel


@pytest.mark.parametrize("name, value, expected", [
    ("PYMESH_STEP_TIMEOUT", "soon", "is not a number"),
    ("PYMESH_STEP_TIMEOUT", "-1", "must be positive"),
    ("PYMESH_RECORD_TTL", "inf", "finite"),
    ("PYMESH_COPY_EVERY", "0", "at least 1"),
    ("PYMESH_MAX_RECOVERIES", "two", "not an integer"),
    ("PYMESH_THREADS", "0", "at least 1"),
    ("PYMESH_REQUIRE_C", "maybe", "1 or 0"),
    ("PYMESH_LOG_LEVEL", "LOUD", "must be one of"),
    ("PYMESH_THROUGHPUT", "fast", "is not a number"),
])
def test_a_bad_value_names_the_variable(name: str, value: str, expected: str) -> None:
    with pytest.raises(SettingsError, match=expected) as info:
        load_settings({name: value})
    assert f"{name}={value!r}" in str(info.value)


def test_values_are_read() -> None:
    s = load_settings({"PYMESH_STEP_TIMEOUT": "5", "PYMESH_MAX_RECOVERIES": "0", "PYMESH_REQUIRE_C": "1",
                       "PYMESH_FAST_DECODE": "off", "PYMESH_HOME": "/tmp/h", "PYMESH_THROUGHPUT": "12.5",
                       "PYMESH_JOIN_SETTLE": "0", "PYMESH_LOG_LEVEL": "debug", "PYMESH_THREADS": " "})
    assert s.client.step_timeout == 5.0 and s.client.max_recoveries == 0
    assert s.runtime.require_c and not s.runtime.fast_decode and s.runtime.home == Path("/tmp/h")
    assert s.worker.throughput == 12.5 and s.worker.join_settle == 0.0
    assert s.log_level == "DEBUG"
    assert s.runtime.threads is None  # blank counts as unset


def test_dht_and_transport_configs_carry_the_settings() -> None:
    s = load_settings({"PYMESH_RECORD_TTL": "10", "PYMESH_HEARTBEAT": "2", "PYMESH_DHT_TIMEOUT": "1",
                       "PYMESH_TRANSPORT_TIMEOUT": "7"})
    dht = s.dht_config()
    assert (dht.record_ttl, dht.heartbeat, dht.rpc_timeout) == (10.0, 2.0, 1.0)
    assert s.transport_config().idle_timeout == 7.0
    assert s.transport_config(idle_timeout=3.0).idle_timeout == 3.0


def test_cli_reports_a_bad_variable_and_exits_2(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from pymesh.cli.main import main

    monkeypatch.setenv("PYMESH_DHT_TIMEOUT", "never")
    assert main(["bootstrap", "--port", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "PYMESH_DHT_TIMEOUT='never'" in err[0], err


def test_cli_flags_override_settings() -> None:
    from pymesh.cli.common import with_flags
    from pymesh.settings import settings_of

    s = load_settings({"PYMESH_THREADS": "3", "PYMESH_MAX_BLOCKS": "4"})
    assert with_flags(s, threads=1, max_blocks=2).runtime.threads == 1
    assert with_flags(s, threads=1, max_blocks=2).worker.max_blocks == 2
    assert with_flags(s).worker.max_blocks == 4
    import argparse

    assert s.runtime.threads_or(None) == 3 and s.runtime.threads_or(5) == 5
    assert settings_of(argparse.Namespace(settings=s)) is s
    assert settings_of(argparse.Namespace()) == Settings()
