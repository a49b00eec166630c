"""Device-side metrics: a node and a verifier (tiny models) on a real Mosquitto; the node's
endpoint is scraped over HTTP after one session and checked with promtool."""

from __future__ import annotations

import asyncio
import urllib.request

from middleware.broker_bridge.mqtt import MqttBus
from middleware.metrics import serve_metrics
from middleware.nodes.drafters.hf import HFDrafter
from middleware.nodes.service import NodeConfig, NodeService
from middleware.nodes.session import SessionConfig
from middleware.verifier.engine import TargetEngine
from middleware.verifier.service import VerifierConfig, VerifierService
from tests.unit.test_metrics_prometheus import _promtool
from tests.unit.tiny import EOS, TinyTokenizer, noisy_copy, tiny_llama


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} missing from the scrape")


async def test_node_metrics_endpoint_after_a_session(mqtt_settings, unique_prefix) -> None:
    import subprocess

    promtool = _promtool()
    target, draft = tiny_llama(seed=0), noisy_copy(seed=0)
    async with (
        MqttBus(mqtt_settings(client_id=f"v-{unique_prefix[-8:]}")) as vbus,
        MqttBus(mqtt_settings(client_id=f"d-{unique_prefix[-8:]}")) as dbus,
    ):
        verifier = VerifierService(
            vbus,
            TargetEngine(target),
            tokenizer_fingerprint="tiny",
            config=VerifierConfig(verifier_id="v1", prefix=unique_prefix),
        )
        node = NodeService(
            dbus,
            tokenizer=TinyTokenizer(),
            tokenizer_fp="tiny",
            drafter_factory=lambda: HFDrafter(draft),
            drafter_name="hf",
            config=NodeConfig(
                device_id="dev-1",
                prefix=unique_prefix,
                session=SessionConfig(max_new_tokens=16, stop_ids=(EOS,)),
            ),
        )
        async with asyncio.TaskGroup() as tg:
            vt = tg.create_task(verifier.run())
            nt = tg.create_task(node.run())
            await verifier.ready.wait()
            await node.ready.wait()
            await asyncio.wait_for(node.generate_ids([5, 6, 7, 8], session_id="s0"), 120)
            async with serve_metrics(node.metrics.registry, port=0) as port:
                url = f"http://127.0.0.1:{port}/metrics"
                body = await asyncio.to_thread(
                    lambda: urllib.request.urlopen(url, timeout=5).read()
                )
            vt.cancel()
            nt.cancel()
    text = body.decode()
    assert _sample(text, "mw_device_sessions_total") == 1
    assert _sample(text, "mw_device_round_trip_seconds_count") >= 1
    assert _sample(text, "mw_device_draft_seconds_count") >= 1
    assert _sample(text, "mw_device_draft_tokens_total") >= _sample(
        text, "mw_device_accepted_tokens_total"
    )
    assert _sample(text, "mw_device_committed_tokens_total") >= 1
    assert "mw_device_offline_seconds_bucket" in text  # present, though empty
    r = await asyncio.to_thread(
        subprocess.run, [promtool, "check", "metrics"], input=body, capture_output=True, timeout=60
    )
    assert r.returncode == 0, (r.stdout + r.stderr).decode()
