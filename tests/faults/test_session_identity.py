"""Session identity and trust on a real Mosquitto (issue 14): no output is verified unless
the target produced it, whatever another client on the broker sends.

- scenario 3: a raw open carrying made-up committed tokens is answered with the truth
  and the retained state never holds the forgery;
- scenario 4: the same session id from two devices is two sessions, both lossless.
"""

from __future__ import annotations

import asyncio

from middleware.broker_bridge.mqtt import MqttBus, MqttSettings
from middleware.protocol import OpenSession, SessionState, Topics, Verdict, decode
from middleware.protocol.session import session_instance
from middleware.verifier.service import VerifierConfig
from tests.faults.audit import Audit
from tests.faults.fleet import DeviceSpec, Fleet, Job
from tests.faults.scenario import TOKENIZER, prompts, session_config
from tests.faults.verifiers import TINY_FP, InProcessVerifier, client_id
from tests.unit.tiny import EOS, VOCAB

MAX_NEW = 48


def exact(sid: str, ref: list[int], tokens: list[int]) -> Audit:
    """An audit of committed tokens alone (no text chunks to cover): lost = tokens from the
    first one that differs from the reference, or missing."""
    agree = next(
        (i for i, (a, b) in enumerate(zip(ref, tokens, strict=False)) if a != b),
        min(len(ref), len(tokens)),
    )
    return Audit(
        sid,
        len(ref),
        len(tokens),
        len(ref) - agree,
        max(0, len(tokens) - len(ref)),
        tokens == ref,
        0,
        0,
    )


async def test_forged_committed_in_a_raw_open_never_becomes_verified(
    mosquitto, unique_prefix, tiny_target, reference, fault_report
) -> None:
    host, port = mosquitto.host, mosquitto.port
    t = Topics(unique_prefix)
    prompt = prompts(1, seed=11)[0]
    ref = reference(prompt, MAX_NEW)
    assert len(ref) > 12
    forged = [(x + 1) % VOCAB for x in ref[:12]]
    forged[0] = ref[0]  # right for one token, then made up
    v = InProcessVerifier(tiny_target, host, port, unique_prefix, "v1", config=VerifierConfig())
    settings = MqttSettings(host=host, port=port, client_id=client_id(unique_prefix, "mallory"))
    async with asyncio.TaskGroup() as tg, MqttBus(settings) as bus:
        await v.start(tg)
        msg = OpenSession(
            session_id="s1",
            device_id="mallory",
            epoch=1,
            seq=0,
            tokenizer=TINY_FP,
            prompt=prompt,
            committed=tuple(forged),
            max_new_tokens=MAX_NEW,
            stop_ids=(EOS,),
            nonce="f" * 16,
        )
        async with bus.subscribe(t.session("mallory", "s1", "verdict")) as verdicts:
            await bus.publish(t.session("mallory", "s1", "open"), msg.encode())
            verdict = decode((await verdicts.get(60)).payload, expect=Verdict)
        async with bus.subscribe(t.session("mallory", "s1", "state")) as states:
            state = decode((await states.get(30)).payload, expect=SessionState)
        await v.stop()
    assert verdict.kind == "opened" and verdict.instance == session_instance(msg)
    assert (verdict.base, verdict.tokens, verdict.committed_len) == (1, (ref[1],), 2)
    assert list(state.committed) == ref[:2]  # the truth, not the forgery
    fault_report.record(
        faults=1,
        audits=[exact("s1", ref[:2], list(state.committed))],
        forged_tokens=len(forged) - 1,
        kept=verdict.base,
    )


async def test_one_session_id_from_two_devices_is_two_sessions(
    mosquitto, unique_prefix, tiny_target, reference, fault_report
) -> None:
    from middleware.nodes.drafters import make_drafter

    host, port = mosquitto.host, mosquitto.port
    pool = prompts(2, seed=5)
    devices = [DeviceSpec(d, lambda: make_drafter("ngram")) for d in ("pi-a", "pi-b")]
    jobs = [Job("pi-a", "same", pool[0]), Job("pi-b", "same", pool[1])]
    async with Fleet(
        host, port, unique_prefix, devices, session=session_config(MAX_NEW), tokenizer=TOKENIZER
    ) as fleet:
        await fleet.start_verifier(InProcessVerifier(tiny_target, host, port, unique_prefix))
        outcomes = await fleet.generate(jobs)
    refs = [reference(j.prompt, MAX_NEW) for j in jobs]
    for o, ref in zip(outcomes, refs, strict=True):
        assert list(o.tokens) == ref
    fault_report.record(
        faults=0,
        audits=[
            exact(f"{j.device_id}/{j.session_id}", ref, list(o.tokens))
            for j, o, ref in zip(jobs, outcomes, refs, strict=True)
        ],
        shared_session_id="same",
    )
