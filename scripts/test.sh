#!/usr/bin/env bash
# Set everything up, then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYMESH_REQUIRE_C=1
export OMP_WAIT_POLICY=PASSIVE
exec .venv/bin/python -m pytest -q "$@"
