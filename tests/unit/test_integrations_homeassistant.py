"""deploy/integrations/homeassistant: the package and the dashboard card, checked without
Home Assistant (the ``homeassistant`` PyPI package pulls in ~100 dependencies and pins its
own versions of ours; it is not installed).

Checked: every key is one of Home Assistant's documented configuration variables (MQTT
sensor, input_text, script, automation triggers/conditions/actions, the dashboard cards);
the MQTT topics are the ones the code builds; each Jinja template renders, with stand-ins
for HA's template functions, against payloads encoded by the project's own codec (the
script's payload is decoded by the device's inbox parser; the result sensor keeps the
text); every entity the card and automations name is created by MQTT discovery
(middleware/protocol/homeassistant.py, slugified as HA does) or by the package.
Not run: Home Assistant's own config check and its MQTT client."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import jinja2
import yaml

from middleware.protocol import PromptRequest, Result, Topics
from middleware.protocol.homeassistant import device_configs
from tests.integration.test_homeassistant import ALLOWED

HA = Path(__file__).resolve().parents[2] / "deploy" / "integrations" / "homeassistant"
DEVICE = "pi-1"
T = Topics("mw/v1")

# From Home Assistant's docs: Packages, Input Text, Scripts, Automation YAML, the MQTT and
# State triggers, the Template condition, the MQTT publish action, the Entities, Markdown
# and Vertical Stack cards (home-assistant.io/docs/..., /integrations/..., /dashboards/...).
PACKAGE_KEYS = {"mqtt", "input_text", "script", "automation"}
INPUT_TEXT_KEYS = {"name", "min", "max", "initial", "icon", "pattern", "mode"}
SCRIPT_KEYS = {"alias", "description", "sequence", "mode", "icon", "fields", "max", "variables"}
AUTOMATION_KEYS = {
    "id", "alias", "description", "mode", "max", "max_exceeded", "initial_state", "trace",
    "variables", "trigger_variables", "triggers", "conditions", "actions",
}  # fmt: skip
TRIGGER_KEYS = {
    "mqtt": {"trigger", "topic", "payload", "value_template", "encoding", "qos", "id"},
    "state": {"trigger", "entity_id", "from", "to", "not_from", "not_to", "for", "attribute", "id"},
}
CONDITION_KEYS = {"template": {"condition", "value_template", "alias", "enabled"}}
ACTION_KEYS = {"action", "data", "target", "alias", "enabled", "continue_on_error"}
ACTION_DATA = {
    "mqtt.publish": {"topic", "payload", "qos", "retain", "evaluate_payload"},
    "persistent_notification.create": {"title", "message", "notification_id"},
}
CARD_KEYS = {
    "vertical-stack": {"type", "cards", "title"},
    "entities": {"type", "title", "entities", "show_header_toggle", "state_color", "icon"},
    "markdown": {"type", "title", "content", "text_only"},
}
ENTITY_ROW_KEYS = {"entity", "name", "icon", "secondary_info", "format"}
BUTTON_ROW_KEYS = {"type", "name", "icon", "action_name", "tap_action", "entity"}


def _load(name: str) -> Any:
    return yaml.safe_load((HA / name).read_text())


def _slug(text: str) -> str:
    """Home Assistant's slugify for entity ids: lower case, runs of other characters as ``_``."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _discovered() -> set[str]:
    """Entity ids HA gives the discovery configs of device pi-1 (device name + entity name)."""
    out = set()
    for topic, payload in device_configs(T, DEVICE, "ngram"):
        cfg = json.loads(payload)
        out.add(f"{topic.split('/')[1]}.{_slug(cfg['device']['name'] + ' ' + cfg['name'])}")
    return out


def _package_entities() -> set[str]:
    pkg = _load("mw_package.yaml")
    out = {f"sensor.{_slug(s['name'])}" for s in pkg["mqtt"]["sensor"]}
    out |= {f"input_text.{k}" for k in pkg["input_text"]}
    out |= {f"script.{k}" for k in pkg["script"]}
    return out


class _States:
    """``states('x.y')``, ``states.x.y.last_changed``: HA's template state access, stubbed."""

    def __init__(self, values: dict[str, str]) -> None:
        self._values = values

    def __call__(self, entity_id: str) -> str:
        return self._values.get(entity_id, "unknown")

    def __getattr__(self, domain: str) -> Any:
        class _Domain:
            def __getattr__(self, _name: str) -> Any:
                return type("S", (), {"last_changed": dt.datetime(2026, 12, 4, 12, 0)})()

        return _Domain()


def _env(states: dict[str, str] | None = None, attrs: dict[str, Any] | None = None) -> Any:
    env = jinja2.Environment()  # lenient undefined values, as HA's (it only logs a warning)
    env.filters["float"] = lambda v, default=0.0: float(v) if v is not None else default
    env.filters["int"] = lambda v, default=0: int(float(v)) if v is not None else default
    env.globals.update(
        states=_States(states or {}),
        state_attr=lambda e, a: (attrs or {}).get(a),
        now=lambda: dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.UTC),
        as_local=lambda d: d,
    )
    return env


