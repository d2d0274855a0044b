#!/usr/bin/env bash
# Create ./.venv (if missing) and install pymesh into it, with its test extras.
# torch: the CPU build 2.13.0 (a wheel on this machine's disk) unless a torch is
# already importable in the venv. Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv"
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing torch==2.13.0 (CPU build)"
    "$VPY" -m pip install -q "torch==2.13.0"
fi
stamp=.venv/.pymesh-installed
if [ ! -f "$stamp" ] || [ -n "$(find pyproject.toml CMakeLists.txt csrc -newer "$stamp" -print -quit 2>/dev/null)" ]; then
    echo "[setup] installing pymesh (builds the C++ extension pymesh._C)"
    "$VPY" -m pip install -q -e ".[test]"
    touch "$stamp"
fi
# tests/nat builds NAT routers in network namespaces with nftables: install Debian's nftables when
# `nft` is missing and we are root. A failure here only makes those tests skip, so setup goes on.
if ! command -v nft >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "[setup] note: nft missing (needs root and apt-get to install nftables): tests/nat will skip" >&2
    elif ! nft_log=$(apt-get install -y -q nftables 2>&1) \
            && ! nft_log=$(apt-get update -q 2>&1 && apt-get install -y -q nftables 2>&1); then
        echo "[setup] warning: 'apt-get install -y nftables' failed, tests/nat will skip:" >&2
        echo "$nft_log" | tail -n 3 >&2
    else
        echo "[setup] installed nftables (nft) for tests/nat"
    fi
fi
"$VPY" -c "import pymesh._C" || { echo "[setup] error: pymesh._C failed to import after the build" >&2; exit 1; }
echo "[setup] ready: $(.venv/bin/pymesh --version)"
