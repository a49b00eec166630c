"""mw-cli as a user runs it: real processes, a real broker, the real model.

A verifier and a node run as ``mw-cli`` subprocesses; ``mw-cli generate``
sends a prompt to the node's inbox and streams the answer while ``mw-cli tail``
watches the session and prints decoded messages.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from middleware.broker_bridge.mqtt import MqttBus, MqttSettings
from middleware.protocol import DeviceStatus, Topics, VerifierStatus, decode

pytestmark = [pytest.mark.integration, pytest.mark.model]

CLI = [sys.executable, "-m", "middleware.cli.main"]
PROMPT = "What is the capital of France?"
MAX_NEW = 16


PROCS: dict[str, subprocess.Popen[bytes]] = {}  # the services fixture's processes


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["MW_LOG_JSON"] = "true"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="module")
def services(mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """A verifier and a node as mw-cli subprocesses, shared by this module's tests."""
    unique_prefix = f"mw/test-cli-{uuid.uuid4().hex[:8]}"
    tmp_path = tmp_path_factory.mktemp("cli")
    common = ["--host", mosquitto.host, "--port", str(mosquitto.port), "--prefix", unique_prefix]
    logs = [open(tmp_path / "verifier.log", "w"), open(tmp_path / "node.log", "w")]
    procs = [
        subprocess.Popen(
            [*CLI, "verifier", *common, "--id", "v-cli", "--model", "smollm2"],
            stdout=logs[0],
            stderr=subprocess.STDOUT,
            env=_env(),
        ),
        subprocess.Popen(
            [
                *CLI,
                "node",
                *common,
                "--id",
                "pi-cli",
                "--drafter",
                "ngram",
                "--max-new-tokens",
                str(MAX_NEW),
            ],
            stdout=logs[1],
            stderr=subprocess.STDOUT,
            env=_env(),
        ),
    ]
    PROCS["verifier"], PROCS["node"] = procs
    try:
        asyncio.run(_wait_online(mosquitto.host, mosquitto.port, unique_prefix, procs, tmp_path))
        yield common
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs:
            f.close()


async def _wait_online(host: str, port: int, prefix: str, procs, tmp_path: Path) -> None:
    t = Topics(prefix)
    need = {"v-cli", "pi-cli"}
    async with MqttBus(MqttSettings(host=host, port=port)) as bus:
        async with (
            bus.subscribe(t.all_verifier_status()) as vs,
            bus.subscribe(t.all_device_status()) as ds,
        ):
            deadline = time.monotonic() + 180
            while need:
                for p in procs:
                    if p.poll() is not None:
                        logs = "".join(f.read_text()[-3000:] for f in tmp_path.glob("*.log"))  # noqa: ASYNC240
                        raise AssertionError(f"a service exited early ({p.returncode}):\n{logs}")
                for sub in (vs, ds):
                    try:
                        msg = await sub.get(0.5)
                    except TimeoutError:
                        continue
                    st = decode(msg.payload)
                    if isinstance(st, VerifierStatus | DeviceStatus) and st.online:
                        need.discard(getattr(st, "verifier_id", getattr(st, "device_id", "")))
                assert time.monotonic() < deadline, f"services not online: {need}"


