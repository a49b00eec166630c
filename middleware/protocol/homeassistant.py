"""Home Assistant MQTT discovery: retained configs under ``homeassistant/`` that turn each
device and verifier into an HA device with sensors, with no hand-written templates.

Every entity reads the retained JSON status the middleware already publishes
(``{prefix}/device/{id}/status``, ``{prefix}/verifier/{id}/status``): availability from its
``online`` field, values through ``value_template``.  Removing a device publishes an empty
retained payload on each config topic, which is how Home Assistant deletes a discovered entity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from middleware.protocol.topics import HA_PREFIX, Topics

ORIGIN = {"name": "edge-specdec-middleware"}
_AVAILABLE = "{{ 'online' if value_json.online else 'offline' }}"


@dataclass(frozen=True, slots=True)
class Entity:
    component: str  # sensor | binary_sensor
    object_id: str
    name: str
    value_template: str
    extra: tuple[tuple[str, object], ...] = ()


# Both a device and a verifier: availability and the share of draft tokens accepted.
ONLINE = Entity(
    "binary_sensor",
    "online",
    "Online",
    "{{ 'ON' if value_json.online else 'OFF' }}",
    (("device_class", "connectivity"), ("payload_on", "ON"), ("payload_off", "OFF")),
)
ACCEPTANCE = Entity(
    "sensor",
    "acceptance",
    "Draft acceptance",
    "{{ ((value_json.stats.acceptance_rate | float(0)) * 100) | round(1) }}",
    (("unit_of_measurement", "%"), ("state_class", "measurement")),
)

DEVICE_ENTITIES = (
    ONLINE,
    Entity(
        "sensor",
        "sessions",
        "Active sessions",
        "{{ value_json.sessions | length }}",
        (("state_class", "measurement"),),
    ),
    ACCEPTANCE,
    Entity(
        "sensor",
        "tokens_per_s",
        "Tokens per second",
        "{{ (value_json.stats.tokens_per_s | float(0)) | round(1) }}",
        (("unit_of_measurement", "tok/s"), ("state_class", "measurement")),
    ),
    Entity(
        "sensor",
        "sessions_done",
        "Sessions finished",
        "{{ value_json.stats.sessions_done | int(0) }}",
        (("state_class", "total_increasing"),),
    ),
)

VERIFIER_ENTITIES = (
    ONLINE,
    Entity(
        "sensor",
        "status",
        "Status",
        "{{ value_json.state }}",
    ),
    Entity(
        "sensor",
        "sessions",
        "Live sessions (load)",
        "{{ value_json.sessions | int(0) }}",
        (("state_class", "measurement"),),
    ),
    ACCEPTANCE,
    Entity(
        "sensor",
        "mean_batch_size",
        "Mean batch size",
        "{{ (value_json.stats.mean_batch_size | float(0)) | round(2) }}",
        (("state_class", "measurement"),),
    ),
)


def _configs(
    topics: Topics,
    kind: str,
    ident: str,
    status_topic: str,
    entities: tuple[Entity, ...],
    model: str,
    discovery_prefix: str,
) -> list[tuple[str, bytes]]:
    node = topics.ha_node_id(kind, ident)
    device = {
        "identifiers": [node],
        "name": f"mw {kind} {ident}",
        "manufacturer": "edge-specdec-middleware",
        "model": model or kind,
    }
    out = []
    for e in entities:
        cfg: dict[str, object] = {
            "name": e.name,
            "unique_id": f"{node}_{e.object_id}",
            "state_topic": status_topic,
            "value_template": e.value_template,
            "device": device,
            "origin": ORIGIN,
            **dict(e.extra),
        }
        if e.object_id != "online":  # the connectivity sensor stays available when offline
            cfg |= {
                "availability_topic": status_topic,
                "availability_template": _AVAILABLE,
                "payload_available": "online",
                "payload_not_available": "offline",
            }
        topic = topics.ha_discovery(e.component, node, e.object_id, discovery_prefix)
        out.append((topic, json.dumps(cfg, separators=(",", ":")).encode()))
    return out


def device_configs(
    topics: Topics, device_id: str, drafter: str = "", discovery_prefix: str = HA_PREFIX
) -> list[tuple[str, bytes]]:
    """(topic, retained payload) for each of a device's entities."""
    return _configs(
        topics,
        "device",
        device_id,
        topics.device_status(device_id),
        DEVICE_ENTITIES,
        f"drafter {drafter}" if drafter else "device",
        discovery_prefix,
    )


def verifier_configs(
    topics: Topics, verifier_id: str, model: str = "", discovery_prefix: str = HA_PREFIX
) -> list[tuple[str, bytes]]:
    return _configs(
        topics,
        "verifier",
        verifier_id,
        topics.verifier_status(verifier_id),
        VERIFIER_ENTITIES,
        model,
        discovery_prefix,
    )


def device_removal(topics: Topics, device_id: str, discovery_prefix: str = HA_PREFIX) -> list[str]:
    """The config topics to clear (empty retained payload) when a device is decommissioned."""
    return [t for t, _ in device_configs(topics, device_id, "", discovery_prefix)]
