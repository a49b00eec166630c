"""The topic tree: builders, parsing, CLI subtrees and MQTT filter matching."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from middleware.errors import TopicError
from middleware.protocol import DEFAULT_PREFIX, Topics, matches
from middleware.protocol.topics import (
    DEFAULT_SHARE_GROUP,
    DEVICE_LEAVES,
    ROOTS,
    SESSION_LEAVES,
    VERIFIER_LEAVES,
    TopicRef,
    check_filter,
    check_topic,
    strip_share,
)

T = Topics()
ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}\Z")
PROPS = settings(max_examples=200, deadline=None)
BAD_IDS = [
    "",
    "a/b",
    "a+b",
    "a#b",
    "+",
    "#",
    "/",
    "$x",
    "-lead",
    "_lead",
    ".lead",
    "a b",
    "x" * 65,
    "é",
    "a\n",
    "a\u0000",
]


# --- builders -----------------------------------------------------------------------


def test_default_prefix() -> None:
    assert DEFAULT_PREFIX == "mw/v1"
    assert T.prefix == DEFAULT_PREFIX


def test_documented_shapes() -> None:
    for leaf in SESSION_LEAVES:
        assert T.session("pi-1", "abc-1", leaf) == f"mw/v1/session/pi-1/abc-1/{leaf}"  # type: ignore[arg-type]
    assert T.device_status("pi-1") == "mw/v1/device/pi-1/status"
    assert T.device_inbox("pi-1") == "mw/v1/device/pi-1/inbox"
    assert T.verifier_status("v1") == "mw/v1/verifier/v1/status"
    assert SESSION_LEAVES == ("open", "draft", "verdict", "state", "text", "result")
    assert DEVICE_LEAVES == ("status", "inbox") and VERIFIER_LEAVES == ("status",)


def test_filters() -> None:
    assert T.all_sessions("draft") == "mw/v1/session/+/+/draft"
    assert T.all_sessions("#") == "mw/v1/session/+/+/#"
    assert T.device_sessions("pi-1", "verdict") == "mw/v1/session/pi-1/+/verdict"
    assert T.device_sessions("pi-1", "#") == "mw/v1/session/pi-1/+/#"
    assert T.shared_open() == f"$share/{DEFAULT_SHARE_GROUP}/mw/v1/session/+/+/open"
    assert T.shared_open("g1") == "$share/g1/mw/v1/session/+/+/open"
    assert T.all_device_status() == "mw/v1/device/+/status"
    assert T.all_verifier_status() == "mw/v1/verifier/+/status"
    assert T.everything() == "mw/v1/#"


def test_custom_prefix() -> None:
    t = Topics("site-a/edge/mw_v1")
    assert t.session("d", "s", "verdict") == "site-a/edge/mw_v1/session/d/s/verdict"
    assert t.parse("site-a/edge/mw_v1/device/d/inbox") == TopicRef("device", "d", "inbox")
    assert t.everything() == "site-a/edge/mw_v1/#"


@pytest.mark.parametrize(
    "prefix", ["", "/mw", "mw/", "mw//v1", "mw/+", "mw/#", "$SYS", "m w", "mw/v1\n", "x" * 129, "é"]
)
def test_invalid_prefix(prefix: str) -> None:
    with pytest.raises(TopicError):
        Topics(prefix)


@pytest.mark.parametrize("bad", BAD_IDS)
def test_builders_reject_bad_ids(bad: str) -> None:
    for build in (
        lambda i: T.session("d", i, "draft"),
        lambda i: T.session(i, "s", "draft"),
        lambda i: T.device_sessions(i, "draft"),
        T.device_status,
        T.device_inbox,
        T.verifier_status,
        T.shared_open,
    ):
        with pytest.raises(TopicError):
            build(bad)


def test_unknown_leaves() -> None:
    with pytest.raises(TopicError):
        T.session("d", "s", "status")  # type: ignore[arg-type]
    with pytest.raises(TopicError):
        T.all_sessions("+")  # type: ignore[arg-type]
    with pytest.raises(TopicError):
        T.device_sessions("d", "+")  # type: ignore[arg-type]


# --- parse ----------------------------------------------------------------------------


@PROPS
@given(ids, ids, st.sampled_from(SESSION_LEAVES))
def test_parse_round_trips_session(device: str, ident: str, leaf: str) -> None:
    topic = T.session(device, ident, leaf)  # type: ignore[arg-type]
    assert T.parse(topic) == TopicRef("session", ident, leaf, device)


@PROPS
@given(ids)
def test_parse_round_trips_device_and_verifier(ident: str) -> None:
    assert T.parse(T.device_status(ident)) == TopicRef("device", ident, "status")
    assert T.parse(T.device_inbox(ident)) == TopicRef("device", ident, "inbox")
    assert T.parse(T.verifier_status(ident)) == TopicRef("verifier", ident, "status")


@pytest.mark.parametrize(
    "topic",
    [
        "mw/v2/session/d/s/draft",
        "other/session/d/s/draft",
        "mw/v1",
        "mw/v1/",
        "mw/v1/session",
        "mw/v1/session/s",
        "mw/v1/session/s/draft",
        "mw/v1/session/d/s/draft/x",
        "mw/v1/session/d//draft",
        "mw/v1/session//s/draft",
        "mw/v1/session/d/+/draft",
        "mw/v1/session/+/s/draft",
        "mw/v1/session/#",
        "mw/v1/session/d/a+b/draft",
        "mw/v1/session/d/s/status",
        "mw/v1/device/d/draft",
        "mw/v1/verifier/v/inbox",
        "mw/v1/box/x/status",
        "mw/v1/device/d/s/status",
        "$share/g/mw/v1/session/d/s/open",
        "mw/v1x/session/d/s/draft",
        "mw/v1/session/d/s/draft\n",
    ],
)
def test_parse_rejects(topic: str) -> None:
    with pytest.raises(TopicError):
        T.parse(topic)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="mw/v1sessiondraftdevice+#$-_. é", max_size=48))
def test_parse_only_raises_topic_error(topic: str) -> None:
    try:
        ref = T.parse(topic)
    except TopicError:
        return
    assert ref.leaf in ROOTS[ref.root]
    if ref.root == "session":
        assert topic == f"{T.prefix}/session/{ref.device}/{ref.ident}/{ref.leaf}"
    else:
        assert ref.device == ""
        assert topic == f"{T.prefix}/{ref.root}/{ref.ident}/{ref.leaf}"


def test_all_patterns_cover_the_tree() -> None:
    pats = T.all_patterns()
    assert len(pats) == len(set(pats)) == sum(len(v) for v in ROOTS.values()) == 9
    for p in pats:
        root = p.split("/")[2]
        topic = p.replace("{id}", "x1").replace("{device}", "d1")
        assert T.parse(topic).root == root
    assert "mw/v1/session/{device}/{id}/draft" in pats
    assert "mw/v1/device/{id}/inbox" in pats
    assert "mw/v1/verifier/{id}/status" in pats


# --- subtree (CLI specs) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("session/123", "mw/v1/session/+/123/#"),
        ("session/pi-1/123", "mw/v1/session/pi-1/123/#"),
        ("session/pi-1/123/text", "mw/v1/session/pi-1/123/text"),
        ("session/*/123/text", "mw/v1/session/+/123/text"),
        ("session/pi-1/*", "mw/v1/session/pi-1/+/#"),
        ("device/pi-1/sessions", "mw/v1/session/pi-1/+/#"),
        ("device/pi-1", "mw/v1/device/pi-1/#"),
        ("verifier/v1", "mw/v1/verifier/v1/#"),
        ("all", "mw/v1/#"),
        ("", "mw/v1/#"),
        ("#", "mw/v1/#"),
        ("session", "mw/v1/session/#"),
        ("/device/", "mw/v1/device/#"),
        ("session/*", "mw/v1/session/+/+/#"),
        ("session/+/draft", "mw/v1/session/+/+/draft"),
        ("session/123/verdict", "mw/v1/session/+/123/verdict"),
        ("device/pi-1/inbox", "mw/v1/device/pi-1/inbox"),
    ],
)
def test_subtree(spec: str, expected: str) -> None:
    assert T.subtree(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "sessions/1",
        "session/a/b/c",
        "session/a/b/c/text",
        "session/a#",
        "device/a/draft",
        "verifier/v/inbox",
        "session/a b",
        "x",
        "session//draft",
        "verifier/v/sessions",
    ],
)
def test_subtree_rejects(spec: str) -> None:
    with pytest.raises(TopicError):
        T.subtree(spec)


def test_subtree_filters_match_their_topics() -> None:
    assert matches(T.subtree("session/123"), T.session("pi-1", "123", "draft"))
    assert matches(T.subtree("session/123"), T.session("pi-2", "123", "result"))
    assert not matches(T.subtree("session/123"), T.session("pi-1", "1234", "draft"))
    assert matches(T.subtree("session/pi-1/123"), T.session("pi-1", "123", "draft"))
    assert not matches(T.subtree("session/pi-1/123"), T.session("pi-2", "123", "draft"))
    assert matches(T.subtree("device/pi-1/sessions"), T.session("pi-1", "9", "text"))
    assert not matches(T.subtree("device/pi-1/sessions"), T.session("pi-2", "9", "text"))
    assert not matches(T.subtree("session/123"), T.device_status("123"))
    assert matches(T.subtree("device/pi-1"), T.device_inbox("pi-1"))
    assert not matches(T.subtree("device/pi-1"), T.device_inbox("pi-2"))
    for topic in (T.session("d", "s", "open"), T.device_status("d"), T.verifier_status("v")):
        assert matches(T.subtree("all"), topic)
    assert not matches(T.subtree("all"), "mw/v2/session/s/open")


# --- matches ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filter_", "topic", "expected"),
    [
        ("a/b/c", "a/b/c", True),
        ("a/b/c", "a/b", False),
        ("a/b", "a/b/c", False),
        ("a/+/c", "a/x/c", True),
        ("a/+/c", "a/x/y/c", False),
        ("a/+", "a/", True),  # '+' matches an empty level
        ("a/+", "a", False),
        ("+/+", "a/b", True),
        ("+", "a/b", False),
        ("a/#", "a", True),  # '#' includes the parent level
        ("a/#", "a/b/c/d", True),
        ("a/#", "b/a", False),
        ("#", "a/b", True),
        ("#", "$SYS/broker", False),  # wildcards at the first level never match '$' topics
        ("+/broker", "$SYS/broker", False),
        ("$SYS/#", "$SYS/broker", True),
        ("mw/v1/session/+/draft", "mw/v1/session/s1/draft", True),
        ("mw/v1/session/+/draft", "mw/v1/session/s1/verdict", False),
        ("mw/v1/session/+/#", "mw/v1/session/s1/verdict", True),
        ("$share/g/mw/v1/session/+/open", "mw/v1/session/s1/open", True),
        ("$share/g/mw/v1/session/+/open", "mw/v1/session/s1/draft", False),
        ("$share/g/#", "mw/v1/x", True),
        ("$share/g/a/b", "$share/g/a/b", False),
        ("A/b", "a/b", False),  # case-sensitive
    ],
)
def test_matches(filter_: str, topic: str, expected: bool) -> None:
    assert matches(filter_, topic) is expected


def test_strip_share() -> None:
    assert strip_share("$share/g/a/+/b") == "a/+/b"
    assert strip_share("a/b") == "a/b"
    for bad in ("$share/g", "$share/g/", "$share/"):
        with pytest.raises(TopicError):
            strip_share(bad)


@PROPS
@given(ids, ids, st.sampled_from(SESSION_LEAVES), ids)
def test_builders_and_filters_agree(did: str, sid: str, leaf: str, other: str) -> None:
    topic = T.session(did, sid, leaf)  # type: ignore[arg-type]
    assert matches(T.device_sessions(did, leaf), topic)  # type: ignore[arg-type]
    assert matches(T.device_sessions(other, "#"), topic) is (other == did)
    assert matches(T.subtree(f"device/{did}/sessions"), topic)
    assert matches(T.all_sessions(leaf), topic)  # type: ignore[arg-type]
    assert matches(T.all_sessions("#"), topic)
    assert matches(T.everything(), topic)
    assert matches(T.shared_open(), topic) is (leaf == "open")
    if sid not in SESSION_LEAVES:  # a session id spelled like a leaf reads as a leaf in a spec
        assert matches(T.subtree(f"session/{sid}"), topic)
        assert matches(T.subtree(f"session/{did}/{sid}"), topic)
    if other not in SESSION_LEAVES:
        assert matches(T.subtree(f"session/{other}"), topic) is (other == sid)
    assert not matches(T.all_device_status(), topic)


@pytest.mark.parametrize("topic", ["mw/v1/session/1/draft", "a", "$SYS/x", "a//b"])
def test_check_topic_accepts_names(topic: str) -> None:
    check_topic(topic)


@pytest.mark.parametrize("topic", ["", "a/+/b", "a/#", "a\x00b", "x" * 65536])
def test_check_topic_rejects_wildcards_and_bad_names(topic: str) -> None:
    with pytest.raises(TopicError):
        check_topic(topic)


@pytest.mark.parametrize("filter_", ["a/+/b", "a/#", "#", "$share/g/a/+", "a/b"])
def test_check_filter_accepts_filters(filter_: str) -> None:
    check_filter(filter_)


@pytest.mark.parametrize(
    "filter_", ["", "a/#/b", "a/b#", "a+/b", "$share//a", "$share/g+/a", "$share/g"]
)
def test_check_filter_rejects_malformed(filter_: str) -> None:
    with pytest.raises(TopicError):
        check_filter(filter_)
