"""deploy/integrations/node-red: the flow runs in the real Node-RED (npm ``node-red``,
installed by ``scripts/run.sh test`` under ``.cache/node-red``) against a real Mosquitto.

The test loads the committed flow file unchanged (broker from the process environment,
prefix ``mw/v1``, device ``pi-1``), publishes a device's retained status, then text chunks
and a result encoded by the project's own codec (the wire format of docs/asyncapi.yaml),
and reads what the flow assembled from its ``GET /mw/text?format=json`` endpoint:
verified text apart from provisional text, a correction replacing the provisional part."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from middleware.protocol import DeviceStatus, Result, TextChunk, Topics

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FLOW = ROOT / "deploy" / "integrations" / "node-red" / "mw-text-flow.json"
DEVICE, SESSION = "pi-1", "s-nodered"


def _red_js() -> list[str]:
    """The command that starts Node-RED: ``$NODE_RED_BIN``, the copy scripts/run.sh installs,
    or ``node-red`` on PATH; skipped (failed in CI) when none is there."""
    env = os.environ.get("NODE_RED_BIN")
    if env:
        return [env]
    local = ROOT / ".cache" / "node-red" / "node_modules" / "node-red" / "red.js"
    node = shutil.which("node")
    if local.is_file() and node:
        return [node, str(local)]
    if shutil.which("node-red"):
        return ["node-red"]
    reason = "Node-RED not installed: `bash scripts/run.sh install` puts it in .cache/node-red"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _wait_for(what: str, probe: Callable[[], Any], log: Path, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
            if last:
                return last
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.3)
    pytest.fail(f"{what}: not seen within {timeout:.0f} s; last {last!r}\n{log.read_text()}")


@pytest.fixture
def node_red(fresh_mosquitto: Any, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    cmd = _red_js()
    port = _free_port()
    log = tmp_path / "node-red.log"
    env = {
        **os.environ,
        "MW_BROKER_HOST": fresh_mosquitto.host,
        "MW_BROKER_PORT": str(fresh_mosquitto.port),
        "NODE_RED_ENABLE_PROJECTS": "false",
    }
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*cmd, "--userDir", str(tmp_path / "userdir"), "--port", str(port), str(FLOW)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        yield f"http://127.0.0.1:{port}", log
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _publisher(broker: Any) -> paho.Client:
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.connect(broker.host, broker.port)
    c.loop_start()
    return c


def test_flow_shows_verified_provisional_and_corrections(
    node_red: tuple[str, Path], fresh_mosquitto: Any
) -> None:
    base, log = node_red
    t = Topics("mw/v1")
    pub = _publisher(fresh_mosquitto)
    try:
        status = DeviceStatus(device_id=DEVICE, state="online", drafter="ngram", at=time.time())
        pub.publish(t.device_status(DEVICE), status.encode(), qos=1, retain=True).wait_for_publish()
        # The retained status reaches the flow once its subscriptions are up: the signal
        # that Node-RED loaded the flow, connected and subscribed.
        _wait_for(
            "device status in the flow",
            lambda: _get_json(f"{base}/mw/text?format=json")["devices"].get(DEVICE),
            log,
            timeout=120.0,  # Node-RED starts in ~3 s idle; far longer on a loaded machine
        )

        seq = iter(range(1, 100))

        def chunk(kind: str, pos: int, n: int, text: str, final: bool = False) -> None:
            c = TextChunk(SESSION, DEVICE, next(seq), kind, pos, n, text, final)  # type: ignore[arg-type]
            topic = t.session(DEVICE, SESSION, "text")
            pub.publish(topic, c.encode(), qos=1).wait_for_publish()

        def session() -> Any:
            return _get_json(f"{base}/mw/text?format=json")["sessions"].get(f"{DEVICE}/{SESSION}")

        chunk("verified", 0, 3, "MQTT is")
        chunk("provisional", 3, 2, " a lig")
        chunk("provisional", 5, 2, "hter protocol")
        # Both provisional chunks in (they arrive in order on one topic).
        s = _wait_for(
            "both provisional chunks",
            lambda: (x := session()) and x["provisional"] == " a lighter protocol" and x,
            log,
        )
        assert s["verified"] == "MQTT is"
        assert s["text"] == "MQTT is a lighter protocol"
        assert s["done"] is False

        chunk("confirmed", 3, 2, " a lig")
        chunk("correction", 5, 2, "htweight protocol")
        chunk("verified", 7, 1, ".")
        s = _wait_for("the correction", lambda: (x := session()) and x["corrections"] and x, log)
        s = _wait_for(
            "the last chunk", lambda: (x := session()) and x["text"].endswith(".") and x, log
        )
        assert s["verified"] == "MQTT is a lightweight protocol."
        assert s["provisional"] == ""
        assert s["corrections"] == 1

        result = Result(
            session_id=SESSION,
            device_id=DEVICE,
            text="MQTT is a lightweight protocol.",
            n_tokens=8,
            finish_reason="stop",
            verified=True,
        )
        topic = t.session(DEVICE, SESSION, "result")
        pub.publish(topic, result.encode(), qos=1, retain=True).wait_for_publish()
        s = _wait_for("the result", lambda: (x := session()) and x["done"] and x, log)
        assert s["result_verified"] is True
        assert s["finish_reason"] == "stop"
        assert s["text"] == result.text

        # The HTML page renders the same session (escaped), for a browser.
        with urllib.request.urlopen(f"{base}/mw/text", timeout=5) as r:
            page = r.read().decode()
        assert "MQTT is a lightweight protocol." in page and "pi-1/s-nodered" in page
    finally:
        pub.loop_stop()
        pub.disconnect()
    text = log.read_text()
    assert "[error]" not in text, text
    assert "Waiting for missing types" not in text, text
