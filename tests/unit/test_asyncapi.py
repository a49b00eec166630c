"""docs/asyncapi.yaml must describe the topic API the code implements.

Checks: AsyncAPI 3 structure and references; one channel per topic shape of
``Topics.all_patterns()`` and nothing else; every message type with payload
properties equal to the encoder's field names and ``required`` equal to what
the decoder needs; content types; QoS/retain/expiry per send operation; the
examples decode; and the payload schemas never refuse what the decoder accepts.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path
from typing import Any

import msgpack
import pytest

from middleware.broker_bridge.bus import CONTENT_JSON, CONTENT_MSGPACK
from middleware.errors import ProtocolError
from middleware.protocol import (
    MESSAGE_TYPES,
    SCHEMA_VERSION,
    CloseSession,
    DeviceStatus,
    Draft,
    OpenSession,
    PromptRequest,
    Result,
    SamplingParams,
    SessionState,
    SparseDist,
    TextChunk,
    Topics,
    Verdict,
    VerifierStatus,
    decode,
)
from middleware.protocol.topics import DEFAULT_SHARE_GROUP

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read docs/asyncapi.yaml")

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.yaml"
PARAM_FOR_ROOT = {"session": "sessionId", "device": "deviceId", "verifier": "verifierId"}
MSGPACK_TAGS = {"open", "draft", "verdict", "state", "close"}
DRAFT_EXPIRY_S = 30  # the device sets this on drafts and closes (middleware.nodes.link)
RETAINED_EXPIRY_S = 86_400  # [bus] retained_expiry_s's default, on results

# What the code publishes, per (channel, message tag): (qos, retain, message expiry in s).
SEND_POLICY: dict[tuple[str, str], tuple[int, bool, int | None]] = {
    ("sessionOpen", "open"): (1, False, None),
    ("sessionDraft", "draft"): (1, False, DRAFT_EXPIRY_S),
    ("sessionDraft", "close"): (1, False, DRAFT_EXPIRY_S),
    ("sessionVerdict", "verdict"): (1, False, None),
    ("sessionState", "state"): (1, True, None),
    ("sessionText", "text"): (2, False, None),  # exactly once to QoS 2 subscribers
    ("sessionResult", "result"): (1, True, RETAINED_EXPIRY_S),
    ("deviceStatus", "device_status"): (1, True, None),
    ("deviceInbox", "prompt"): (1, False, None),
    ("verifierStatus", "verifier_status"): (1, True, None),
}
LAST_WILL_CHANNELS = {"deviceStatus", "verifierStatus"}

# One fully populated value per type (every optional wire field present).
FULL: dict[str, Any] = {
    "open": OpenSession(
        "s-1",
        "pi-1",
        2,
        5,
        "fp",
        (1, 2),
        committed=(3,),
        sampling=SamplingParams("coupled", 7, 0.8, 40, 0.9),
        max_new_tokens=64,
        stop_ids=(2,),
        drafter="ngram",
        sent_at=12.5,
    ),
    "draft": Draft(
        "s-1",
        2,
        6,
        3,
        (4, 5),
        q=(SparseDist((4, 9), (0.5, 0.25)), SparseDist((5,), (0.9,))),
        sent_at=13.0,
        think_ms=1.5,
        token_ms=12.0,
    ),
    "close": CloseSession("s-1", 2, 7, reason="done"),
    "verdict": Verdict(
        "s-1", 2, 6, "resync", reason="stale", committed_len=9, verifier_id="v-1", echo_ts=13.0
    ),
    "state": SessionState(
        "s-1", "pi-1", 2, "v-1", "open", (1, 2, 3), prompt_len=2, finish_reason="", updated_at=1.5
    ),
    "device_status": DeviceStatus("pi-1", "online", "ngram", "fp", ("s-1",), {"a": 0.5}, 1.5),
    "verifier_status": VerifierStatus("v-1", "degraded", "m", "fp", 3, {"b": 2.0}, 1.5),
    "text": TextChunk("s-1", "pi-1", 0, "provisional", 0, 2, "Hi", final=True, lossy=True),
    "result": Result(
        "s-1", "pi-1", "Hi.", 3, "refused", False, {"tok_s": 9.5}, lossy=False, error="full"
    ),
    "prompt": PromptRequest(
        "Hello", session_id="s-9", max_new_tokens=16, chat=False, request_id="r-1"
    ),
}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    with DOC_PATH.open(encoding="utf-8") as fh:
        loaded = yaml.safe_load(fh)
    assert isinstance(loaded, dict)
    return loaded


def resolve(doc: dict[str, Any], node: Any) -> Any:
    """Follow local ``$ref`` pointers until a non-reference node."""
    seen = 0
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), f"only local references are used: {ref}"
        node = doc
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        seen += 1
        assert seen < 20, "reference cycle"
    return node


def walk_refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        out = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        for v in node.values():
            out += walk_refs(v)
        return out
    if isinstance(node, list):
        return [r for v in node for r in walk_refs(v)]
    return []


def message_tag(doc: dict[str, Any], msg: dict[str, Any]) -> str | None:
    payload = resolve(doc, msg["payload"])
    t = payload.get("properties", {}).get("t")
    return resolve(doc, t).get("const") if t else None


def messages_by_tag(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for msg in doc["components"]["messages"].values():
        tag = message_tag(doc, msg)
        if tag is not None:
            assert tag not in out, f"two messages for tag {tag}"
            out[tag] = msg
    return out


def channel_of(doc: dict[str, Any], op: dict[str, Any]) -> str:
    ref = op["channel"]["$ref"]
    assert ref.startswith("#/channels/")
    return ref.removeprefix("#/channels/")


# --- a small JSON-Schema (draft-07 subset) checker, for the keywords the document uses ---

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
}
_KNOWN = {
    "type",
    "const",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "items",
    "additionalItems",
    "properties",
    "required",
    "additionalProperties",
    "maxProperties",
    "propertyNames",
    "description",
    "default",
    "title",
    "examples",
    "$ref",
}


def schema_errors(doc: dict[str, Any], schema: Any, value: Any, path: str = "$") -> list[str]:
    s = resolve(doc, schema)
    if s is True or s == {}:
        return []
    if s is False:
        return [f"{path}: not allowed"]
    unknown = set(s) - _KNOWN
    assert not unknown, f"checker lacks keywords {unknown} used at {path}"
    errs: list[str] = []
    if "type" in s:
        types = s["type"] if isinstance(s["type"], list) else [s["type"]]
        if not any(_TYPES[t](value) for t in types):
            return [f"{path}: {type(value).__name__} is not {types}"]
    if "const" in s and not (value == s["const"] and type(value) is type(s["const"])):
        errs.append(f"{path}: != {s['const']!r}")
    if "enum" in s and value not in s["enum"]:
        errs.append(f"{path}: not in {s['enum']}")
    if _TYPES["number"](value):
        if "minimum" in s and value < s["minimum"]:
            errs.append(f"{path}: < {s['minimum']}")
        if "maximum" in s and value > s["maximum"]:
            errs.append(f"{path}: > {s['maximum']}")
        if "exclusiveMinimum" in s and value <= s["exclusiveMinimum"]:
            errs.append(f"{path}: <= {s['exclusiveMinimum']}")
    if isinstance(value, str):
        if len(value) < s.get("minLength", 0) or len(value) > s.get("maxLength", math.inf):
            errs.append(f"{path}: length {len(value)}")
        if "pattern" in s:
            pat = s["pattern"][:-1] + r"\Z" if s["pattern"].endswith("$") else s["pattern"]
            if not re.search(pat, value):  # ECMA '$' does not match before a final newline
                errs.append(f"{path}: does not match {s['pattern']}")
    if isinstance(value, list):
        if len(value) < s.get("minItems", 0) or len(value) > s.get("maxItems", math.inf):
            errs.append(f"{path}: {len(value)} items")
        items = s.get("items", True)
        if isinstance(items, list):
            for i, v in enumerate(value):
                sub = items[i] if i < len(items) else s.get("additionalItems", True)
                errs += schema_errors(doc, sub, v, f"{path}[{i}]")
        else:
            for i, v in enumerate(value):
                errs += schema_errors(doc, items, v, f"{path}[{i}]")
    if isinstance(value, dict):
        props = s.get("properties", {})
        errs += [f"{path}: missing {k}" for k in s.get("required", []) if k not in value]
        if len(value) > s.get("maxProperties", math.inf):
            errs.append(f"{path}: {len(value)} properties")
        for k, v in value.items():
            if "propertyNames" in s:
                errs += schema_errors(doc, s["propertyNames"], k, f"{path}.<{k}>")
            sub = props[k] if k in props else s.get("additionalProperties", True)
            errs += schema_errors(doc, sub, v, f"{path}.{k}")
    return errs


def envelope(data: bytes) -> dict[str, Any]:
    return json.loads(data) if data[:1] == b"{" else msgpack.unpackb(data, raw=False)


def payload_schema(doc: dict[str, Any], tag: str) -> Any:
    return messages_by_tag(doc)[tag]["payload"]


# --- structure ---------------------------------------------------------------------------


def test_asyncapi_3_header_and_servers(doc: dict[str, Any]) -> None:
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["title"] and doc["info"]["version"]
    assert doc["defaultContentType"] == CONTENT_MSGPACK
    servers = doc["servers"]
    assert servers, "at least one server"
    for name, server in servers.items():
        assert server["protocol"] in ("mqtt", "secure-mqtt"), name
        assert str(server["protocolVersion"]) == "5", name
        for var in re.findall(r"{(\w+)}", server["host"]):
            assert var in server.get("variables", {}), f"{name}: undeclared {var}"
        assert server["bindings"]["mqtt"]["bindingVersion"] == "0.2.0"
    assert any(s["protocol"] == "mqtt" for s in servers.values())


def test_every_reference_resolves(doc: dict[str, Any]) -> None:
    refs = walk_refs(doc)
    assert len(refs) > 50
    for ref in refs:
        assert resolve(doc, {"$ref": ref}) is not None, ref


def test_channels_are_exactly_the_topic_tree(doc: dict[str, Any]) -> None:
    topics = Topics()
    expected = set()
    for pattern in topics.all_patterns():
        root = pattern.split("/")[2]
        expected.add(
            pattern.replace("{id}", "{" + PARAM_FOR_ROOT[root] + "}").replace(
                "{device}", "{deviceId}"
            )
        )
    addresses = {ch["address"] for ch in doc["channels"].values()}
    assert addresses == expected
    assert len(addresses) == len(doc["channels"])  # no topic described twice


def test_channel_addresses_are_real_topics(doc: dict[str, Any]) -> None:
    topics = Topics()
    for name, ch in doc["channels"].items():
        params = re.findall(r"{(\w+)}", ch["address"])
        own = params[-1]  # the id of the subtree; session topics also carry {deviceId} first
        assert len(params) == (2 if ch["address"].startswith("mw/v1/session/") else 1), name
        assert set(ch["parameters"]) == set(params), name
        for param in params:
            assert ch["parameters"][param]["$ref"] == f"#/components/parameters/{param}"
        topic = ch["address"]
        for i, param in enumerate(params):
            topic = topic.replace("{" + param + "}", f"x-{i}")
        ref = topics.parse(topic)  # raises TopicError for anything outside the tree
        assert PARAM_FOR_ROOT[ref.root] == own, name
        if ref.root == "session":
            assert (ref.device, ref.ident) == ("x-0", "x-1"), name
        for example in resolve(doc, ch["parameters"][own]).get("examples", []):
            filled = ch["address"].replace("{" + own + "}", example).replace("{deviceId}", "pi-1")
            assert topics.parse(filled).ident == example
        assert ch.get("description"), f"{name} needs a description"
    assert set(doc["components"]["parameters"]) == set(PARAM_FOR_ROOT.values())


def test_protocol_semantics_are_described(doc: dict[str, Any]) -> None:
    ch = doc["channels"]
    draft = ch["sessionDraft"]["description"]
    for word in ("base", "epoch", "seq", "catchup", "duplicate", "resync", "30 s"):
        assert word in draft, word
    opening = ch["sessionOpen"]["description"]
    assert f"$share/{DEFAULT_SHARE_GROUP}/mw/v1/session/+/+/open" in opening
    assert Topics().shared_open() in opening
    for word in ("epoch", "committed", "resync", "duplicate"):
        assert word in opening, word
    for kind in ("opened", "accept", "catchup", "resync", "refused"):
        assert kind in draft + opening + ch["sessionVerdict"]["description"]
    for name in LAST_WILL_CHANNELS:
        assert "last will" in ch[name]["description"]


# --- messages ------------------------------------------------------------------------------


def test_every_message_type_is_described(doc: dict[str, Any]) -> None:
    by_tag = messages_by_tag(doc)
    assert set(by_tag) == set(MESSAGE_TYPES)
    used = {r for r in walk_refs(doc["channels"])}
    for name in doc["components"]["messages"]:
        assert f"#/components/messages/{name}" in used, f"message {name} is on no channel"


def test_payload_properties_mirror_the_encoder(doc: dict[str, Any]) -> None:
    assert set(FULL) == set(MESSAGE_TYPES)
    for tag, value in FULL.items():
        env = envelope(value.encode())
        schema = resolve(doc, payload_schema(doc, tag))
        assert set(schema["properties"]) == set(env), tag
        assert resolve(doc, schema["properties"]["t"])["const"] == tag
        assert resolve(doc, schema["properties"]["v"])["const"] == SCHEMA_VERSION
    sampling = resolve(doc, resolve(doc, payload_schema(doc, "open"))["properties"]["sampling"])
    assert set(sampling["properties"]) == set(SamplingParams().to_wire())


def _decodes(tag: str, env: dict[str, Any]) -> bool:
    try:
        if tag == "prompt":
            PromptRequest.parse(json.dumps(env).encode())
        else:
            decode(msgpack.packb(env, use_bin_type=True))
    except ProtocolError:
        return False
    return True


def test_required_is_what_the_decoder_needs(doc: dict[str, Any]) -> None:
    for tag, value in FULL.items():
        env = envelope(value.encode())
        assert _decodes(tag, env)
        required = set(resolve(doc, payload_schema(doc, tag)).get("required", []))
        needed = {k for k in env if not _decodes(tag, {x: y for x, y in env.items() if x != k})}
        assert required == needed, tag


def test_content_types(doc: dict[str, Any]) -> None:
    assert CONTENT_MSGPACK == "application/msgpack" and CONTENT_JSON == "application/json"
    for tag, msg in messages_by_tag(doc).items():
        want = CONTENT_MSGPACK if tag in MSGPACK_TAGS else CONTENT_JSON
        assert msg["contentType"] == want, tag
        assert (FULL[tag].encode()[:1] == b"{") is (want == CONTENT_JSON), tag
        binding = msg["bindings"]["mqtt"]
        assert binding["contentType"] == want
        assert binding["payloadFormatIndicator"] == (1 if want == CONTENT_JSON else 0)
    inbox = [resolve(doc, m) for m in doc["channels"]["deviceInbox"]["messages"].values()]
    assert sorted(m["contentType"] for m in inbox) == ["application/json", "text/plain"]


def test_examples_decode_and_match_their_schema(doc: dict[str, Any]) -> None:
    checked = 0
    for name, msg in doc["components"]["messages"].items():
        tag = message_tag(doc, msg)
        assert msg.get("examples"), f"{name} has no example"
        for ex in msg["examples"]:
            payload = ex["payload"]
            assert schema_errors(doc, msg["payload"], payload) == [], name
            if tag is None:  # the plain-text prompt
                assert PromptRequest.parse(payload.encode()).prompt == payload
            elif tag == "prompt":
                assert PromptRequest.parse(json.dumps(payload).encode()).prompt
            elif tag in MSGPACK_TAGS:
                assert decode(msgpack.packb(payload, use_bin_type=True)).TYPE == tag
            else:
                assert decode(json.dumps(payload).encode()).TYPE == tag
            checked += 1
    assert checked >= len(MESSAGE_TYPES) + 1


# --- operations and MQTT bindings -------------------------------------------------------------


def test_operations_are_well_formed(doc: dict[str, Any]) -> None:
    tags = {t["name"] for t in doc["info"]["tags"]}
    actions: dict[str, set[str]] = {name: set() for name in doc["channels"]}
    for name, op in doc["operations"].items():
        assert op["action"] in ("send", "receive"), name
        ch = channel_of(doc, op)
        assert ch in doc["channels"], name
        actions[ch].add(op["action"])
        assert op["messages"], name
        for m in op["messages"]:  # AsyncAPI 3: a subset of the channel's messages
            assert m["$ref"].startswith(f"#/channels/{ch}/messages/"), (name, m)
            resolve(doc, m)
        assert {t["name"] for t in op["tags"]} <= tags, name
        assert op["bindings"]["mqtt"]["qos"] == (2 if ch == "sessionText" else 1), name
        assert op["bindings"]["mqtt"]["bindingVersion"] == "0.2.0"
        if "reply" in op:
            reply_ch = op["reply"]["channel"]["$ref"].removeprefix("#/channels/")
            for m in op["reply"]["messages"]:
                assert m["$ref"].startswith(f"#/channels/{reply_ch}/messages/")
    for ch, acts in actions.items():
        assert acts == {"send", "receive"}, f"{ch}: {acts}"


def test_send_bindings_match_the_code(doc: dict[str, Any]) -> None:
    seen: dict[tuple[str, str], tuple[int, bool, int | None]] = {}
    for name, op in doc["operations"].items():
        if op["action"] != "send":
            continue
        ch = channel_of(doc, op)
        b = op["bindings"]["mqtt"]
        for m in op["messages"]:
            tag = message_tag(doc, resolve(doc, m)) or "prompt"  # text/plain inbox prompt
            policy = (b["qos"], b["retain"], b.get("messageExpiryInterval"))
            assert seen.setdefault((ch, tag), policy) == policy, f"{name}: conflicting bindings"
    assert seen == SEND_POLICY


def test_receive_bindings_have_no_publish_fields(doc: dict[str, Any]) -> None:
    for name, op in doc["operations"].items():
        if op["action"] == "receive":
            assert set(op["bindings"]["mqtt"]) == {"qos", "bindingVersion"}, name


def test_last_wills(doc: dict[str, Any]) -> None:
    wills = {channel_of(doc, op) for op in doc["operations"].values() if "x-last-will" in op}
    assert wills == LAST_WILL_CHANNELS
    for op in doc["operations"].values():
        if "x-last-will" in op:
            assert op["action"] == "send"
            assert op["x-last-will"] == {"qos": 1, "retain": True, "state": "offline"}
    offline = [
        ex["payload"]
        for ex in doc["components"]["messages"]["deviceStatus"]["examples"]
        if ex["payload"]["state"] == "offline"
    ]
    assert offline and offline[0]["online"] is False


def test_draft_expiry_matches_the_device_code() -> None:
    link = pytest.importorskip("middleware.nodes.link")
    assert link.DRAFT_EXPIRY_S == DRAFT_EXPIRY_S


# --- the schemas against the decoder ------------------------------------------------------------


def test_encoded_values_satisfy_their_schema(doc: dict[str, Any]) -> None:
    for tag, value in FULL.items():
        assert schema_errors(doc, payload_schema(doc, tag), envelope(value.encode())) == [], tag


NASTY: list[Any] = [
    None,
    True,
    0,
    -1,
    1,
    2**24,
    2**31,
    2**62,
    2**63 - 1,
    0.5,
    1e17,
    float("nan"),
    "",
    "x",
    "a/b",
    "x" * 65,
    "x" * 5000,
    [],
    [1],
    [2**24],
    [[1], [0.5]],
    {},
    {"a": 1},
    {"a": "b"},
    {"mode": "beam"},
    list(range(300)),
]


def _mutate(rng: random.Random, v: Any) -> Any:
    if isinstance(v, list) and v and rng.random() < 0.5:
        v = list(v)
        i = rng.randrange(len(v))
        v[i] = _mutate(rng, v[i])
        return v
    if isinstance(v, dict) and v and rng.random() < 0.5:
        v = dict(v)
        k = rng.choice(list(v))
        v[k] = _mutate(rng, v[k])
        return v
    return rng.choice(NASTY)


def test_schemas_never_refuse_what_the_decoder_accepts(doc: dict[str, Any]) -> None:
    """Documentation may be looser than the code (cross-field rules), never stricter."""
    rng = random.Random(3)
    accepted = 0
    for _ in range(3000):
        tag = rng.choice(sorted(FULL))
        env = envelope(FULL[tag].encode())
        key = rng.choice([k for k in env if k not in ("v", "t", "online")])  # online is ignored
        env[key] = _mutate(rng, env[key])
        if not _decodes(tag, env):
            continue
        accepted += 1
        assert schema_errors(doc, payload_schema(doc, tag), env) == [], (tag, key, env[key])
    assert accepted > 200  # the loop exercised the accepting side, not only rejections


@pytest.mark.parametrize(
    ("tag", "key", "bad"),
    [
        ("draft", "tokens", [2**24]),
        ("draft", "tokens", list(range(257))),
        ("draft", "sid", "a/b"),
        ("draft", "sid", "a+b"),
        ("draft", "sid", "#"),
        ("draft", "epoch", 2**31),
        ("draft", "seq", 2**62),
        ("draft", "base", 32769),
        ("draft", "ts", -1.0),
        ("draft", "q", [[[1], [1.5]], [[2], [0.5]]]),
        ("open", "prompt", []),
        ("open", "stop", list(range(65))),
        ("open", "max_new", 0),
        ("open", "sampling", {"mode": "x"}),
        ("open", "sampling", {"top_p": 0.0}),
        ("open", "sampling", {"temperature": 0.0}),
        ("verdict", "kind", "maybe"),
        ("verdict", "acc", 257),
        ("verdict", "fin", "x" * 33),
        ("verdict", "vid", "x" * 65),
        ("state", "status", "gone"),
        ("state", "owner", "x" * 65),
        ("device_status", "state", "asleep"),
        ("device_status", "sessions", ["a/b"]),
        ("device_status", "stats", {"a": "1"}),
        ("verifier_status", "sessions", -1),
        ("text", "kind", "draft"),
        ("text", "text", 5),
        ("result", "verified", 1),
        ("prompt", "prompt", ""),
        ("prompt", "session", "a#b"),
        ("prompt", "max_new_tokens", -1),
        ("prompt", "chat", "yes"),
        ("close", "reason", "x" * 4097),
        ("draft", "v", 2),
    ],
)
def test_code_and_schema_both_refuse(doc: dict[str, Any], tag: str, key: str, bad: Any) -> None:
    env = envelope(FULL[tag].encode()) | {key: bad}
    assert not _decodes(tag, env)
    assert schema_errors(doc, payload_schema(doc, tag), env) != []
