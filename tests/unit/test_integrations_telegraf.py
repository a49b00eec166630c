"""deploy/integrations/telegraf: the configuration is checked without Telegraf itself.

Telegraf is in none of the registries this project installs from (not in Debian
bookworm; PyPI and npm have only unrelated clients; building it needs Go >= 1.22, Debian
has 1.19), so this test does what can be done here: the file parses as TOML; every key is
one Telegraf reads (the ``toml`` tags of the mqtt_consumer plugin's ``MQTTConsumer`` and
of the json_v2 parser's ``Config``, ``DataSet`` and ``Object`` structs, telegraf
plugins/inputs/mqtt_consumer and plugins/parsers/json_v2/parser.go); the subscribed
topics are the ones the code builds; and each json_v2 path, evaluated (the GJSON subset
used: dotted keys and ``.#``, with json_v2's type conversions) against payloads encoded by
the project's own codec, yields the string, bool and number fields a user expects, the
string ``text`` and the bool ``online`` included (the old json parser dropped both).
What is not run: Telegraf's own loader and its MQTT client."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from middleware.nodes.service import offline_status_payload
from middleware.protocol import DeviceStatus, Result, Topics, VerifierStatus

CONF = Path(__file__).resolve().parents[2] / "deploy" / "integrations" / "telegraf"
CONF = CONF / "mw-telegraf.conf"

MQTT_CONSUMER_KEYS = {
    "servers", "topics", "topic_tag", "topic_parsing", "username", "password", "qos",
    "connection_timeout", "keepalive", "ping_timeout", "max_undelivered_messages",
    "persistent_session", "client_trace", "client_id", "tls_ca", "tls_cert", "tls_key",
    "insecure_skip_verify", "data_format", "json_v2", "name_override", "name_prefix",
    "name_suffix", "tags", "alias",
}  # fmt: skip
JSON_V2_KEYS = {
    "measurement_name", "measurement_name_path", "timestamp_path", "timestamp_format",
    "timestamp_timezone", "field", "tag", "object",
}  # fmt: skip
DATASET_KEYS = {"path", "type", "rename", "optional"}
OBJECT_KEYS = {
    "path", "optional", "timestamp_key", "timestamp_format", "timestamp_timezone", "renames",
    "fields", "tags", "included_keys", "excluded_keys", "disable_prepend_keys", "field", "tag",
}  # fmt: skip
TYPES = {"float", "int", "uint", "string", "bool"}


def _conf() -> dict[str, Any]:
    return tomllib.loads(CONF.read_text())


def _consumers() -> list[dict[str, Any]]:
    return list(_conf()["inputs"]["mqtt_consumer"])


def _gjson(doc: Any, path: str) -> Any:
    """The GJSON subset the configuration uses: ``a.b`` keys and ``a.#`` (array length)."""
    value = doc
    for part in path.split("."):
        if part == "#":
            if not isinstance(value, list):
                raise KeyError(path)
            value = len(value)
        elif any(c in part for c in "*?|@()[]{}\\"):
            pytest.fail(f"GJSON syntax beyond this test's subset: {path!r}")
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise KeyError(path)
    return value


def _convert(value: Any, typ: str, where: str) -> Any:
    """json_v2's conversions (parser.go convertType) for the scalar types used here."""
    if typ == "string":
        return value if isinstance(value, str) else json.dumps(value)
    if typ == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if value in (0, 1) and not isinstance(value, float):
            return bool(value)
        raise AssertionError(f"{where}: {value!r} cannot become a bool")
    if typ in ("int", "uint", "float"):
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise AssertionError(f"{where}: {value!r} cannot become {typ}")
        return float(value) if typ == "float" else int(float(value))
    return value


