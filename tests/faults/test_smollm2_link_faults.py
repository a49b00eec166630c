"""Faults with the real SmolLM2-135M target and drafters (moved here from tests/integration).

- A link between a device and the broker cut mid-generation (a TCP proxy the test
  controls): the device goes offline, releases provisional text, comes back, and
  every provisional token is confirmed or corrected.
- The broker SIGKILLed and restarted from its persistence mid-generation.
- The verifier crashed mid-generation (no DISCONNECT, its state gone) and replaced
  by a fresh one: devices resync and re-open.

In each the final text equals the target model alone.  The tiny-model tests in
this folder repeat these faults with more sessions and more kinds of fault.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from middleware.broker_bridge.bus import Will
from middleware.broker_bridge.mqtt import MqttBus, MqttSettings
from middleware.nodes.drafters import make_drafter
from middleware.nodes.drafters.hf import HFDrafter
from middleware.nodes.service import NodeConfig, NodeService, encode_prompt, stop_ids_of
from middleware.nodes.service import offline_status_payload as device_will
from middleware.nodes.session import SessionConfig
from middleware.protocol import Result, TextChunk, Topics, decode
from middleware.verifier.engine import TargetEngine
from middleware.verifier.reference import reference_greedy
from middleware.verifier.service import VerifierConfig, VerifierService
from tests.faults.audit import audit
from tests.faults.verifiers import die
from tests.integration.proxy import TcpProxy

pytestmark = [pytest.mark.integration, pytest.mark.model]

PROMPT = "Explain what a message broker does."
MAX_NEW = 40


async def test_link_cut_goes_offline_then_confirms_or_corrects(
    mosquitto, unique_prefix, smollm2, quant4, fault_report
) -> None:
    tok = smollm2.tokenizer
    stops = stop_ids_of(tok)
    ids = encode_prompt(tok, PROMPT)
    ref = reference_greedy(smollm2.model, ids, MAX_NEW, stops)
    t = Topics(unique_prefix)
    sid = "cut-1"
    chunks: list[TextChunk] = []
    result: list[Result] = []
    async with (
        TcpProxy(mosquitto.host, mosquitto.port) as proxy,
        MqttBus(MqttSettings(host=mosquitto.host, port=mosquitto.port)) as vbus,
        MqttBus(MqttSettings(host=mosquitto.host, port=mosquitto.port)) as watch,
        MqttBus(
            MqttSettings(
                host=proxy.host,
                port=proxy.port,
                client_id=f"dev-{sid}",
                clean_start=False,
                session_expiry=60,
                keepalive=5,
                request_timeout=2.0,
                reconnect_min=0.1,
                reconnect_max=0.5,
                will=Will(t.device_status("pi-cut"), device_will("pi-cut"), delay=5.0),
            )
        ) as dbus,
    ):
        verifier = VerifierService(
            vbus,
            TargetEngine(smollm2.model),
            tokenizer_fingerprint=smollm2.fingerprint,
            config=VerifierConfig(verifier_id="v1", prefix=unique_prefix),
        )
        node = NodeService(
            dbus,
            tokenizer=tok,
            tokenizer_fp=smollm2.fingerprint,
            drafter_factory=lambda: HFDrafter(quant4, tok),
            drafter_name="quant4",
            config=NodeConfig(
                device_id="pi-cut",
                prefix=unique_prefix,
                session=SessionConfig(
                    max_new_tokens=MAX_NEW, stop_ids=stops, max_failures=2, probe_interval=0.5
                ),
            ),
        )
        local: list[TextChunk] = []
        node.on_text = local.append  # what the device's user sees, even while offline
        text_sub = await watch.subscribe(t.session("pi-cut", sid, "text"))
        result_sub = await watch.subscribe(t.session("pi-cut", sid, "result"))

        async def collect() -> None:
            async for msg in text_sub:
                chunks.append(decode(msg.payload, expect=TextChunk))

        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(verifier.run()),
                tg.create_task(node.run()),
                tg.create_task(collect()),
            ]
            await verifier.ready.wait()
            await node.ready.wait()
            gen = tg.create_task(node.generate_ids(ids, session_id=sid))
            await _until(
                lambda: any(c.kind == "verified" and c.pos + c.n_tokens >= 6 for c in local), 120
            )
            await proxy.cut()
            await _until(lambda: any(c.kind == "provisional" for c in local), 60)
            await asyncio.sleep(1.0)  # stay offline a little longer: more provisional text
            await proxy.restore()
            outcome = await asyncio.wait_for(gen, 180)
            result.append(decode((await result_sub.get(30)).payload, expect=Result))
            await _until(lambda: len(chunks) >= len(local), 30)  # the bus caught up with the device
            for task in tasks:
                task.cancel()

    assert list(outcome.tokens) == ref
    assert chunks == local  # every chunk released offline reached the text topic, in order
    assert result[0].text == tok.decode(ref, skip_special_tokens=True)
    kinds = [c.kind for c in chunks]
    assert "provisional" in kinds
    assert "confirmed" in kinds or "correction" in kinds
    # Every committed token reached the user exactly once as verified, confirmed or
    # corrected text, in order; provisional text was always marked as such.
    committed = [
        c for c in chunks if c.kind in ("verified", "confirmed", "correction") and c.n_tokens
    ]
    positions = [(c.pos, c.n_tokens) for c in committed]
    assert [p for p, _ in positions] == [
        sum(n for _, n in positions[:i]) for i in range(len(positions))
    ]
    assert sum(n for _, n in positions) == len(ref)
    assert "".join(c.text for c in committed) == result[0].text
    print(f"\nchunks: {' '.join(kinds)}")
    print(
        {
            k: v
            for k, v in outcome.stats.items()
            if k
            in ("timeouts", "resends", "reopens", "offline_periods", "provisional", "corrections")
        }
    )
    assert outcome.stats["offline_periods"] >= 1
    fault_report.record(
        faults=1,
        audits=[audit(sid, ref, outcome.tokens, local, tok)],
        **{
            k: int(outcome.stats[k])
            for k in ("timeouts", "offline_periods", "provisional", "corrections")
        },
    )


async def _until(cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def _fleet_run(
    host: str, port: int, prefix: str, smollm2, fault, chunks: list[TextChunk]
) -> tuple[list, list, VerifierService]:
    """Two sessions with the n-gram drafter; ``fault(ctx)`` is awaited once 4 tokens are committed.
    Every text chunk the device's user sees is appended to ``chunks``."""
    tok = smollm2.tokenizer
    stops = stop_ids_of(tok)
    ids = [encode_prompt(tok, p) for p in ("Name two colours.", "What is a cloud?")]
    refs = [reference_greedy(smollm2.model, i, MAX_NEW, stops) for i in ids]
    t = Topics(prefix)
    vsettings = MqttSettings(host=host, port=port, client_id="v-fault", reconnect_max=0.5)
    dsettings = MqttSettings(
        host=host,
        port=port,
        client_id="d-fault",
        clean_start=False,
        session_expiry=60,
        reconnect_max=0.5,
        request_timeout=3.0,
        will=Will(t.device_status("d"), device_will("d"), delay=5.0),
    )
    ctx: dict = {}
    async with MqttBus(vsettings) as vbus, MqttBus(dsettings) as dbus:
        verifier = VerifierService(
            vbus,
            TargetEngine(smollm2.model),
            tokenizer_fingerprint=smollm2.fingerprint,
            config=VerifierConfig(verifier_id="v1", prefix=prefix),
        )
        node = NodeService(
            dbus,
            tokenizer=tok,
            tokenizer_fp=smollm2.fingerprint,
            drafter_factory=lambda: make_drafter("ngram"),
            drafter_name="ngram",
            config=NodeConfig(
                device_id="d",
                prefix=prefix,
                session=SessionConfig(max_new_tokens=MAX_NEW, stop_ids=stops, probe_interval=0.5),
            ),
        )
        node.on_text = chunks.append
        async with asyncio.TaskGroup() as tg:
            ctx.update(tg=tg, verifier=verifier, vtask=tg.create_task(verifier.run()), vbus=vbus)
            ntask = tg.create_task(node.run())
            await verifier.ready.wait()
            await node.ready.wait()
            gens = [
                tg.create_task(node.generate_ids(i, session_id=f"f-{n}")) for n, i in enumerate(ids)
            ]
            await _until(lambda: verifier.metrics.committed.total() >= 4, 120)
            await fault(ctx)
            outs = await asyncio.wait_for(asyncio.gather(*gens), 240)
            ctx["vtask"].cancel()
            ntask.cancel()
    return refs, outs, ctx["verifier"]


