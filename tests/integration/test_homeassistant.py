"""Home Assistant discovery on a real Mosquitto: a node's retained configs under
``homeassistant/`` use only keys of HA's documented MQTT discovery schema, point at the
device status topic, and are removed by ``mw-cli decommission``.  Also ``mw-cli stats``
lists every device and verifier once, and the offline will carries no 1970 timestamp."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

from middleware.broker_bridge.mqtt import MqttBus
from middleware.nodes.drafters import make_drafter
from middleware.nodes.service import NodeConfig, NodeService, offline_status_payload
from middleware.protocol import DeviceStatus, Topics, VerifierStatus
from tests.unit.tiny import TinyTokenizer

# From Home Assistant's docs, "MQTT Sensor" and "MQTT Binary sensor" configuration variables
# (https://www.home-assistant.io/integrations/sensor.mqtt/, .../binary_sensor.mqtt/) and the
# shared discovery keys (device, origin).
COMMON = {
    "availability",
    "availability_mode",
    "availability_template",
    "availability_topic",
    "default_entity_id",
    "device",
    "device_class",
    "enabled_by_default",
    "encoding",
    "entity_category",
    "entity_picture",
    "expire_after",
    "force_update",
    "icon",
    "json_attributes_template",
    "json_attributes_topic",
    "name",
    "object_id",
    "origin",
    "payload_available",
    "payload_not_available",
    "platform",
    "qos",
    "state_topic",
    "unique_id",
    "value_template",
}
ALLOWED = {
    "sensor": COMMON
    | {
        "last_reset_value_template",
        "options",
        "state_class",
        "suggested_display_precision",
        "unit_of_measurement",
    },
    "binary_sensor": COMMON | {"off_delay", "payload_off", "payload_on"},
}
DEVICE_KEYS = {
    "configuration_url",
    "connections",
    "hw_version",
    "identifiers",
    "manufacturer",
    "model",
    "model_id",
    "name",
    "serial_number",
    "suggested_area",
    "sw_version",
    "via_device",
}
ORIGIN_KEYS = {"name", "sw_version", "support_url"}
SENSOR_STATE_CLASSES = {"measurement", "total", "total_increasing"}


def _cli(mosquitto, prefix: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "middleware.cli.main", *args]
    cmd += ["--host", mosquitto.host, "--port", str(mosquitto.port), "--prefix", prefix]
    env = {k: v for k, v in os.environ.items() if k != "MW_CONFIG"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


async def _retained(bus: MqttBus, filter_: str, wait: float = 1.5) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    async with bus.subscribe(filter_) as sub:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while (left := deadline - loop.time()) > 0:
            try:
                msg = await sub.get(left)
            except TimeoutError:
                break
            out[msg.topic] = msg.payload
    return out


async def test_discovery_configs_follow_ha_schema_and_decommission_clears_them(
    mosquitto, mqtt_settings, unique_prefix
) -> None:
    topics = Topics(unique_prefix)
    node_id = topics.ha_node_id("device", "dev-1")
    async with (
        MqttBus(mqtt_settings(client_id=f"d-{unique_prefix[-8:]}")) as dbus,
        MqttBus(mqtt_settings(client_id=f"o-{unique_prefix[-8:]}")) as obs,
    ):
        node = NodeService(
            dbus,
            tokenizer=TinyTokenizer(),
            tokenizer_fp="tiny",
            drafter_factory=lambda: make_drafter("ngram"),
            drafter_name="ngram",
            config=NodeConfig(device_id="dev-1", prefix=unique_prefix),
        )
        async with asyncio.TaskGroup() as tg:
            nt = tg.create_task(node.run())
            await node.ready.wait()
            nt.cancel()
        found = {t: p for t, p in (await _retained(obs, "homeassistant/#")).items() if node_id in t}
        assert len(found) >= 5, found.keys()
        objects = set()
        for topic, payload in found.items():
            prefix, component, node, obj, leaf = topic.split("/")
            assert (prefix, node, leaf) == ("homeassistant", node_id, "config")
            cfg = json.loads(payload)
            assert set(cfg) <= ALLOWED[component], set(cfg) - ALLOWED[component]
            assert set(cfg["device"]) <= DEVICE_KEYS and cfg["device"]["identifiers"] == [node_id]
            assert set(cfg["origin"]) <= ORIGIN_KEYS and cfg["origin"]["name"]
            assert cfg["state_topic"] == topics.device_status("dev-1")
            assert cfg["unique_id"] == f"{node_id}_{obj}"
            if "availability_topic" in cfg:
                assert cfg["availability_topic"] == topics.device_status("dev-1")
            if component == "sensor" and "state_class" in cfg:
                assert cfg["state_class"] in SENSOR_STATE_CLASSES
            objects.add(obj)
        assert {"online", "sessions", "acceptance", "tokens_per_s"} <= objects

        r = await asyncio.to_thread(_cli, mosquitto, unique_prefix, "decommission", "dev-1")
        assert r.returncode == 0, r.stderr
        after = await _retained(obs, "homeassistant/#")
        assert not [t for t in after if node_id in t]  # HA deletes entities on empty configs
        assert not await _retained(obs, topics.device_status("dev-1"), 0.5)


def test_offline_will_has_no_epoch_timestamp() -> None:
    d = json.loads(offline_status_payload("dev-1"))
    assert d["state"] == "offline" and "at" not in d  # 0.0 would read as 1970


async def test_stats_lists_each_device_and_verifier_once(
    mosquitto, mqtt_settings, unique_prefix
) -> None:
    t = Topics(unique_prefix)
    async with MqttBus(mqtt_settings(client_id=f"p-{unique_prefix[-8:]}")) as bus:
        for dev in ("pi-1", "pi-2"):
            s = DeviceStatus(device_id=dev, state="online", drafter="ngram", at=1.7e9)
            await bus.publish(t.device_status(dev), s.encode(), qos=1, retain=True)
        for _ in range(2):  # published twice: still one row
            v = VerifierStatus(verifier_id="v-1", state="online", model="m", at=1.7e9)
            await bus.publish(t.verifier_status("v-1"), v.encode(), qos=1, retain=True)
        r = await asyncio.to_thread(_cli, mosquitto, unique_prefix, "stats", "--json")
        assert r.returncode == 0, r.stderr
        rows = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
        assert sorted((x["type"], x["id"]) for x in rows) == [
            ("device_status", "pi-1"),
            ("device_status", "pi-2"),
            ("verifier_status", "v-1"),
        ]
        r = await asyncio.to_thread(_cli, mosquitto, unique_prefix, "stats")
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("pi-1") == 1 and r.stdout.count("pi-2") == 1
        assert r.stdout.count("v-1") == 1
        for topic in (t.device_status("pi-1"), t.device_status("pi-2"), t.verifier_status("v-1")):
            await bus.publish(topic, b"", qos=1, retain=True)


def test_verifier_configs_follow_ha_schema() -> None:
    from middleware.protocol.homeassistant import verifier_configs

    t = Topics("mw/v1")
    configs = verifier_configs(t, "v-1", "SmolLM2-135M")
    assert {topic.split("/")[3] for topic, _ in configs} >= {"online", "status", "sessions"}
    for topic, payload in configs:
        component = topic.split("/")[1]
        cfg = json.loads(payload)
        assert set(cfg) <= ALLOWED[component], set(cfg) - ALLOWED[component]
        assert cfg["state_topic"] == t.verifier_status("v-1")
