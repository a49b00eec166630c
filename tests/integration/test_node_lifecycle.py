"""``mw-cli node --serve`` as systemd runs it: refusals end one session, never the node;
fatal errors end it with a non-zero exit code (``Restart=on-failure`` then restarts it).

The node is a real ``mw-cli`` process on a real Mosquitto; the verifier runs in this
process (the real VerifierService with a tiny random model whose vocabulary is SmolLM2's,
so the node's SmolLM2 token ids are valid for it): refusals do not depend on the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from middleware.broker_bridge.bus import CONTENT_JSON, CONTENT_MSGPACK
from middleware.broker_bridge.mqtt import MqttBus, MqttSettings
from middleware.models.loading import load_tokenizer
from middleware.mosquitto import MosquittoProcess, mosquitto_available
from middleware.protocol import (
    CloseSession,
    DeviceStatus,
    OpenSession,
    PromptRequest,
    Result,
    Topics,
    Verdict,
    decode,
)
from middleware.verifier.engine import TargetEngine
from middleware.verifier.service import VerifierConfig, VerifierService
from tests.unit.tiny import tiny_llama

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "middleware.cli.main"]
SMOLLM2_VOCAB = 49_152
DEADLINE_S = 180.0  # a deadline for hangs, not a speed target


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MW_")}
    env.update(MW_LOG_JSON="true", PYTHONUNBUFFERED="1")
    return env


def _node(broker: Any, prefix: str, device: str, log: Path, *extra: str) -> subprocess.Popen:
    args = ["--host", broker.host, "--port", str(broker.port), "--prefix", prefix]
    args += ["--id", device, "--drafter", "ngram", "--max-new-tokens", "6", *extra]
    return subprocess.Popen(
        [*CLI, "node", "--serve", *args],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=_env(),
    )


async def _exit_code(proc: subprocess.Popen, within: float = DEADLINE_S) -> int | None:
    try:
        return await asyncio.wait_for(asyncio.to_thread(proc.wait), within)
    except TimeoutError:
        return None


def _tail(log: Path) -> str:
    return _tail(log)


@pytest.fixture(scope="module")
def smollm2_fp() -> str:
    return load_tokenizer("smollm2")[1]


@pytest.fixture(scope="module")
def wide_tiny() -> Any:
    return tiny_llama(seed=0, vocab=SMOLLM2_VOCAB)


class Rig:
    """A verifier in this process, a test client, and the node under test."""

    def __init__(self, broker: Any, prefix: str, client: MqttBus, tmp: Path) -> None:
        self.broker, self.prefix, self.client, self.tmp = broker, prefix, client, tmp
        self.t = Topics(prefix)

    async def wait_online(self, device: str, proc: subprocess.Popen, log: Path) -> None:
        async with self.client.subscribe(self.t.device_status(device)) as sub:
            deadline = time.monotonic() + DEADLINE_S
            while time.monotonic() < deadline:
                assert proc.poll() is None, _tail(log)
                try:
                    msg = await sub.get(0.5)
                except TimeoutError:
                    continue
                if decode(msg.payload, expect=DeviceStatus).state == "online":
                    return
        raise AssertionError(f"node never online:\n{_tail(log)}")

    async def prompt(self, device: str, sid: str, text: str = "Hello there") -> Result:
        async with self.client.subscribe(self.t.session(device, sid, "result")) as sub:
            req = PromptRequest(prompt=text, session_id=sid)
            await self.client.publish(
                self.t.device_inbox(device), req.encode(), qos=1, content_type=CONTENT_JSON
            )
            msg = await sub.get(DEADLINE_S)
        return decode(msg.payload, expect=Result)

    async def squat(self, fp: str, sid: str = "squat-1", device: str = "squatter") -> None:
        """Open a session from another device and keep it: the verifier is then full."""
        async with self.client.subscribe(self.t.session(device, sid, "verdict")) as sub:
            await self.client.publish(
                self.t.session(device, sid, "open"),
                OpenSession(sid, device, 1, 1, fp, (1, 2, 3)).encode(),
                qos=1,
                content_type=CONTENT_MSGPACK,
            )
            v = decode((await sub.get(DEADLINE_S)).payload, expect=Verdict)
        assert v.kind == "opened", v

    async def unsquat(self, sid: str = "squat-1", device: str = "squatter") -> None:
        await self.client.publish(
            self.t.session(device, sid, "draft"),
            CloseSession(sid, 1, 2, "done").encode(),
            qos=1,
            content_type=CONTENT_MSGPACK,
        )


@contextlib.asynccontextmanager
async def _rig(mosquitto: Any, tmp: Path, model: Any, fp: str, **vcfg: Any) -> AsyncIterator[Rig]:
    prefix = f"mw/test-life-{uuid.uuid4().hex[:8]}"
    settings = MqttSettings(host=mosquitto.host, port=mosquitto.port)
    async with (
        MqttBus(settings) as vbus,
        MqttBus(MqttSettings(host=mosquitto.host, port=mosquitto.port)) as client,
    ):
        verifier = VerifierService(
            vbus,
            TargetEngine(model),
            tokenizer_fingerprint=fp,
            config=VerifierConfig(verifier_id="v-life", prefix=prefix, **vcfg),
        )
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(verifier.run())
            await verifier.ready.wait()
            try:
                yield Rig(mosquitto, prefix, client, tmp)
            finally:
                task.cancel()


async def test_a_refused_session_ends_with_a_failed_result_and_the_node_keeps_serving(
    mosquitto, tmp_path: Path, wide_tiny, smollm2_fp: str
) -> None:
    """The verifier is full (max_sessions=1, held by another device): the node's prompt is
    refused.  Before: the refusal escaped the node's TaskGroup and ended the process."""
    async with _rig(mosquitto, tmp_path, wide_tiny, smollm2_fp, max_sessions=1) as rig:
        await rig.squat(smollm2_fp)
        log = tmp_path / "node.log"
        proc = _node(mosquitto, rig.prefix, "pi-full", log)
        try:
            await rig.wait_online("pi-full", proc, log)
            refused = await rig.prompt("pi-full", "r-1")
            assert refused.finish_reason == "refused" and refused.verified is False
            assert "session limit" in refused.error and refused.n_tokens == 0
            assert proc.poll() is None, _tail(log)  # still serving
            await rig.unsquat()
            done = await rig.prompt("pi-full", "r-2")
            assert done.verified is True and done.finish_reason in ("stop", "length")
            assert done.error == "" and done.n_tokens > 0
            events = [json.loads(line) for line in log.read_text().splitlines() if "{" in line]
            failed = [e for e in events if e.get("event") == "session_failed"]
            assert [e["session"] for e in failed] == ["r-1"]
            assert failed[0]["finish_reason"] == "refused"
            proc.send_signal(signal.SIGTERM)  # systemctl stop: a deliberate, clean stop
            assert await _exit_code(proc) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


