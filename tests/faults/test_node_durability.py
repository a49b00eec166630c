"""Nothing lost across restarts (issue 15): the node's SQLite journal and its inbox.

Real processes on a real Mosquitto: the node under test is ``mw-cli node --serve
--journal FILE`` (SIGKILLed and restarted with the same id); the verifier is the real
VerifierService in this process with a tiny random model whose vocabulary is SmolLM2's
(the node's SmolLM2 token ids are valid for it; outputs are compared with that model's
target-only greedy decoding).

- node killed mid-session, restarted: the session resumes from the journal (same
  instance, its committed tokens as the claim) and ends with exactly the target's tokens,
  each delivered once on the text topic; ``mw-cli generate`` gets the outcome;
- a prompt published (QoS 1) while the node is down reaches it after the restart (the
  inbox subscription is registered before the node connects);
- the broker killed right after a result (before any autosave), restarted: the result is
  retained again (the node republishes its journal's recent results after a reconnect).
"""

from __future__ import annotations

import asyncio
import contextlib
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

from middleware.broker_bridge.bus import CONTENT_JSON
from middleware.broker_bridge.mqtt import MqttBus, MqttSettings
from middleware.models.loading import load_tokenizer
from middleware.mosquitto import MosquittoProcess, mosquitto_available
from middleware.nodes.service import encode_prompt, stop_ids_of
from middleware.protocol import PromptRequest, Result, TextChunk, Topics, decode
from middleware.verifier.engine import TargetEngine
from middleware.verifier.reference import reference_greedy
from middleware.verifier.service import VerifierConfig, VerifierService
from tests.faults.audit import audit
from tests.unit.tiny import tiny_llama

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not mosquitto_available(), reason="needs a mosquitto binary"),
]

CLI = [sys.executable, "-m", "middleware.cli.main"]
SMOLLM2_VOCAB = 49_152
DEADLINE_S = 180.0  # a deadline for hangs, not a speed target
REPO_BROKER_CONF = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "mosquitto.conf"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MW_")}
    env.update(MW_LOG_JSON="true", PYTHONUNBUFFERED="1")
    return env


def _logged(log: Path, event: str) -> bool:
    return f'"{event}"' in log.read_text(errors="replace")


