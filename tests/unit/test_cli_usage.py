"""Bad flags and config as a user meets them: the real ``mw-cli`` in a subprocess.

Each case must end with exit code 2 and one line naming the flag or key, and do so
before anything connects or loads: the broker port is one nobody listens on (a connect
first would exit 3, "broker unreachable") and the model a path that does not exist (a
load first would exit 4, "model error"), so a check that came too late fails the test.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "middleware.cli.main"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the with block ends


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MW_")}
    full_env.update(env or {})
    port = ["--host", "127.0.0.1", "--port", str(_closed_port())]
    return subprocess.run(
        [*CLI, *args, *port], capture_output=True, text=True, env=full_env, timeout=60
    )


def _one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["node", "--temperature", "-5", "--drafter", "hf:/nonexistent"],
            "mw-cli: --temperature: must be between 0.0001 and 100, got -5",
        ),
        (
            ["node", "--max-new-tokens", "0", "--drafter", "hf:/nonexistent"],
            "mw-cli: --max-new-tokens: must be between 1 and 32768, got 0",
        ),
        (
            ["generate", "hi", "--device", "pi-1", "--max-new-tokens", "-1"],
            "mw-cli: --max-new-tokens: must be between 1 and 32768, got -1",
        ),
        (
            ["generate", "hi", "--device", "pi-1", "--session", "bad/id"],
            "mw-cli: --session: must be 1-64 characters of A-Z a-z 0-9 _ . : -, "
            "starting with a letter or digit, got 'bad/id'",
        ),
        (
            ["verifier", "--max-batch", "-3", "--model", "/nonexistent"],
            "mw-cli: --max-batch: must be between 1 and 1024, got -3",
        ),
        (["tail", "--timeout", "0"], "mw-cli: --timeout: must be > 0 seconds, got 0"),
        (["generate", "  ", "--device", "pi-1"], "mw-cli: prompt: must not be empty"),
    ],
)
def test_a_bad_flag_is_one_line_naming_it_and_exit_2(args: list[str], line: str) -> None:
    assert _one_line(_run(args)) == line


def test_bad_config_values_are_refused_before_the_model_loads(tmp_path: Path) -> None:
    cfg = tmp_path / "mw.toml"
    cfg.write_text('[verifier]\nmax_batch = -3\nmodel = "/nonexistent"\n')
    line = _one_line(_run(["verifier", "--config", str(cfg)]))
    assert line == "mw-cli: [verifier] max_batch: must be between 1 and 1024, got -3"
    cfg.write_text('[node]\nmode = "lossy"\ntokenizer = "/nonexistent"\n')
    line = _one_line(_run(["node", "--config", str(cfg)]))
    assert line == "mw-cli: [node] mode: must be one of greedy, coupled, rejection, got 'lossy'"
    cfg.write_bytes(b'[node]\nid = "caf\xe9"\n')
    assert _one_line(_run(["node", "--config", str(cfg)])).endswith(
        "mw.toml: not UTF-8 text (byte 16: b'\\xe9')"
    )


def test_an_environment_typo_names_the_variable() -> None:
    line = _one_line(_run(["node"], env={"MW_BUS_HOTS": "broker.local"}))
    assert line.startswith("mw-cli: environment variable MW_BUS_HOTS: unknown key [bus] hots")
