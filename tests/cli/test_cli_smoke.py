"""CLI smoke tests: the entry point, every subcommand's --help, and each benchmark's JSON schema.

Each benchmark part runs in its quickest form (``--quick``) in a subprocess; a part
whose module is not in this build is skipped, saying so.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from pymesh.cli.main import SUBCOMMANDS

#: The keys each part's rows must have (the issues' JSON schemas).
BENCH_SCHEMAS: dict[str, set[str]] = {
    "kernels": {"op", "tokens", "hidden", "dtype", "ref_us", "fused_us", "speedup"},
    "generate": {"engine", "dtype", "decode_tokens_per_s", "prefill_s"},
    "transport": {"transport", "packet_size", "rtt_us_median", "rtt_us_p99", "mb_per_s"},
    "dht": {"nodes", "success_rate", "median_rounds", "p95_rounds", "messages_per_lookup"},
    "swarm": {"transport", "workers", "ttft_s", "decode_tokens_per_s", "single_process_tokens_per_s", "ratio"},
}
#: Numeric keys (the rest may be strings).
TEXT_KEYS = {"op", "dtype", "engine", "transport"}
BENCH_TIMEOUT = {"kernels": 240, "generate": 400, "transport": 240, "dht": 240, "swarm": 500}
#: On top of --quick: the smallest settings each part offers (a smoke test, not a measurement).
BENCH_QUICKEST: dict[str, list[str]] = {
    "kernels": ["--budget", "0.01"],
    "generate": ["--new-tokens", "8", "--repeats", "1"],
    "transport": ["--rtt-calls", "50", "--bulk-calls", "2"],
    "dht": ["--sizes", "100", "--lookups", "50"],
    "swarm": ["--new-tokens", "8", "--repeats", "1"],
}


def pymesh(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="160")
    return subprocess.run([sys.executable, "-m", "pymesh", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.timeout(120)
def test_version_and_top_level_help() -> None:
    from pymesh import __version__

    out = pymesh("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"pymesh {__version__}"
    out = pymesh("--help")
    assert out.returncode == 0
    for name in SUBCOMMANDS:
        assert name in out.stdout
    out = pymesh()
    assert out.returncode == 0 and "usage: pymesh" in out.stdout


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_each_subcommand_help(command: str) -> None:
    module = SUBCOMMANDS[command][0]
    if not _have(module):
        pytest.skip(f"{module} is not in this build yet")
    out = pymesh(command, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: pymesh {command}")
    assert "--help" in out.stdout


@pytest.mark.timeout(60)
def test_unknown_subcommand_and_bad_flag_fail_cleanly() -> None:
    out = pymesh("no-such-command")
    assert out.returncode == 2 and "invalid choice" in out.stderr
    out = pymesh("monitor", "--bootstrap", "nonsense", "--once")
    assert out.returncode == 1
    assert "expected HOST:PORT" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.timeout(60)
def test_monitor_once_with_no_bootstrap_says_so() -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))  # a port that is bound but never answers
        port = s.getsockname()[1]
        out = pymesh("monitor", "--once", "--bootstrap", f"127.0.0.1:{port}", "--timeout", "2", timeout=50)
    assert out.returncode == 3, out.stderr[-2000:]
    assert "UNREACHABLE" in out.stdout
    assert "the bootstrap node did not answer" in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("part", [
    pytest.param(p, marks=pytest.mark.timeout(BENCH_TIMEOUT[p] + 30)) for p in sorted(BENCH_SCHEMAS)
])
def test_bench_part_quick_json_schema(part: str) -> None:
    if not _have(f"pymesh.bench.{part}"):
        pytest.skip(f"pymesh/bench/{part}.py is not in this build yet")
    out = pymesh("bench", part, "--quick", "--json", *BENCH_QUICKEST[part], timeout=BENCH_TIMEOUT[part])
    assert out.returncode == 0, f"bench {part} failed:\n{out.stderr[-3000:]}"
    rows = json.loads(out.stdout)
    assert isinstance(rows, list) and rows, f"bench {part} printed no rows"
    for row in rows:
        assert isinstance(row, dict)
        missing = BENCH_SCHEMAS[part] - set(row)
        assert not missing, f"bench {part} row lacks {sorted(missing)}: {row}"
        for key in BENCH_SCHEMAS[part] - TEXT_KEYS:
            value = row[key]
            assert value is None or isinstance(value, (int, float)), f"{part}.{key} = {value!r}"
