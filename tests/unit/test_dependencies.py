"""No dead dependencies: every base dependency in pyproject.toml is imported by the package
(aiomqtt was declared and never imported; it was dropped, see README "Why paho and not
aiomqtt")."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Distribution name -> the module it installs, where they differ.
MODULE = {"paho-mqtt": "paho", "pyzmq": "zmq", "prometheus-client": "prometheus_client"}


def _imported() -> set[str]:
    found = set()
    for path in (ROOT / "middleware").rglob("*.py"):
        for m in re.finditer(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", path.read_text(), re.M):
            found.add(m.group(1))
    return found


def test_every_base_dependency_is_imported() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0].lower() for d in deps]
    modules = {n: MODULE.get(n, n.replace("-", "_")) for n in names}
    imported = _imported()
    assert "aiomqtt" not in names
    dead = {n for n, mod in modules.items() if mod not in imported}
    assert not dead, f"declared in pyproject.toml, never imported by middleware/: {dead}"
