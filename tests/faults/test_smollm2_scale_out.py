"""Two verifiers on one broker: sessions claimed through the shared open subscription;
one verifier dies mid-generation (its last will fires) and its devices re-open on the
other, which rebuilds the sessions by prefill.  Outputs stay identical to target-only.
(Moved here from tests/integration; the tiny-model variant with a SIGKILLed verifier
process is in test_verifier_faults.py.)"""

from __future__ import annotations

import asyncio
import time

import pytest

from middleware.broker_bridge.bus import Will
from middleware.broker_bridge.mqtt import MqttBus, MqttSettings
from middleware.nodes.drafters import make_drafter
from middleware.nodes.service import NodeConfig, NodeService, encode_prompt, stop_ids_of
from middleware.nodes.service import offline_status_payload as device_will
from middleware.nodes.session import SessionConfig
from middleware.protocol import TextChunk, Topics
from middleware.verifier.engine import TargetEngine
from middleware.verifier.reference import reference_greedy
from middleware.verifier.service import VerifierConfig, VerifierService
from middleware.verifier.service import offline_status_payload as verifier_will
from tests.faults.audit import audit
from tests.faults.verifiers import die

pytestmark = [pytest.mark.integration, pytest.mark.model]

PROMPTS = ["What is a verifier?", "Name a fruit.", "Count to five.", "What is rain?"]
MAX_NEW = 24


async def test_second_verifier_takes_over_when_one_dies(
    mosquitto, unique_prefix, smollm2, fault_report
) -> None:
    tok = smollm2.tokenizer
    stops = stop_ids_of(tok)
    ids = [encode_prompt(tok, p) for p in PROMPTS]
    refs = [reference_greedy(smollm2.model, i, MAX_NEW, stops) for i in ids]
    t = Topics(unique_prefix)

    def vbus(vid: str) -> MqttBus:
        return MqttBus(
            MqttSettings(
                host=mosquitto.host,
                port=mosquitto.port,
                client_id=f"{vid}-{unique_prefix[-8:]}",
                will=Will(t.verifier_status(vid), verifier_will(vid)),
            )
        )

    buses = {v: vbus(v) for v in ("v1", "v2")}
    dbus = MqttBus(
        MqttSettings(
            host=mosquitto.host,
            port=mosquitto.port,
            client_id=f"dev-{unique_prefix[-8:]}",
            clean_start=False,
            session_expiry=60,
            will=Will(t.device_status("dev"), device_will("dev"), delay=5),
        )
    )
    async with buses["v1"], buses["v2"], dbus:
        verifiers = {
            v: VerifierService(
                b,
                TargetEngine(smollm2.model),
                tokenizer_fingerprint=smollm2.fingerprint,
                config=VerifierConfig(verifier_id=v, prefix=unique_prefix, exclusive=False),
            )
            for v, b in buses.items()
        }
        node = NodeService(
            dbus,
            tokenizer=tok,
            tokenizer_fp=smollm2.fingerprint,
            drafter_factory=lambda: make_drafter("ngram"),
            drafter_name="ngram",
            config=NodeConfig(
                device_id="dev",
                prefix=unique_prefix,
                max_concurrent=8,
                session=SessionConfig(max_new_tokens=MAX_NEW, stop_ids=stops),
            ),
        )
        chunks: list[TextChunk] = []
        node.on_text = chunks.append
        async with asyncio.TaskGroup() as tg:
            vtasks = {v: tg.create_task(s.run(), name=v) for v, s in verifiers.items()}
            ntask = tg.create_task(node.run())
            for s in verifiers.values():
                await s.ready.wait()
            await node.ready.wait()
            gens = [
                tg.create_task(node.generate_ids(i, session_id=f"so-{n}"))
                for n, i in enumerate(ids)
            ]
            deadline = time.monotonic() + 120
            while not (
                verifiers["v1"].sessions
                and verifiers["v2"].sessions
                and verifiers["v1"].metrics.committed.total() >= 4
            ):
                assert time.monotonic() < deadline, "sessions were not spread over both verifiers"
                await asyncio.sleep(0.05)
            await die(vtasks["v1"], buses["v1"])  # no DISCONNECT: the broker fires its will
            owned_by_v1 = {s.session_id for s in verifiers["v1"].sessions.values() if not s.done}
            outs = await asyncio.wait_for(asyncio.gather(*gens), 240)
            vtasks["v2"].cancel()
            ntask.cancel()
    for ref, o in zip(refs, outs, strict=True):
        assert list(o.tokens) == ref
    moved = [o for o in outs if o.session_id in owned_by_v1]
    assert moved and all(o.stats["reopens"] >= 1 for o in moved)
    assert {s.session_id for s in verifiers["v2"].sessions.values()} | {
        o.session_id for o in outs
    } >= owned_by_v1
    print(f"\nv1 owned {sorted(owned_by_v1)}; reopens: {[o.stats['reopens'] for o in outs]}")
    fault_report.record(
        faults=1,
        audits=[
            audit(o.session_id, ref, o.tokens, chunks, tok)
            for ref, o in zip(refs, outs, strict=True)
        ],
        sessions_moved=len(moved),
    )
