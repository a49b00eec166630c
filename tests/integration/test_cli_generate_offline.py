"""`mw-cli generate` reads the device's retained status first: offline or unknown devices
fail at once with exit status 5 and a line saying why, instead of a silent --timeout wait."""

from __future__ import annotations

import asyncio

from middleware.broker_bridge.mqtt import MqttBus
from middleware.cli.tools import EXIT_DEVICE_UNAVAILABLE
from middleware.nodes.service import offline_status_payload
from middleware.protocol import Topics
from tests.integration.test_homeassistant import _cli


async def test_generate_fails_fast_for_offline_and_unknown_devices(
    mosquitto, mqtt_settings, unique_prefix
) -> None:
    t = Topics(unique_prefix)
    async with MqttBus(mqtt_settings(client_id=f"g-{unique_prefix[-8:]}")) as bus:
        await bus.publish(
            t.device_status("pi-off"), offline_status_payload("pi-off"), qos=1, retain=True
        )
        r = await asyncio.to_thread(
            _cli, mosquitto, unique_prefix, "generate", "hi", "--device", "pi-off"
        )
        assert r.returncode == EXIT_DEVICE_UNAVAILABLE, r.stderr
        assert "pi-off is offline" in r.stderr and not r.stdout
        r = await asyncio.to_thread(
            _cli, mosquitto, unique_prefix, "generate", "hi", "--device", "pi-none"
        )
        assert r.returncode == EXIT_DEVICE_UNAVAILABLE, r.stderr
        assert "pi-none has no retained status" in r.stderr
        await bus.publish(t.device_status("pi-off"), b"", qos=1, retain=True)
