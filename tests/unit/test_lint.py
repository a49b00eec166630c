"""Lint as part of the test suite (CI runs the README's test command): ruff's rules and
formatting over the tree, and mypy over the package.  Versions are pinned in the
``test`` extra, so a new release cannot turn CI red without a change here."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TREE = ["middleware", "tests", "bench"]


def _tool(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    found = str(exe) if exe.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (the test extra installs it)")
    return found


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_ruff_check() -> None:
    r = _run(_tool("ruff"), "check", *TREE)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_ruff_format() -> None:
    r = _run(_tool("ruff"), "format", "--check", *TREE)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_mypy() -> None:
    r = _run(_tool("mypy"), "middleware")
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
