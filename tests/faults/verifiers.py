"""Verifiers for the fault suite: in this process (crashable) or as a child process (SIGKILL-able).

Both serve the tiny target of :mod:`tests.unit.tiny` (seed 0) under the
fingerprint :data:`TINY_FP`, so the devices' references are computed here.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from middleware.broker_bridge.bus import Will
from middleware.broker_bridge.mqtt import MqttBus, MqttSettings
from middleware.metrics import Registry
from middleware.protocol import Topics
from middleware.verifier.engine import TargetEngine
from middleware.verifier.service import VerifierConfig, VerifierService
from middleware.verifier.service import offline_status_payload as verifier_will

TINY_FP = "tiny-llama-seed0"
REPO = Path(__file__).resolve().parents[2]


def client_id(prefix: str, name: str) -> str:
    return f"{prefix}-{name}".replace("/", "-")


def verifier_settings(host: str, port: int, prefix: str, verifier_id: str) -> MqttSettings:
    t = Topics(prefix)
    return MqttSettings(
        host=host,
        port=port,
        client_id=client_id(prefix, verifier_id),
        reconnect_max=0.5,
        max_inflight=20,
        will=Will(t.verifier_status(verifier_id), verifier_will(verifier_id)),
    )


async def die(task: asyncio.Task[Any] | None, bus: MqttBus) -> None:
    """A process death simulated in this process: the service's tasks stop first (a dead
    process runs nothing more; crashing the bus first would let a forward that was finishing
    publish into a closed bus), then the connection drops without DISCONNECT, so the broker
    fires the last will."""
    if task is not None:
        task.cancel()
        await asyncio.wait([task])
    bus.crash()


class InProcessVerifier:
    """A :class:`VerifierService` on its own MQTT connection in this process.

    :meth:`crash` is a process death as the broker sees it (no DISCONNECT: the last
    will fires) and as the service sees it (its task stops, its state gone)."""

    def __init__(
        self,
        model: Any,
        host: str,
        port: int,
        prefix: str,
        verifier_id: str = "v1",
        *,
        config: VerifierConfig | None = None,
        memory_budget_tokens: int = 65536,
    ) -> None:
        self.verifier_id = verifier_id
        self.bus = MqttBus(verifier_settings(host, port, prefix, verifier_id))
        self.config = replace(config or VerifierConfig(), verifier_id=verifier_id, prefix=prefix)
        self.engine = TargetEngine(model, memory_budget_tokens=memory_budget_tokens)
        self.service: VerifierService | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self, tg: asyncio.TaskGroup) -> InProcessVerifier:
        await self.bus.__aenter__()
        self.service = VerifierService(
            self.bus,
            self.engine,
            tokenizer_fingerprint=TINY_FP,
            model_name="tiny",
            config=self.config,
            registry=Registry(),
        )
        self.task = tg.create_task(self.service.run(), name=f"verifier-{self.verifier_id}")
        await asyncio.wait_for(self.service.ready.wait(), 30)
        return self

    async def crash(self) -> None:
        await die(self.task, self.bus)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        await self.bus.close()


class ProcessVerifier:
    """``python -m tests.faults.verifier_proc`` as a child process; :meth:`kill` is SIGKILL."""

    def __init__(
        self,
        host: str,
        port: int,
        prefix: str,
        verifier_id: str,
        workdir: Path,
        *,
        exclusive: bool = True,
    ) -> None:
        self.verifier_id = verifier_id
        self.args = [
            "--host",
            host,
            "--port",
            str(port),
            "--prefix",
            prefix,
            "--verifier-id",
            verifier_id,
        ] + ([] if exclusive else ["--shared"])
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def start(
        self, tg: asyncio.TaskGroup | None = None, within: float = 90.0
    ) -> ProcessVerifier:
        """Spawn and wait until the service subscribed (it writes its ready file then)."""
        self.starts += 1
        ready = self.workdir / f"{self.verifier_id}-{self.starts}.ready"
        log = (self.workdir / f"{self.verifier_id}-{self.starts}.log").open("wb")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        argv = [
            sys.executable,
            "-m",
            "tests.faults.verifier_proc",
            *self.args,
            "--ready",
            str(ready),
        ]
        self.proc = await asyncio.to_thread(
            subprocess.Popen,
            argv,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + within
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"verifier process exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"verifier process not ready in {within} s:\n{self.log_tail()}")
            await asyncio.sleep(0.05)
        return self

    def kill(self) -> None:
        """SIGKILL: the process dies at once, its socket is closed by the kernel."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, 10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, n: int = 30) -> str:
        path = self.workdir / f"{self.verifier_id}-{self.starts}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""