def _generate(broker: Any, prefix: str, prompt: str, device: str, sid: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            *CLI,
            "generate",
            prompt,
            *("--device", device, "--session", sid),
            *("--host", broker.host, "--port", str(broker.port)),
            *("--prefix", prefix, "--timeout", str(DEADLINE_S)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"


@pytest.fixture(scope="module")
def tok() -> tuple[Any, str]:
    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def wide_tiny() -> Any:
    return tiny_llama(seed=0, vocab=SMOLLM2_VOCAB)


@pytest.fixture
def broker(tmp_path: Path) -> Any:
    """A private Mosquitto that saves its retained messages only at shutdown (autosave once an
    hour): a SIGKILL loses every retained message since it started, deterministically."""
    conf = tmp_path / "broker.conf"
    base = REPO_BROKER_CONF.read_text()
    conf.write_text(
        "\n".join(
            "autosave_interval 3600" if line.startswith("autosave_interval") else line
            for line in base.splitlines()
        )
        + "\n"
    )
    with MosquittoProcess(config=conf) as b:
        yield b


class Rig:
    def __init__(self, broker: Any, prefix: str, client: MqttBus, tmp: Path) -> None:
        self.broker, self.prefix, self.client, self.tmp = broker, prefix, client, tmp
        self.t = Topics(prefix)
        self.journal = tmp / "journal.sqlite"
        self.starts = 0

    def node(self, device: str, max_new: int) -> tuple[subprocess.Popen, Path]:
        self.starts += 1
        log = self.tmp / f"node-{self.starts}.log"
        args = ["--host", self.broker.host, "--port", str(self.broker.port)]
        args += ["--prefix", self.prefix, "--id", device, "--drafter", "ngram"]
        args += ["--max-new-tokens", str(max_new), "--journal", str(self.journal)]
        proc = subprocess.Popen(
            [*CLI, "node", "--serve", *args],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env=_env(),
        )
        return proc, log

    async def wait_ready(self, proc: subprocess.Popen, log: Path) -> None:
        """Until the node logged ``node_ready`` (subscribed, status published)."""
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            assert proc.poll() is None, _tail(log)
            if _logged(log, "node_ready"):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"node never ready:\n{_tail(log)}")

    async def flushed(self, text: Any) -> None:
        """Until the session's final text chunk arrived (it precedes the result on the
        device's ordered text queue, but the two topics are separate subscriptions)."""
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            if any(b'"final":true' in getattr(m, "payload", b"") for m in list(text._queue._queue)):
                return
            await asyncio.sleep(0.05)
        raise AssertionError("no final text chunk")

    async def ask(self, device: str, sid: str, text: str) -> str:
        req = PromptRequest(prompt=text, session_id=sid, request_id=uuid.uuid4().hex[:16])
        await self.client.publish(
            self.t.device_inbox(device), req.encode(), qos=1, content_type=CONTENT_JSON
        )
        return req.request_id


@contextlib.asynccontextmanager
async def _rig(broker: Any, tmp: Path, model: Any, fp: str) -> AsyncIterator[Rig]:
    prefix = f"mw/test-dur-{uuid.uuid4().hex[:8]}"
    fast = {"reconnect_max": 1.0, "connect_timeout": 30.0}
    async with (
        MqttBus(MqttSettings(host=broker.host, port=broker.port, **fast)) as vbus,
        MqttBus(MqttSettings(host=broker.host, port=broker.port, **fast)) as client,
    ):
        verifier = VerifierService(
            vbus,
            TargetEngine(model),
            tokenizer_fingerprint=fp,
            config=VerifierConfig(verifier_id="v-dur", prefix=prefix),
        )
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(verifier.run())
            await verifier.ready.wait()
            try:
                yield Rig(broker, prefix, client, tmp)
            finally:
                task.cancel()


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


async def _result(sub: Any, request_id: str | None) -> Result:
    """The result answering ``request_id`` (None: the first result)."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        msg = await sub.get(max(0.1, deadline - time.monotonic()))
        r = decode(msg.payload, expect=Result)
        if request_id is None or r.request == request_id:
            return r


async def test_node_killed_mid_session_resumes_from_its_journal(
    broker, tmp_path: Path, wide_tiny, tok, fault_report
) -> None:
    tokenizer, fp = tok
    prompt, max_new, sid = "Tell me a long story.", 400, "dur-kill"
    ref = reference_greedy(
        wide_tiny, encode_prompt(tokenizer, prompt), max_new, stop_ids_of(tokenizer)
    )
    async with _rig(broker, tmp_path, wide_tiny, fp) as rig:
        proc, log = rig.node("pi-dur", max_new)
        gen: subprocess.Popen | None = None
        try:
            await rig.wait_ready(proc, log)
            chunks: list[TextChunk] = []
            async with (
                rig.client.subscribe(rig.t.session("pi-dur", sid, "text")) as text,
                rig.client.subscribe(rig.t.session("pi-dur", sid, "result")) as res,
            ):
                gen = _generate(broker, rig.prefix, prompt, "pi-dur", sid)
                while True:  # the first verified text: the session is under way
                    c = decode((await text.get(DEADLINE_S)).payload, expect=TextChunk)
                    chunks.append(c)
                    if c.kind == "verified" and c.n_tokens:
                        break
                _kill(proc)  # SIGKILL mid-session
                with pytest.raises(TimeoutError):
                    await res.get(0.5)  # killed before its result (400 tokens to go)
                proc, log = rig.node("pi-dur", max_new)  # same id, same journal
                await rig.wait_ready(proc, log)
                r = await _result(res, None)  # generate's own request id
                await asyncio.sleep(0.5)  # the final chunk
                with contextlib.suppress(TimeoutError):
                    while True:
                        chunks.append(decode((await text.get(0.5)).payload, expect=TextChunk))
            _, err = await asyncio.to_thread(gen.communicate, timeout=DEADLINE_S)
            assert gen.returncode == 0, err[-3000:]
            assert "verified=True" in err, err[-2000:]
            assert _logged(log, "session_resuming"), _tail(log)
        finally:
            _kill(proc)
            if gen is not None and gen.poll() is None:
                gen.kill()
    assert r.verified and r.n_tokens == len(ref) and r.request != ""
    assert r.text == tokenizer.decode(ref, skip_special_tokens=True)
    seqs = [c.seq for c in chunks]
    assert seqs == sorted(set(seqs)), seqs  # each chunk once, in order, across the restart
    committed = ref if r.text == tokenizer.decode(ref, skip_special_tokens=True) else []
    a = audit(sid, ref, committed, chunks, tokenizer)
    fault_report.record(faults=1, audits=[a], node_restarts=1)


def _drain(sub: Any) -> list[TextChunk]:
    out = []
    while not sub._queue.empty():
        item = sub._queue.get_nowait()
        if item is not sub._CLOSED:
            out.append(decode(item.payload, expect=TextChunk))
    return out


def _audit(tokenizer: Any, model: Any, prompt: str, max_new: int, r: Result, chunks: list) -> Any:
    """The session's audit against the target alone (a Result has the text, not the ids:
    the tokens are the reference's when the text is)."""
    ref = reference_greedy(model, encode_prompt(tokenizer, prompt), max_new, stop_ids_of(tokenizer))
    text_ok = r.verified and r.n_tokens == len(ref)
    text_ok = text_ok and r.text == tokenizer.decode(ref, skip_special_tokens=True)
    return audit(r.session_id, ref, ref if text_ok else [], chunks, tokenizer)


async def test_inbox_prompt_sent_while_the_node_is_down_is_answered(
    broker, tmp_path: Path, wide_tiny, tok, fault_report
) -> None:
    tokenizer, fp = tok
    async with _rig(broker, tmp_path, wide_tiny, fp) as rig:
        proc, log = rig.node("pi-inbox", 8)
        try:
            await rig.wait_ready(proc, log)
            _kill(proc)
            async with rig.client.subscribe(
                rig.t.session("pi-inbox", "while-down", "result")
            ) as res:
                async with rig.client.subscribe(
                    rig.t.session("pi-inbox", "while-down", "text"), qos=2
                ) as text:
                    request = await rig.ask("pi-inbox", "while-down", "Hello there")  # queued
                    proc, log = rig.node("pi-inbox", 8)
                    r = await _result(res, request)
                    await rig.flushed(text)
                    chunks = _drain(text)
            assert r.verified and r.n_tokens > 0, r
        finally:
            _kill(proc)
    a = _audit(tokenizer, wide_tiny, "Hello there", 8, r, chunks)
    fault_report.record(faults=1, audits=[a], node_restarts=1)


async def test_broker_killed_right_after_a_result_gets_it_back(
    broker, tmp_path: Path, wide_tiny, tok, fault_report
) -> None:
    tokenizer, fp = tok
    async with _rig(broker, tmp_path, wide_tiny, fp) as rig:
        proc, log = rig.node("pi-brk", 8)
        try:
            await rig.wait_ready(proc, log)
            topic = rig.t.session("pi-brk", "brk-1", "result")
            async with (
                rig.client.subscribe(topic) as res,
                rig.client.subscribe(rig.t.session("pi-brk", "brk-1", "text"), qos=2) as text,
            ):
                request = await rig.ask("pi-brk", "brk-1", "Hello there")
                first = await _result(res, request)
                await rig.flushed(text)
                chunks = _drain(text)
            broker.kill()  # before any autosave: the broker loses the retained result
            broker.restart()
            async with (
                MqttBus(MqttSettings(host=broker.host, port=broker.port)) as reader,
                reader.subscribe(topic) as sub,
            ):
                again = await _result(sub, request)  # retained, republished by the node
            assert again == first
            assert proc.poll() is None, _tail(log)
        finally:
            _kill(proc)
    a = _audit(tokenizer, wide_tiny, "Hello there", 8, again, chunks)
    fault_report.record(faults=1, audits=[a], results_republished=1)
