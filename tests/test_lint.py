"""The linter and the type checker, run as tests so the README's test command (CI) runs them.

Their settings live in pyproject.toml (`[tool.ruff]`, `[tool.mypy]`); both are pinned in the `dev` extra.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    """The tool installed beside this interpreter (the project's venv), else on PATH."""
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.is_file() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed: pip install -e '.[dev]'")
    return found


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # check this checkout, not an installed copy
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing():
    result = _run([_tool("ruff"), "check", "--no-cache", "."])
    assert result.returncode == 0, result.stdout + result.stderr


def test_code_is_formatted_by_ruff():
    result = _run([_tool("ruff"), "format", "--check", "--no-cache", "."])
    assert result.returncode == 0, "run `ruff format .`:\n" + result.stdout + result.stderr


@pytest.mark.slow  # ~50 s from a cold cache on 2 cores
def test_mypy_finds_nothing():
    # mypy's incremental cache lives in .mypy_cache (git-ignored): a second run takes seconds.
    result = _run([_tool("mypy")])
    assert result.returncode == 0, result.stdout + result.stderr
