#!/usr/bin/env bash
# README command 1: set up .venv, then run the main job on embedded defaults (scripts/demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python scripts/demo.py "$@"
