"""`mw-cli tail --json` on a real Mosquitto: wire (AsyncAPI) field names, and inbox prompts
decoded whether sent as plain text or JSON."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from middleware.broker_bridge.mqtt import MqttBus
from middleware.protocol import TextChunk, Topics


async def test_tail_json_uses_wire_names_and_decodes_prompts(
    mosquitto, mqtt_settings, unique_prefix
) -> None:
    t = Topics(unique_prefix)
    cmd = [sys.executable, "-m", "middleware.cli.main", "tail", "all", "--json"]
    cmd += ["--count", "3", "--timeout", "60", "--host", mosquitto.host]
    cmd += ["--port", str(mosquitto.port), "--prefix", unique_prefix]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        async with MqttBus(mqtt_settings(client_id=f"t-{unique_prefix[-8:]}")) as bus:
            chunk = TextChunk(
                session_id="s-1", device_id="pi-1", seq=0, kind="verified", pos=0, n_tokens=2,
                text="hi", final=False,
            )  # fmt: skip
            assert proc.stderr is not None  # its first line: subscribed (JSON on a pipe)
            first = await asyncio.wait_for(proc.stderr.readline(), 60)
            assert json.loads(first)["event"] == "tail_subscribed"
            await bus.publish(t.device_inbox("pi-1"), b"What is MQTT?", qos=1)
            await bus.publish(
                t.device_inbox("pi-1"),
                json.dumps({"prompt": "Hello", "session": "s-2"}).encode(),
                qos=1,
            )
            await bus.publish(t.session("pi-1", "s-1", "text"), chunk.encode(), qos=1)
            out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    rows = [json.loads(line) for line in out.decode().splitlines()]
    assert [r["type"] for r in rows] == ["prompt", "prompt", "text"], err.decode()
    assert rows[0]["msg"]["prompt"] == "What is MQTT?" and "error" not in rows[0]
    assert rows[1]["msg"] == {"prompt": "Hello", "session": "s-2", "max_new_tokens": None}
    assert rows[2]["msg"]["session"] == "s-1" and rows[2]["msg"]["n"] == 2
    assert "session_id" not in rows[2]["msg"] and "n_tokens" not in rows[2]["msg"]
