#!/usr/bin/env bash
# Set everything up, type-check the package (mypy --strict), then run the whole test suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYMESH_REQUIRE_C=1
export OMP_WAIT_POLICY=PASSIVE
echo "[test] mypy (strict, the whole package; see [tool.mypy] in pyproject.toml)"
.venv/bin/python -m mypy
exec .venv/bin/python -m pytest -q "$@"
