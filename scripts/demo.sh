#!/usr/bin/env bash
# README command 1: set up .venv, then run the main job on embedded defaults (scripts/demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# A local, single-machine Ray: keep it on loopback.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=${RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER:-0}
exec .venv/bin/python scripts/demo.py "$@"