async def test_broker_killed_and_restarted_mid_generation(
    fresh_mosquitto, unique_prefix, smollm2, fault_report
) -> None:
    async def fault(ctx: dict) -> None:
        fresh_mosquitto.kill()  # SIGKILL: persistence has at most 1 s of autosave lag
        await asyncio.sleep(1.0)
        await asyncio.to_thread(fresh_mosquitto.restart)

    chunks: list[TextChunk] = []
    refs, outs, _ = await _fleet_run(
        fresh_mosquitto.host, fresh_mosquitto.port, unique_prefix, smollm2, fault, chunks
    )
    for ref, o in zip(refs, outs, strict=True):
        assert list(o.tokens) == ref
    fault_report.record(
        faults=1,
        audits=[
            audit(o.session_id, ref, o.tokens, chunks, smollm2.tokenizer)
            for ref, o in zip(refs, outs, strict=True)
        ],
    )


async def test_verifier_restarted_mid_generation_devices_resync(
    mosquitto, unique_prefix, smollm2, fault_report
) -> None:
    async def fault(ctx: dict) -> None:
        await die(ctx["vtask"], ctx["vbus"])
        new_bus = MqttBus(
            MqttSettings(host=mosquitto.host, port=mosquitto.port, client_id="v-fault-2")
        )
        await new_bus.__aenter__()
        ctx["new_bus"] = new_bus
        fresh = VerifierService(
            new_bus,
            TargetEngine(ctx["verifier"].engine.model),
            tokenizer_fingerprint=ctx["verifier"].fingerprint,
            config=VerifierConfig(verifier_id="v1", prefix=unique_prefix),
        )
        ctx["verifier"] = fresh  # a fresh process: no sessions, no KV caches
        ctx["vtask"] = ctx["tg"].create_task(fresh.run())

    chunks: list[TextChunk] = []
    refs, outs, fresh = await _fleet_run(
        mosquitto.host, mosquitto.port, unique_prefix, smollm2, fault, chunks
    )
    for ref, o in zip(refs, outs, strict=True):
        assert list(o.tokens) == ref
    assert sum(o.stats["reopens"] for o in outs) >= 1
    assert (
        fresh.metrics.answers.get(kind="resync") >= 1
        or fresh.metrics.answers.get(kind="opened") >= 1
    )
    fault_report.record(
        faults=1,
        audits=[
            audit(o.session_id, ref, o.tokens, chunks, smollm2.tokenizer)
            for ref, o in zip(refs, outs, strict=True)
        ],
        reopens=int(sum(o.stats["reopens"] for o in outs)),
    )
