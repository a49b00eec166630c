"""Admission on a real Mosquitto (issue 15): no device stalls or locks out the fleet.

- A long prompt beside short sessions: its prefill runs in steps of ``prefill_chunk``
  tokens between the others' verify rounds, so no forward pass feeds more than one step
  (the old verifier fed the whole prompt in one forward and every session waited for
  it: 51.6 s for 4,096 tokens of SmolLM2 on this machine).  Everyone stays lossless.
- A flood of one-shot opens from many device ids fills the verifier; once those sessions
  are idle, honest devices that come later are admitted (they used to be refused).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from middleware.broker_bridge.mqtt import MqttBus, MqttSettings
from middleware.nodes.drafters import make_drafter
from middleware.protocol import OpenSession, Topics
from middleware.verifier.service import VerifierConfig
from tests.faults.fleet import DeviceSpec, Fleet, Job, until
from tests.faults.scenario import TOKENIZER, audits, prompts, session_config
from tests.faults.verifiers import TINY_FP, InProcessVerifier, client_id
from tests.unit.tiny import EOS, VOCAB

MAX_NEW = 32
CHUNK = 32


def record_forward_widths(engine: Any) -> list[tuple[int, bool]]:
    """Wrap the engine's forward: the widest row (tokens fed for one session) of each pass,
    and whether it was a prefill (no logits kept)."""
    widths: list[tuple[int, bool]] = []
    inner = engine._forward

    def forward(rows, *, keep_all_logits):  # type: ignore[no-untyped-def]
        widths.append((max(len(r.tokens) for r in rows), not keep_all_logits))
        return inner(rows, keep_all_logits=keep_all_logits)

    engine._forward = forward
    return widths


async def test_long_prompt_is_prefilled_in_steps_beside_short_sessions(
    mosquitto, unique_prefix, tiny_target, reference, fault_report
) -> None:
    host, port = mosquitto.host, mosquitto.port
    short = prompts(4, seed=21)
    long_prompt = (1, *((i * 13) % (VOCAB - 3) + 3 for i in range(479)))
    devices = [DeviceSpec(f"d{i}", lambda: make_drafter("ngram")) for i in range(3)]
    jobs = [Job(f"d{i % 2}", f"short-{i}", p) for i, p in enumerate(short)]
    jobs.append(Job("d2", "long", long_prompt))
    config = VerifierConfig(prefill_chunk=CHUNK, max_draft=16)
    v = InProcessVerifier(tiny_target, host, port, unique_prefix, config=config)
    widths = record_forward_widths(v.engine)
    started = time.monotonic()
    async with Fleet(
        host, port, unique_prefix, devices, session=session_config(MAX_NEW), tokenizer=TOKENIZER
    ) as fleet:
        await fleet.start_verifier(v)
        outcomes = await fleet.generate(jobs)
        elapsed = time.monotonic() - started
    widest = max(w for w, _ in widths)
    assert widest <= max(CHUNK, 17), f"a forward fed {widest} tokens of one session"
    prefill_steps = sum(1 for _, prefill in widths if prefill)
    assert prefill_steps >= len(long_prompt) // CHUNK
    fault_report.record(
        faults=1,
        audits=audits(fleet, jobs, outcomes, reference, MAX_NEW),
        long_prompt_tokens=len(long_prompt),
        prefill_steps=prefill_steps,
        widest_forward=widest,
        seconds=round(elapsed, 1),
    )


async def test_device_id_flood_does_not_lock_out_later_devices(
    mosquitto, unique_prefix, tiny_target, reference, fault_report
) -> None:
    host, port = mosquitto.host, mosquitto.port
    t = Topics(unique_prefix)
    idle_s = 1.0
    config = VerifierConfig(max_sessions=16, reuse_idle_s=idle_s)
    v = InProcessVerifier(tiny_target, host, port, unique_prefix, config=config)
    pool = prompts(4, seed=31)
    devices = [DeviceSpec(f"honest-{i}", lambda: make_drafter("ngram")) for i in range(2)]
    jobs = [Job(f"honest-{i % 2}", f"h{i}", p) for i, p in enumerate(pool)]
    flood = 40
    async with Fleet(
        host, port, unique_prefix, devices, session=session_config(MAX_NEW), tokenizer=TOKENIZER
    ) as fleet:
        await fleet.start_verifier(v)
        svc = v.service
        assert svc is not None
        settings = MqttSettings(host=host, port=port, client_id=client_id(unique_prefix, "flood"))
        async with MqttBus(settings) as bus:
            for i in range(flood):  # one open each from 40 device ids, never a draft
                dev = f"flood-{i}"
                msg = OpenSession(
                    session_id="x",
                    device_id=dev,
                    epoch=1,
                    seq=0,
                    tokenizer=TINY_FP,
                    prompt=(1, 5, 7),
                    max_new_tokens=MAX_NEW,
                    stop_ids=(EOS,),
                )
                await bus.publish(t.session(dev, "x", "open"), msg.encode())
        await until(
            lambda: (
                svc.metrics.rejected.get(reason="too_many_sessions") + len(svc.sessions) >= flood
            ),
            60,
            "the flood's opens answered",
        )
        assert len(svc.sessions) == 16  # full of the flood
        await asyncio.sleep(idle_s * 1.2)  # the flood's sessions are now idle
        outcomes = await fleet.generate(jobs)
    honest_refused = sum(int(o.stats.get("refused", 0)) for o in outcomes)
    fault_report.record(
        faults=flood,
        audits=audits(fleet, jobs, outcomes, reference, MAX_NEW),
        flood_opens=flood,
        flood_refused=int(svc.metrics.rejected.get(reason="too_many_sessions")),
        honest_refused=honest_refused,
    )
