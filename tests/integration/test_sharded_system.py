"""A fleet over three real Mosquitto brokers with the real SmolLM2 target, one broker killed.

Each device is assigned to one broker by the hash of its id; the verifier is a client of
all three (ShardedBus).  The broker of one device is SIGKILLed once that device's text
has started: that device fails over to its second broker, and every session, on every
broker, finishes with exactly the target-only tokens.  The devices on the other brokers
never lose their connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from middleware.broker_bridge.bus import Will
from middleware.broker_bridge.factory import make_bus
from middleware.broker_bridge.mqtt import MqttBus, MqttSettings
from middleware.broker_bridge.sharded import ShardedBus
from middleware.config import BusSection
from middleware.mosquitto import MosquittoProcess, mosquitto_available
from middleware.nodes.drafters import make_drafter
from middleware.nodes.service import NodeConfig, NodeService, encode_prompt, stop_ids_of
from middleware.nodes.service import offline_status_payload as device_will
from middleware.nodes.session import SessionConfig
from middleware.protocol import Topics
from middleware.verifier.engine import TargetEngine
from middleware.verifier.reference import reference_greedy
from middleware.verifier.service import VerifierConfig, VerifierService
from middleware.verifier.service import offline_status_payload as verifier_will
from tests.integration.test_sharded_bus import one_device_per_broker

pytestmark = [pytest.mark.integration, pytest.mark.model]

PROMPTS = ["What is MQTT?", "Why is the sky blue?", "Say hello in French.", "How do I boil an egg?"]
MAX_NEW = 40


@pytest.fixture
def brokers() -> Iterator[list[MosquittoProcess]]:
    if not mosquitto_available():
        pytest.skip("no mosquitto binary")
    procs = [MosquittoProcess() for _ in range(3)]
    try:
        for p in procs:
            p.__enter__()
        yield procs
    finally:
        for p in procs:
            p.__exit__(None, None, None)


async def test_three_brokers_lossless_with_one_killed_mid_run(
    brokers: list[MosquittoProcess], unique_prefix: str, smollm2
) -> None:
    tok = smollm2.tokenizer
    stops = stop_ids_of(tok)
    ids = [encode_prompt(tok, p) for p in PROMPTS]
    refs = [reference_greedy(smollm2.model, x, MAX_NEW, stops) for x in ids]
    cfg = BusSection(
        prefix=unique_prefix, brokers=tuple(f"{b.host}:{b.port}" for b in brokers), failover=True
    )
    t = Topics(unique_prefix)
    dids = one_device_per_broker(cfg)  # dids[i] is on brokers[i]
    victim = dids[0]
    jobs = [(victim, ids[0]), (victim, ids[1]), (dids[1], ids[2]), (dids[2], ids[3])]

    vbus = make_bus(cfg, "mw-verifier-v1", will=Will(t.verifier_status("v1"), verifier_will("v1")))
    assert isinstance(vbus, ShardedBus)
    dbuses = {
        d: make_bus(
            cfg,
            f"mw-node-{d}",
            will=Will(t.device_status(d), device_will(d), delay=1.0),
            persistent=True,
            device_id=d,
        )
        for d in dids
    }
    watcher = MqttBus(MqttSettings(host=brokers[0].host, port=brokers[0].port))
    async with vbus, watcher:
        verifier = VerifierService(
            vbus,
            TargetEngine(smollm2.model),
            tokenizer_fingerprint=smollm2.fingerprint,
            model_name=smollm2.name,
            config=VerifierConfig(verifier_id="v1", prefix=unique_prefix),
        )
        text = await watcher.subscribe(t.device_sessions(victim, "text"))
        nodes = {}
        try:
            for d, bus in dbuses.items():
                await bus.connect()
                nodes[d] = NodeService(
                    bus,
                    tokenizer=tok,
                    tokenizer_fp=smollm2.fingerprint,
                    drafter_factory=lambda: make_drafter("ngram"),
                    drafter_name="ngram",
                    config=NodeConfig(
                        device_id=d,
                        prefix=unique_prefix,
                        max_concurrent=4,
                        session=SessionConfig(max_new_tokens=MAX_NEW, stop_ids=stops),
                    ),
                )

            async def kill_when_the_victim_has_text() -> None:
                await text.get(timeout=300)
                brokers[0].kill()

            async with asyncio.TaskGroup() as tg:
                services = [tg.create_task(verifier.run(), name="verifier")]
                services += [tg.create_task(n.run(), name=f"node-{d}") for d, n in nodes.items()]
                await asyncio.wait_for(verifier.ready.wait(), 30)
                for n in nodes.values():
                    await asyncio.wait_for(n.ready.wait(), 30)
                killer = tg.create_task(kill_when_the_victim_has_text(), name="killer")
                runs = [
                    nodes[d].generate_ids(x, session_id=f"{d}-s{i}")
                    for i, (d, x) in enumerate(jobs)
                ]
                outcomes = await asyncio.wait_for(asyncio.gather(*runs), 600)
                await killer
                for s in services:
                    s.cancel()
        finally:
            for b in dbuses.values():
                await b.close()

    for i, o in enumerate(outcomes):
        assert list(o.tokens) == refs[i], f"job {i} on {jobs[i][0]} differs from the target alone"
    # The victim moved to its failover broker; the others never lost their connection.
    victim_bus = dbuses[victim]
    assert isinstance(victim_bus, MqttBus)
    assert victim_bus.endpoint != (brokers[0].host, brokers[0].port)
    assert victim_bus.reconnects >= 1
    for d in dids[1:]:
        bus = dbuses[d]
        assert isinstance(bus, MqttBus) and bus.reconnects == 0, d
    assert vbus.children[1].reconnects == 0 and vbus.children[2].reconnects == 0
    print(
        f"\nvictim {victim} failed over to {victim_bus.endpoint}; "
        f"verifier undelivered publishes {vbus.undelivered}; "
        f"victim stats {[o.stats for o in outcomes[:2]]}"
    )
