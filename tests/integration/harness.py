"""Run a verifier and device nodes over a real broker, in-process, for integration tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from middleware.broker_bridge.bus import Will
from middleware.broker_bridge.mqtt import MqttBus, MqttSettings
from middleware.nodes.drafters.base import Drafter
from middleware.nodes.service import NodeConfig, NodeService, Outcome
from middleware.nodes.service import offline_status_payload as device_will
from middleware.nodes.session import SessionConfig
from middleware.protocol import Topics
from middleware.verifier.batcher import BatchConfig
from middleware.verifier.engine import TargetEngine
from middleware.verifier.service import VerifierConfig, VerifierService
from middleware.verifier.service import offline_status_payload as verifier_will


@dataclass
class Device:
    device_id: str
    factory: Callable[[], Drafter]


@dataclass
class SystemRun:
    outcomes: list[Outcome]
    verifier: VerifierService
    nodes: dict[str, NodeService]


async def run_system(
    host: str,
    port: int,
    prefix: str,
    loaded: Any,
    devices: Sequence[Device],
    jobs: Sequence[tuple[str, Sequence[int]]],
    session: SessionConfig,
    batch: BatchConfig | None = None,
    verifier_id: str = "v1",
    timeout: float = 600.0,
) -> SystemRun:
    """Start a verifier and nodes, run ``jobs`` ((device_id, prompt ids)) concurrently, stop all."""
    t = Topics(prefix)
    engine = TargetEngine(loaded.model)
    vbus = MqttBus(
        MqttSettings(
            host=host,
            port=port,
            client_id=f"{prefix}-{verifier_id}".replace("/", "-"),
            will=Will(t.verifier_status(verifier_id), verifier_will(verifier_id)),
        )
    )
    vcfg = VerifierConfig(verifier_id=verifier_id, prefix=prefix, batch=batch or BatchConfig())
    async with vbus:
        verifier = VerifierService(
            vbus,
            engine,
            tokenizer_fingerprint=loaded.fingerprint,
            model_name=loaded.name,
            config=vcfg,
        )
        buses = {
            d.device_id: MqttBus(
                MqttSettings(
                    host=host,
                    port=port,
                    client_id=f"{prefix}-{d.device_id}".replace("/", "-"),
                    clean_start=False,
                    session_expiry=60,
                    will=Will(t.device_status(d.device_id), device_will(d.device_id), delay=1.0),
                )
            )
            for d in devices
        }
        nodes: dict[str, NodeService] = {}
        try:
            for d in devices:
                bus = await buses[d.device_id].__aenter__()
                nodes[d.device_id] = NodeService(
                    bus,
                    tokenizer=loaded.tokenizer,
                    tokenizer_fp=loaded.fingerprint,
                    drafter_factory=d.factory,
                    drafter_name=d.device_id,
                    config=NodeConfig(
                        device_id=d.device_id, prefix=prefix, max_concurrent=16, session=session
                    ),
                )
            async with asyncio.TaskGroup() as tg:
                services = [tg.create_task(verifier.run(), name="verifier")]
                services += [tg.create_task(n.run(), name=f"node-{k}") for k, n in nodes.items()]
                await asyncio.wait_for(verifier.ready.wait(), 30)
                for n in nodes.values():
                    await asyncio.wait_for(n.ready.wait(), 30)
                runs = [
                    nodes[dev].generate_ids(ids, session_id=f"{dev}-s{i}")
                    for i, (dev, ids) in enumerate(jobs)
                ]
                outcomes = await asyncio.wait_for(asyncio.gather(*runs), timeout)
                for s in services:
                    s.cancel()
        finally:
            for b in buses.values():
                await b.close()
    return SystemRun(list(outcomes), verifier, nodes)
