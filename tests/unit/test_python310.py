"""What a device runs needs at most Python 3.10 (JetPack 6's), checked statically with vermin.

No 3.10 interpreter can be installed here (the package registries reached carry none), so
this is vermin's minimum-version analysis of the device-side modules: node, drafters,
protocol, transports and bridge, the GGUF tokenizer, and the CLI's service and tool
commands.  The 3.11 names that ``middleware/compat.py`` backports on 3.10 are excluded
(and only those); anything else newer than 3.10 fails here with vermin's own report.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from middleware.compat import BACKPORTED

ROOT = Path(__file__).resolve().parents[2]
DEVICE_SIDE = (
    "middleware/__init__.py",
    "middleware/compat.py",
    "middleware/config.py",
    "middleware/errors.py",
    "middleware/logs.py",
    "middleware/metrics.py",
    "middleware/systemd.py",
    "middleware/sampling.py",  # torch drafters (coupled mode) on a Jetson
    "middleware/nodes",
    "middleware/protocol",
    "middleware/broker_bridge",
    "middleware/models",
    "middleware/cli/__init__.py",
    "middleware/cli/main.py",
    "middleware/cli/render.py",
    "middleware/cli/services.py",
    "middleware/cli/tools.py",
)


# Target 3.10 or lower; report only what violates it; evaluate annotations (``Self``).
FLAGS = ("-t=3.10-", "--violations", "--eval-annotations", "--no-tips", "--no-parse-comments", "-q")


def vermin() -> list[str]:
    exe = shutil.which("vermin", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("vermin is not installed: pip install 'edge-specdec-middleware[test]'")
    return [exe]


def run_vermin(*paths: str) -> subprocess.CompletedProcess[str]:
    excludes = [arg for name in BACKPORTED for arg in ("--exclude", name)]
    return subprocess.run(
        [*vermin(), *FLAGS, *excludes, *paths],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def test_device_side_code_needs_at_most_python_3_10() -> None:
    missing = [p for p in DEVICE_SIDE if not (ROOT / p).exists()]
    assert not missing, missing
    out = run_vermin(*DEVICE_SIDE)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_check_can_fail(tmp_path: Path) -> None:
    """A 3.11-only feature that compat.py does not backport is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("import asyncio\nasync def f():\n    return asyncio.Runner\n")
    (tmp_path / "worse.py").write_text("from enum import StrEnum\n")
    out = run_vermin(str(bad), str(tmp_path / "worse.py"))
    assert out.returncode != 0
    assert "StrEnum" in out.stdout