def _metric(block: dict[str, Any], payload: bytes) -> tuple[dict[str, str], dict[str, Any]]:
    """Tags and fields json_v2 makes of ``payload`` for one ``[[json_v2]]`` block."""
    doc = json.loads(payload)
    tags: dict[str, str] = {}
    fields: dict[str, Any] = {}
    for tag in block.get("tag", []):
        try:
            v = _gjson(doc, tag["path"])
        except KeyError:
            assert tag.get("optional"), f"tag {tag['path']} missing from {doc}"
            continue
        tags[tag.get("rename") or tag["path"].split(".")[-1]] = _convert(v, "string", "tag")
    for f in block.get("field", []):
        try:
            v = _gjson(doc, f["path"])
        except KeyError:
            assert f.get("optional"), f"field {f['path']} missing from {doc}"
            continue
        assert not isinstance(v, dict | list), f"{f['path']}: an object needs [[object]]"
        name = f.get("rename") or f["path"].split(".")[-1]
        fields[name] = _convert(v, f.get("type", ""), name)
    for obj in block.get("object", []):
        try:
            v = _gjson(doc, obj["path"])
        except KeyError:
            assert obj.get("optional"), f"object {obj['path']} missing from {doc}"
            continue
        assert isinstance(v, dict), obj["path"]
        fields.update(v)
    return tags, fields


def test_every_key_is_one_telegraf_reads() -> None:
    conf = _conf()
    assert set(conf) <= {"agent", "inputs", "outputs", "global_tags"}
    assert set(conf["inputs"]) == {"mqtt_consumer"}
    for c in _consumers():
        assert set(c) <= MQTT_CONSUMER_KEYS, set(c) - MQTT_CONSUMER_KEYS
        assert c["data_format"] == "json_v2"
        assert c["qos"] in (0, 1, 2)
        assert all(s.startswith(("tcp://", "ssl://", "ws://")) for s in c["servers"])
        for block in c["json_v2"]:
            assert set(block) <= JSON_V2_KEYS, set(block) - JSON_V2_KEYS
            assert block["measurement_name"].startswith("mw_")
            for ds in [*block.get("field", []), *block.get("tag", [])]:
                assert set(ds) <= DATASET_KEYS and ds["path"], ds
                assert ds.get("type", "string") in TYPES, ds
            for obj in block.get("object", []):
                assert set(obj) <= OBJECT_KEYS and obj["path"], obj


def test_topics_are_the_ones_the_code_builds() -> None:
    t = Topics("mw/v1")
    subscribed = sorted(topic for c in _consumers() for topic in c["topics"])
    assert subscribed == sorted(
        [t.all_device_status(), t.all_verifier_status(), t.all_sessions("result")]
    )


def _block_for(topic: str) -> dict[str, Any]:
    (c,) = [c for c in _consumers() if topic in c["topics"]]
    (block,) = c["json_v2"]
    return block


def test_device_status_keeps_online_and_strings() -> None:
    block = _block_for(Topics("mw/v1").all_device_status())
    online = DeviceStatus(
        device_id="pi-1",
        state="online",
        drafter="ngram",
        sessions=("s1", "s2"),
        stats={"acceptance_rate": 0.75, "tokens_per_s": 12.5},
        at=1_760_000_000.0,
    )
    tags, fields = _metric(block, online.encode())
    assert tags == {"device": "pi-1", "state": "online"}
    assert fields["online"] is True
    assert fields["drafter"] == "ngram"
    assert fields["active_sessions"] == 2
    assert fields["acceptance_rate"] == 0.75 and fields["tokens_per_s"] == 12.5
    # The last will a dead device leaves retained: online false, no stats, no time.
    tags, fields = _metric(block, offline_status_payload("pi-1"))
    assert tags["state"] == "offline" and fields["online"] is False


def test_verifier_status_fields() -> None:
    block = _block_for(Topics("mw/v1").all_verifier_status())
    v = VerifierStatus(
        verifier_id="v1", state="degraded", model="smollm2", sessions=3, stats={"rounds": 9.0}
    )
    tags, fields = _metric(block, v.encode())
    assert tags == {"verifier": "v1", "state": "degraded"}
    assert fields == {"online": True, "model": "smollm2", "sessions": 3, "rounds": 9.0}


def test_result_keeps_text() -> None:
    block = _block_for(Topics("mw/v1").all_sessions("result"))
    r = Result(
        session_id="s1",
        device_id="pi-1",
        text="MQTT is a lightweight protocol.",
        n_tokens=8,
        finish_reason="stop",
        verified=True,
        stats={"acceptance_rate": 0.5},
    )
    tags, fields = _metric(block, r.encode())
    assert tags == {"device": "pi-1", "session": "s1", "finish_reason": "stop"}
    assert fields["text"] == r.text
    assert fields["verified"] is True and fields["tokens"] == 8
    assert fields["acceptance_rate"] == 0.5
