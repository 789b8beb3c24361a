#!/usr/bin/env bash
# Build the separate virtual environment that holds the peer libraries for benchmarks/peers.py.
#
# Peers (Kronfluence, LogIX, TRAK) are never dependencies of dataworth and are never imported by it: they
# live only in benchmarks/_peers_venv (git-ignored). dataworth itself is installed there editable so each
# adapter in benchmarks/peers/ builds exactly the same batches (tokenisation, loss masks, summed loss).
#
#   bash benchmarks/peers_setup.sh            # idempotent; re-running only re-checks the imports
#
# Notes on the one pip command below:
# - torch==2.13.0 is named in the same command as the peers so the resolver cannot swap torch (the CPU
#   wheel lies on local disk here).
# - logix-ai declares Requires-Python < 3.11 but imports and runs on 3.11, hence --ignore-requires-python;
#   that flag also lets pip pick sdists whose wheels need a newer Python (numpy 2.5 tried to build from
#   source), hence --prefer-binary.
# - traker is installed without the [fast] extra: its fast_jl CUDA extension cannot build on a CPU machine;
#   the benchmark uses TRAK's pure-torch projector instead.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
VENV="${PEERS_VENV:-$HERE/_peers_venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.peers-installed"

if [ ! -f "$STAMP" ]; then
  test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q --ignore-requires-python --prefer-binary \
    "torch==2.13.0" kronfluence logix-ai traker -e "$ROOT"
  # PyPI torchvision breaks imports beside torch 2.13.0; make sure nothing dragged it in.
  "$VENV/bin/python" -m pip uninstall -y -q torchvision 2>/dev/null || true
  touch "$STAMP"
fi
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
for dist, mod in [("torch", "torch"), ("kronfluence", "kronfluence"), ("logix-ai", "logix"),
                  ("traker", "trak"), ("dataworth", "dataworth")]:
    __import__(mod)
    print(f"{dist}=={md.version(dist)}")
PY
