#!/usr/bin/env bash
# Create .venv at the repository root and install the project with every extra and test tool.
# Idempotent: a second run only installs what changed. Needs Python 3.11 and the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
# torch first and pinned: the CPU wheel on disk; a looser pin would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q -e ".[all,dev]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch, monai, trainer; print(f'setup ok: torch {torch.__version__}, monai {monai.__version__}')"
