"""With stderr on a pipe (journald), every stderr line is JSON: structlog events, stdlib
logging from libraries and Python warnings alike (structlog's stdlib bridge)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SNIPPET = """
import logging, warnings
from middleware.logs import configure_logging
import structlog
configure_logging(level="info")
structlog.get_logger("mw").info("ours", device="pi-1")
logging.getLogger("transformers.modeling_utils").warning("a library's %s", "warning")
warnings.warn("a Python warning", DeprecationWarning, stacklevel=1)
warnings.warn("a user warning")
"""


def _json_lines(stderr: str) -> list[dict]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "\r" not in stderr  # no progress bars
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise AssertionError(f"not JSON: {line!r}") from exc
    return out


def test_stdlib_logging_and_warnings_are_json_on_a_pipe() -> None:
    env = {**os.environ, "PYTHONWARNINGS": "always"}
    r = subprocess.run(
        [sys.executable, "-c", SNIPPET], capture_output=True, text=True, timeout=120, env=env
    )
    assert r.returncode == 0, r.stderr
    events = _json_lines(r.stderr)
    text = " ".join(e["event"] for e in events)
    assert "ours" in text and "a library's warning" in text and "a user warning" in text
    assert all("level" in e and "timestamp" in e for e in events)


def test_cli_command_stderr_is_all_json(mosquitto) -> None:
    cmd = [sys.executable, "-m", "middleware.cli.main", "decommission", "pi-x"]
    cmd += ["--host", mosquitto.host, "--port", str(mosquitto.port), "--prefix", "mw/test-logs"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    events = _json_lines(r.stderr)
    assert any(e["event"] == "decommissioned" and e["device"] == "pi-x" for e in events)
