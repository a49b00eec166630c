"""The retained session state on a real Mosquitto: published on open, coalesced while the
session runs (not once per verdict), and current after the verifier stops cleanly, so a
verifier restart finds the committed tokens there."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from middleware.broker_bridge.mqtt import MqttBus, MqttSettings
from middleware.protocol import Draft, OpenSession, SessionState, Topics, Verdict, decode
from middleware.verifier.engine import TargetEngine
from middleware.verifier.reference import reference_greedy
from middleware.verifier.service import VerifierConfig, VerifierService
from tests.unit.tiny import EOS, tiny_llama

pytestmark = [pytest.mark.integration]
PROMPT = (1, 5, 9, 13)


async def _retained_state(settings: MqttSettings, topic: str) -> SessionState:
    async with MqttBus(settings) as bus, bus.subscribe(topic) as sub:
        msg = await sub.get(10)
    assert msg.retain
    return decode(msg.payload, expect=SessionState)


async def test_state_is_coalesced_and_current_after_a_clean_stop(
    mqtt_settings: Callable[..., MqttSettings], unique_prefix: str
) -> None:
    model = tiny_llama(seed=0)
    ref = reference_greedy(model, PROMPT, 12, (EOS,))
    t = Topics(unique_prefix)
    state_topic = t.session("dev", "s1", "state")
    config = VerifierConfig(verifier_id="v1", prefix=unique_prefix, state_interval=3600.0)
    async with (
        MqttBus(mqtt_settings(client_id=f"{unique_prefix}-v")) as vbus,
        MqttBus(mqtt_settings(client_id=f"{unique_prefix}-d")) as dbus,
        dbus.subscribe(t.session("dev", "s1", "verdict")) as verdicts,
        dbus.subscribe(state_topic) as states,
    ):
        verifier = VerifierService(
            vbus, TargetEngine(model), tokenizer_fingerprint="tiny", config=config
        )
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(verifier.run())
            await verifier.ready.wait()
            opening = OpenSession(
                session_id="s1",
                device_id="dev",
                epoch=1,
                seq=0,
                tokenizer="tiny",
                prompt=PROMPT,
                max_new_tokens=32,
                stop_ids=(EOS,),
            )
            await dbus.publish(t.session("dev", "s1", "open"), opening.encode())
            v = decode((await verdicts.get(30)).payload, expect=Verdict)
            assert v.kind == "opened"
            assert decode((await states.get(10)).payload, expect=SessionState).committed == ()
            base = 0
            for seq in (1, 2, 3):
                draft = Draft("s1", 1, seq, base, tuple(ref[base : base + 3]))
                await dbus.publish(t.session("dev", "s1", "draft"), draft.encode())
                v = decode((await verdicts.get(30)).payload, expect=Verdict)
                assert (v.kind, v.committed_len) == ("accept", base + 4)
                base = v.committed_len
            with pytest.raises(TimeoutError):  # three verdicts, no state: the tick is far off
                await states.get(0.5)
            task.cancel()  # a clean stop, as systemctl stop does
        stopped = decode((await states.get(10)).payload, expect=SessionState)
    assert (stopped.committed, stopped.owner, stopped.status) == (tuple(ref[:12]), "v1", "open")
    # What a restarted verifier's devices read: the broker kept the last state.
    again = await _retained_state(mqtt_settings(client_id=f"{unique_prefix}-r"), state_topic)
    assert again.committed == tuple(ref[:12]) and again.instance == stopped.instance