async def test_a_tokenizer_mismatch_is_refused_without_ending_the_node(
    mosquitto, tmp_path: Path, wide_tiny
) -> None:
    async with _rig(mosquitto, tmp_path, wide_tiny, "another-tokenizer") as rig:
        log = tmp_path / "node.log"
        proc = _node(mosquitto, rig.prefix, "pi-tok", log)
        try:
            await rig.wait_online("pi-tok", proc, log)
            for sid in ("t-1", "t-2"):  # the second proves the first left the node serving
                r = await rig.prompt("pi-tok", sid)
                assert r.finish_reason == "refused" and r.verified is False
                assert "tokenizer" in r.error
            assert proc.poll() is None, _tail(log)
            proc.send_signal(signal.SIGTERM)
            assert await _exit_code(proc) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


@pytest.mark.skipif(not mosquitto_available(), reason="needs a mosquitto binary")
async def test_broker_auth_refused_exits_non_zero(tmp_path: Path) -> None:
    """Fatal: systemd's Restart=on-failure must see a failure (exit 3, broker)."""
    conf = tmp_path / "auth.conf"
    conf.write_text("per_listener_settings false\nallow_anonymous false\n")
    with MosquittoProcess(config=conf) as broker:
        log = tmp_path / "node.log"
        proc = _node(broker, "mw/auth", "pi-auth", log, "--username", "pi", "--password", "x")
        try:
            assert await _exit_code(proc) == 3, _tail(log)
            out = log.read_text()
            assert "Traceback" not in out and "mw-cli: broker unreachable" in out
        finally:
            if proc.poll() is None:
                proc.kill()


async def test_model_load_failure_exits_non_zero(mosquitto, tmp_path: Path) -> None:
    log = tmp_path / "node.log"
    proc = _node(mosquitto, "mw/model", "pi-model", log, "--drafter", "hf:/nonexistent/model")
    try:
        assert await _exit_code(proc) == 4, _tail(log)
        assert "mw-cli: model error" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
