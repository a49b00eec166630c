"""mw-cli tools as real subprocesses: connecting honours --timeout quietly, environment
errors name the variable, and ``generate`` keeps provisional text out of a pipe.

For ``generate`` the test plays the device on a real Mosquitto: it answers the prompt that
arrives in the device's inbox with a scripted text stream (provisional text, a
confirmation, a correction, provisional text never verified) encoded by the project's own
codec, then the result.  What is under test is the rendering, which depends on the chunk
kinds, not on a model."""

from __future__ import annotations

import asyncio
import os
import pty
import socket
import subprocess
import sys
from typing import Any

import pytest

from middleware.broker_bridge.mqtt import MqttBus
from middleware.cli.render import CORRECTION_MARK, DIM, YELLOW
from middleware.protocol import DeviceStatus, PromptRequest, Result, TextChunk, Topics

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "middleware.cli.main"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MW_CONFIG" and k != "NO_COLOR"}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_on_pty(cmd: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    """Run with stdout and stderr on a pseudo-terminal (as a person at a shell); all output."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        cmd, stdout=follower, stderr=follower, stdin=subprocess.DEVNULL, env=env
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return proc.wait(timeout), b"".join(chunks).decode("utf-8", "replace")


def test_unreachable_broker_is_one_line_and_exit_3_within_timeout() -> None:
    port = _closed_port()
    common = ["--host", "127.0.0.1", "--port", str(port)]
    for args in (
        ["stats", "--timeout", "2"],
        ["sessions", "--timeout", "2"],
        ["tail", "--timeout", "2"],
        ["generate", "hi", "--device", "pi-1", "--timeout", "2"],
        ["decommission", "pi-1", "--timeout", "2"],
    ):
        r = subprocess.run(
            [*CLI, *args, *common], capture_output=True, text=True, timeout=60, env=_env()
        )
        assert r.returncode == 3, (args, r.stderr)
        lines = r.stderr.splitlines()
        assert len(lines) == 1, (args, r.stderr)  # no JSON retry warnings while waiting
        assert lines[0].startswith("mw-cli: broker unreachable: no connection to 127.0.0.1:")
        assert f":{port} " in lines[0] and "limit 2 s" in lines[0], lines[0]
        assert not r.stdout


def test_connecting_is_quiet_on_a_terminal() -> None:
    rc, out = _run_on_pty([*CLI, "stats", "--timeout", "2", "--port", str(_closed_port())], _env())
    assert rc == 3
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and "broker unreachable" in lines[0], out


def test_environment_errors_name_the_variable() -> None:
    port = str(_closed_port())  # exit 2 rather than 3 shows nothing tried to connect
    for var, value, expect in (
        ("MW_BUS_HOTS", "broker.local", "environment variable MW_BUS_HOTS: unknown key"),
        ("MW_BUS_PORT", "abc", "environment variable MW_BUS_PORT ([bus] port)"),
        ("MW_BUSS_HOST", "broker.local", "MW_BUSS_HOST: unknown section 'buss'; did you mean"),
        ("MW_NOD_ID", "pi-1", "MW_NOD_ID: unknown section 'nod'; did you mean MW_NODE_ID?"),
    ):
        r = subprocess.run(
            [*CLI, "stats", "--timeout", "2", "--port", port],
            capture_output=True,
            text=True,
            timeout=60,
            env=_env(**{var: value}),
        )
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and expect in r.stderr, r.stderr


COMMITTED = "MQTT is a lightweight protocol."
NEVER_VERIFIED = " It is"


async def _play_device(bus: MqttBus, t: Topics, device: str) -> None:
    """Answer the next inbox prompt with a scripted stream, then the result."""
    async with bus.subscribe(t.device_inbox(device)) as inbox:
        msg = await inbox.get(60)
    req = PromptRequest.parse(msg.payload)
    assert req.session_id
    sid = req.session_id
    script = [
        ("verified", 0, 3, "MQTT is"),
        ("provisional", 3, 2, " a lig"),
        ("provisional", 5, 2, "hter protocol"),
        ("confirmed", 3, 2, " a lig"),  # the first two provisional tokens were right
        ("correction", 5, 2, "htweight protocol"),  # the next two were not
        ("verified", 7, 1, "."),
        ("provisional", 8, 2, NEVER_VERIFIED),  # released, never verified
    ]
    topic = t.session(device, sid, "text")
    for seq, (kind, pos, n, text) in enumerate(script, 1):
        chunk = TextChunk(sid, device, seq, kind, pos, n, text)  # type: ignore[arg-type]
        await bus.publish(topic, chunk.encode(), qos=1)
    final = TextChunk(sid, device, len(script) + 1, "verified", 8, 0, "", final=True)
    await bus.publish(topic, final.encode(), qos=1)
    result = Result(
        session_id=sid,
        device_id=device,
        text=COMMITTED + NEVER_VERIFIED,
        n_tokens=10,
        finish_reason="length",
        verified=False,
        request=req.request_id,
    )
    await bus.publish(t.session(device, sid, "result"), result.encode(), qos=1, retain=True)


async def _generate_against_scripted_device(
    mosquitto: Any, mqtt_settings: Any, prefix: str, device: str, *, terminal: bool
) -> tuple[int, str, str]:
    t = Topics(prefix)
    common = ["--host", mosquitto.host, "--port", str(mosquitto.port), "--prefix", prefix]
    cmd = [*CLI, "generate", "What is MQTT?", "--device", device, "--timeout", "60", *common]
    async with MqttBus(mqtt_settings(client_id=f"dev-{prefix[-8:]}")) as bus:
        status = DeviceStatus(device_id=device, state="online", drafter="ngram", at=1.7e9)
        await bus.publish(t.device_status(device), status.encode(), qos=1, retain=True)
        device_task = asyncio.create_task(_play_device(bus, t, device))
        if terminal:
            rc, out = await asyncio.to_thread(_run_on_pty, cmd, _env())
            err = ""
        else:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=_env(),
            )
            stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
            rc, out, err = proc.returncode or 0, stdout.decode(), stderr.decode()
        await asyncio.wait_for(device_task, 10)
        await bus.publish(t.device_status(device), b"", qos=1, retain=True)
    return rc, out, err


async def test_generate_piped_prints_verified_text_only(
    mosquitto, mqtt_settings, unique_prefix
) -> None:
    rc, out, err = await _generate_against_scripted_device(
        mosquitto, mqtt_settings, unique_prefix, "pi-pipe", terminal=False
    )
    assert rc == 0, err
    assert out == COMMITTED  # no provisional words, no corrections twice, no escape codes
    assert f"{len(NEVER_VERIFIED)} characters of provisional text were never verified" in err
    assert "verified=False" in err


async def test_generate_on_a_terminal_marks_provisional_and_corrections(
    mosquitto, mqtt_settings, unique_prefix
) -> None:
    rc, out, _ = await _generate_against_scripted_device(
        mosquitto, mqtt_settings, unique_prefix, "pi-tty", terminal=True
    )
    assert rc == 0, out
    assert f"{DIM} a lig" in out and f"{DIM}hter protocol" in out
    assert f"{YELLOW}{CORRECTION_MARK}htweight protocol" in out
    assert out.count(" a lig") == 1  # confirmed text is not printed a second time
    assert f"{DIM}{NEVER_VERIFIED}" in out
