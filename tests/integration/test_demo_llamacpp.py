"""``mw-cli demo`` with llama.cpp devices: lossless against the target alone, and its table
shows each device's drafting speed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from middleware.cli.demo import LLAMACPP_DEVICES, demo_devices
from middleware.mosquitto import mosquitto_available

pytest.importorskip("llama_cpp")
pytestmark = [pytest.mark.integration, pytest.mark.model]
CLI = [sys.executable, "-m", "middleware.cli.main"]


@pytest.mark.skipif(not mosquitto_available(), reason="the demo starts a mosquitto binary")
def test_demo_with_llamacpp_devices_is_lossless_and_shows_drafting_speed(tmp_path) -> None:
    assert demo_devices() == LLAMACPP_DEVICES  # llama_cpp is importable here
    out = subprocess.run(
        [*CLI, "demo", "--prompts", "3", "--max-new-tokens", "12", "--broker", "mosquitto"],
        capture_output=True,
        text=True,
        timeout=500,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)},  # the q4_0 copy is made here
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "every output is identical, token for token" in out.stdout
    header, *rows = [
        ln for ln in out.stdout.splitlines() if ln.startswith(("DEVICE", "pi-", "esp-"))
    ]
    assert "DRAFT TOK/S" in header
    col = header.index("DRAFT TOK/S")
    for device, drafter in LLAMACPP_DEVICES:
        (row,) = [r for r in rows if r.startswith(device + " ")]
        assert drafter in row
        speed = row[col:].split()[0]
        assert float(speed) > 0, row  # drafted tokens per second spent drafting


def test_demo_without_a_broker_runs_over_zeromq_and_is_lossless(tmp_path) -> None:
    """``--broker zmq`` (what ``auto`` picks without Mosquitto): devices connect to the
    verifier's ROUTER directly, no broker process; still identical to the target alone."""
    out = subprocess.run(
        [*CLI, "demo", "--prompts", "3", "--max-new-tokens", "8", "--broker", "zmq"],
        capture_output=True,
        text=True,
        timeout=500,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)},
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "broker: none" in out.stderr and "ZeroMQ instead" in out.stderr
    assert "every output is identical, token for token" in out.stdout
    assert out.stdout.count("[identical to target-only]") == 3
