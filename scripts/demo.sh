#!/usr/bin/env bash
# Set everything up, then run the main job: a local swarm (a bootstrap node and three
# workers on loopback) serving the embedded SmolLM2-135M-Instruct and answering chat
# prompts through it. Extra arguments go to `pymesh demo` (e.g. --interactive).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_WAIT_POLICY=PASSIVE
exec .venv/bin/pymesh demo "$@"
