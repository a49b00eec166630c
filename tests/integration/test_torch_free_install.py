"""A device and tools install without torch: ``pip install .`` with no extras, in a fresh venv.

The venv gets the package's base dependencies from PyPI (about 40 s with a warm pip cache)
and must run, with neither torch nor transformers importable: an n-gram device
(``mw-cli node --drafter ngram``, tokenizer read from the GGUF), ``generate`` against it,
``tail``, ``sessions``, ``stats``, and the ZeroMQ transport and bridge.  The verifier runs from
the test's own interpreter (it needs torch), so generation is end to end over Mosquitto.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

from middleware.models.loading import smollm2_gguf_path
from middleware.mosquitto import free_port
from middleware.protocol import Topics

pytestmark = [pytest.mark.integration, pytest.mark.model]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("torchfree")
    src = root / "src"
    # A copy of the sources, so the build writes nothing into the checkout.
    shutil.copytree(REPO / "middleware", src / "middleware")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    proc = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(src)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return env_dir


def _cli(env_dir: Path) -> str:
    return str(env_dir / "bin" / "mw-cli")


def _bus(port: int, prefix: str) -> list[str]:
    return ["--host", "127.0.0.1", "--port", str(port), "--prefix", prefix]


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MW_CONFIG")}
    return env


def test_no_torch_in_the_venv(light_venv: Path) -> None:
    py = str(light_venv / "bin" / "python")
    code = (
        "import importlib.util as u, sys; "
        "sys.exit(any(u.find_spec(m) for m in ('torch', 'transformers')))"
    )
    assert subprocess.run([py, "-c", code], timeout=60).returncode == 0


@pytest.fixture
def verifier(mosquitto, unique_prefix: str) -> Iterator[subprocess.Popen[str]]:
    env = {**_clean_env(), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "middleware.cli.main",
            "verifier",
            "--id",
            "v1",
            *_bus(mosquitto.port, unique_prefix),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield proc
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return out or "", err or ""


def test_ngram_device_and_tools_without_torch(
    light_venv: Path, mosquitto, unique_prefix: str, verifier: subprocess.Popen[str]
) -> None:
    cli, env, bus = _cli(light_venv), _clean_env(), _bus(mosquitto.port, unique_prefix)
    gguf = str(smollm2_gguf_path())
    node = subprocess.Popen(
        [cli, "node", "--id", "pi1", "--drafter", "ngram", "--tokenizer", gguf, "--serve", *bus],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    tail = subprocess.Popen(
        [cli, "tail", "--json", "--timeout", "240", *bus],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Both services announce themselves with retained status; wait for both.
        t = Topics(unique_prefix)
        for topic in (t.verifier_status("v1"), t.device_status("pi1")):
            sub = subprocess.run(
                [
                    "mosquitto_sub",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(mosquitto.port),
                    "-t",
                    topic,
                    "-C",
                    "1",
                    "-W",
                    "180",
                ],
                capture_output=True,
                text=True,
                timeout=200,
            )
            assert sub.returncode == 0, (topic, node.poll(), sub.stderr)
        stats = subprocess.run(
            [cli, "stats", "--json", "--wait", "0.5", *bus],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert stats.returncode == 0, stats.stderr[-2000:]

        gen = subprocess.run(
            [
                cli,
                "generate",
                "The capital of France is",
                "--device",
                "pi1",
                "--session",
                "s1",
                "--max-new-tokens",
                "8",
                "--timeout",
                "120",
                *bus,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert gen.returncode == 0, gen.stderr[-3000:]
        assert gen.stdout.strip(), "no text generated"

        ses = subprocess.run(
            [cli, "sessions", "--json", "--wait", "1", *bus],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ses.returncode == 0, ses.stderr[-2000:]
        assert "s1" in {json.loads(line)["session"] for line in ses.stdout.splitlines()}
    finally:
        _, node_err = _stop(node)
        tail_out, tail_err = _stop(tail)
    assert "Traceback" not in node_err, node_err[-3000:]
    assert "Traceback" not in tail_err, tail_err[-3000:]
    assert "/s1/" in tail_out, tail_out[-2000:]


_ZMQ_VERIFIER_SOCKET = """
import asyncio, sys
from middleware.broker_bridge.zmq import ZmqServerBus, ZmqServerSettings

async def main():
    async with ZmqServerBus(ZmqServerSettings(bind=sys.argv[1])):
        await asyncio.Event().wait()

asyncio.run(main())
"""


def test_zmq_transport_and_bridge_without_torch(
    light_venv: Path, mosquitto, unique_prefix: str
) -> None:
    """The bridge and the ZeroMQ transport (here a verifier's ROUTER standing alone: the
    verifier itself needs torch) run from the torch-free install."""
    cli, env = _cli(light_venv), _clean_env()
    zport = free_port("127.0.0.1")
    verifier_socket = subprocess.Popen(
        [
            str(light_venv / "bin" / "python"),
            "-c",
            _ZMQ_VERIFIER_SOCKET,
            f"tcp://127.0.0.1:{zport}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    bridge = subprocess.Popen(
        [
            cli,
            "bridge",
            "--zmq-endpoints",
            f"tcp://127.0.0.1:{zport}",
            *_bus(mosquitto.port, unique_prefix),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(5)  # both import, bind/connect and settle; a missing module dies at once
    alive = verifier_socket.poll() is None, bridge.poll() is None
    (_, v_err), (_, bridge_err) = _stop(verifier_socket), _stop(bridge)
    assert alive == (True, True), (v_err[-2000:], bridge_err[-2000:])
    assert "ModuleNotFoundError" not in v_err + bridge_err