def _render(template: str, **ctx: Any) -> str:
    return str(
        _env(**{k: ctx.pop(k) for k in ("states", "attrs") if k in ctx})
        .from_string(template)
        .render(**ctx)
    )


def _result() -> tuple[Result, dict[str, Any]]:
    r = Result("s-7", DEVICE, 'MQTT is a "lightweight" protocol.', 9, "stop", True)
    return r, json.loads(r.encode())


def test_package_keys_and_topics() -> None:
    pkg = _load("mw_package.yaml")
    assert set(pkg) <= PACKAGE_KEYS
    for sensor in pkg["mqtt"]["sensor"]:
        assert set(sensor) <= ALLOWED["sensor"], set(sensor) - ALLOWED["sensor"]
        assert sensor["state_topic"] == T.device_sessions(DEVICE, "result")
        assert sensor["json_attributes_topic"] == T.device_sessions(DEVICE, "result")
    for box in pkg["input_text"].values():
        assert set(box) <= INPUT_TEXT_KEYS and box["max"] <= 255
    for script in pkg["script"].values():
        assert set(script) <= SCRIPT_KEYS
        for step in script["sequence"]:
            assert set(step) <= ACTION_KEYS and set(step["data"]) <= ACTION_DATA[step["action"]]
            if step["action"] == "mqtt.publish":
                assert step["data"]["topic"] == T.device_inbox(DEVICE)
    for auto in pkg["automation"]:
        assert set(auto) <= AUTOMATION_KEYS, set(auto) - AUTOMATION_KEYS
        for trig in auto["triggers"]:
            assert set(trig) <= TRIGGER_KEYS[trig["trigger"]], trig
            if trig["trigger"] == "mqtt":
                assert trig["topic"] == T.device_sessions(DEVICE, "result")
        for cond in auto.get("conditions", []):
            assert set(cond) <= CONDITION_KEYS[cond["condition"]], cond
        for act in auto["actions"]:
            assert set(act) <= ACTION_KEYS and set(act["data"]) <= ACTION_DATA[act["action"]]


def test_result_sensor_keeps_the_text() -> None:
    (sensor,) = _load("mw_package.yaml")["mqtt"]["sensor"]
    r, value_json = _result()
    assert _render(sensor["value_template"], value_json=value_json) == "stop"
    attrs = json.loads(_render(sensor["json_attributes_template"], value_json=value_json))
    assert attrs == {"text": r.text, "verified": True, "session": "s-7", "tokens": 9}


def test_ask_script_payload_is_a_valid_inbox_prompt() -> None:
    (script,) = _load("mw_package.yaml")["script"].values()
    (step,) = script["sequence"]
    payload = _render(step["data"]["payload"], states={"input_text.mw_pi_1_prompt": 'Why "MQTT"?'})
    req = PromptRequest.parse(payload.encode())  # the device's own inbox decoder
    assert req.prompt == 'Why "MQTT"?' and req.max_new_tokens == 64
    assert req.session_id and req.session_id.startswith("ha-")


def test_answer_automation_fires_on_verified_results_only() -> None:
    auto = next(a for a in _load("mw_package.yaml")["automation"] if "answer" in a["id"])
    cond = auto["conditions"][0]["value_template"]
    r, payload_json = _result()
    assert _render(cond, trigger={"payload_json": payload_json}) == "True"
    unverified = json.loads(Result("s-8", DEVICE, "x", 1, "stop", False).encode())
    assert _render(cond, trigger={"payload_json": unverified}) == "False"
    assert _render(cond, trigger={}) == "False"  # a cleared retained result: no JSON
    data = auto["actions"][0]["data"]
    assert _render(data["message"], trigger={"payload_json": payload_json}) == r.text
    assert "9 tokens, stop" in _render(data["title"], trigger={"payload_json": payload_json})


def test_every_entity_named_exists() -> None:
    known = _discovered() | _package_entities()
    assert "binary_sensor.mw_device_pi_1_online" in _discovered()
    text = "\n".join(
        line
        for name in ("mw_package.yaml", "dashboard-card.yaml")
        for line in (HA / name).read_text().splitlines()
        if not line.lstrip().startswith("#")
    )
    named = set(re.findall(r"\b((?:binary_sensor|sensor|input_text|script)\.[a-z0-9_]+)", text))
    assert named and named <= known, named - known


def test_dashboard_card_keys_and_markdown() -> None:
    card = _load("dashboard-card.yaml")
    assert set(card) <= CARD_KEYS[card["type"]]
    for sub in card["cards"]:
        assert set(sub) <= CARD_KEYS[sub["type"]], sub
        for row in sub.get("entities", []):
            assert set(row) <= (BUTTON_ROW_KEYS if row.get("type") else ENTITY_ROW_KEYS), row
            if row.get("type") == "button":
                assert row["tap_action"]["action"] == "perform-action"
    md = next(c for c in card["cards"] if c["type"] == "markdown")["content"]
    r, _ = _result()
    attrs = {"text": r.text, "verified": True, "tokens": 9, "session": "s-7"}
    shown = _render(md, states={"sensor.pi_1_last_answer": "stop"}, attrs=attrs)
    assert r.text in shown and "**verified**" in shown and "9 tokens, stop" in shown
    assert "No answer yet." in _render(md, attrs={})