def test_generate_and_tail_round_trip(services, smollm2, tmp_path: Path) -> None:
    from middleware.nodes.service import encode_prompt, stop_ids_of
    from middleware.verifier.reference import reference_greedy

    sid = "cli-123"
    tail = subprocess.Popen(
        [*CLI, "tail", f"session/{sid}", *services, "--json", "--timeout", "240"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=_env(),
    )
    time.sleep(1.5)  # let tail subscribe before the session starts
    gen = subprocess.run(
        [
            *CLI,
            "generate",
            PROMPT,
            "--device",
            "pi-cli",
            "--session",
            sid,
            *services,
            "--timeout",
            "240",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert gen.returncode == 0, gen.stderr[-3000:]
    tail.terminate()
    out, _ = tail.communicate(timeout=10)
    ref = reference_greedy(
        smollm2.model,
        encode_prompt(smollm2.tokenizer, PROMPT),
        MAX_NEW,
        stop_ids_of(smollm2.tokenizer),
    )
    expected = smollm2.tokenizer.decode(ref, skip_special_tokens=True)
    assert gen.stdout.strip() == expected.strip()
    assert "finish=" in gen.stderr and "verified=True" in gen.stderr

    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    types = {d["type"] for d in lines}
    assert {"open", "draft", "verdict", "state", "text", "result"} <= types, types
    assert all(
        d["topic"].endswith(f"/session/pi-cli/{sid}/" + d["topic"].rsplit("/", 1)[1]) for d in lines
    )
    result = next(d for d in lines if d["type"] == "result")
    assert result["msg"]["text"].strip() == expected.strip()
    verdicts = [d["msg"] for d in lines if d["type"] == "verdict" and d["msg"]["kind"] == "accept"]
    committed = [t for v in sorted(verdicts, key=lambda v: v["base"]) for t in v["tokens"]]
    assert committed == ref  # the decoded verdicts carry exactly the reference tokens


def test_tail_human_output_and_sessions_table(services, tmp_path: Path) -> None:
    sid = "cli-456"
    gen = subprocess.run(
        [
            *CLI,
            "generate",
            "Say hi.",
            "--device",
            "pi-cli",
            "--session",
            sid,
            "--max-new-tokens",
            "4",
            *services,
            "--timeout",
            "240",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert gen.returncode == 0, gen.stderr[-2000:]
    tail = subprocess.run(
        [*CLI, "tail", f"session/{sid}", *services, "--timeout", "3"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    # Only retained messages remain: the state and the result, decoded for people.
    assert (
        f'/session/pi-cli/{sid}/state state [retained] status="done" owner="v-cli"' in tail.stdout
    ), tail.stdout
    assert f"/session/pi-cli/{sid}/result result [retained]" in tail.stdout
    table = subprocess.run(
        [*CLI, "sessions", *services, "--wait", "2"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert table.returncode == 0
    row = next(line for line in table.stdout.splitlines() if line.startswith(sid))
    assert "pi-cli" in row and "done" in row and "v-cli" in row


def test_generate_with_a_reused_session_id_shows_only_its_own_answer(services, smollm2) -> None:
    """Issue 14, scenario 1 (second half): the session id's topic still holds the first
    generation's retained result; the second ``generate`` must wait for and show the answer
    to its own prompt (its request id), never the earlier result."""
    from middleware.nodes.service import encode_prompt, stop_ids_of
    from middleware.verifier.reference import reference_greedy

    sid = f"reuse-{uuid.uuid4().hex[:6]}"

    def gen(prompt: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                *CLI,
                "generate",
                prompt,
                *("--device", "pi-cli", "--session", sid, *services),
                *("--max-new-tokens", "8", "--timeout", "240"),
            ],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=300,
        )

    def expected(prompt: str) -> str:
        ids = encode_prompt(smollm2.tokenizer, prompt)
        ref = reference_greedy(smollm2.model, ids, 8, stop_ids_of(smollm2.tokenizer))
        return str(smollm2.tokenizer.decode(ref, skip_special_tokens=True)).strip()

    first = gen("Name three planets.")
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.strip() == expected("Name three planets.")
    second = gen("What is 2+2?")
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.strip() == expected("What is 2+2?"), second.stdout
    assert "verified=True" in second.stderr


def test_reused_session_id_while_the_verifier_is_paused_gets_its_own_answer(
    services, smollm2
) -> None:
    """Issue 14, scenario 1: generate on session S; pause the verifier (SIGSTOP); generate
    another prompt on S; resume.  The device used to adopt the first generation's retained
    state and the verifier to accept it: the second result was the planets, verified (11 of
    12 positions wrong).  Now the second generation is another instance: its answer is the
    target's for its own prompt."""
    import signal

    from middleware.nodes.service import encode_prompt, stop_ids_of
    from middleware.verifier.reference import reference_greedy

    sid = f"paused-{uuid.uuid4().hex[:6]}"
    cmd = [*CLI, "generate"]
    opts = [*("--device", "pi-cli", "--session", sid, *services)]
    opts += ["--max-new-tokens", "12", "--timeout", "240"]

    def expected(prompt: str) -> str:
        ids = encode_prompt(smollm2.tokenizer, prompt)
        ref = reference_greedy(smollm2.model, ids, 12, stop_ids_of(smollm2.tokenizer))
        return str(smollm2.tokenizer.decode(ref, skip_special_tokens=True)).strip()

    first = subprocess.run(
        [*cmd, "Name three planets.", *opts],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert first.returncode == 0, first.stderr[-2000:]
    verifier = PROCS["verifier"]
    os.kill(verifier.pid, signal.SIGSTOP)
    try:
        second = subprocess.Popen(
            [*cmd, "What is 2+2?", *opts],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        time.sleep(3.0)  # the node opens the second generation while the verifier is paused
    finally:
        os.kill(verifier.pid, signal.SIGCONT)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err[-2000:]
    assert out.strip() == expected("What is 2+2?"), out
    assert out.strip() != first.stdout.strip()
    assert "verified=True" in err
