"""The topic tree, built in exactly one place.

Every topic lives under a configurable prefix (default ``mw/v1``)::

    {prefix}/session/{did}/{sid}/open     device -> verifiers (shared subscription)  msgpack
    {prefix}/session/{did}/{sid}/draft    device -> owning verifier                  msgpack
    {prefix}/session/{did}/{sid}/verdict  owning verifier -> device                  msgpack
    {prefix}/session/{did}/{sid}/state    owning verifier, retained                  msgpack
    {prefix}/session/{did}/{sid}/text     device, text stream                        JSON
    {prefix}/session/{did}/{sid}/result   device, retained final result              JSON
    {prefix}/device/{did}/status          device, retained, last will                JSON
    {prefix}/device/{did}/inbox           anyone -> device, prompts                  JSON or text
    {prefix}/verifier/{vid}/status        verifier, retained, last will              JSON

Session topics carry the owning device's id as a whole level (``{did}``) so
that a broker ACL can bind a session to its device (Mosquitto substitutes
``%u`` only for whole levels: ``pattern write mw/v1/session/%u/+/draft``).
Session ids are unique per verifier; the verifier binds a session to the
device that opened it and refuses the same id from another device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from middleware.errors import ProtocolError, TopicError
from middleware.protocol.codec import check_id

DEFAULT_PREFIX = "mw/v1"
DEFAULT_SHARE_GROUP = "mw-verifiers"

SessionLeaf = Literal["open", "draft", "verdict", "state", "text", "result"]
SESSION_LEAVES: tuple[str, ...] = ("open", "draft", "verdict", "state", "text", "result")
DEVICE_LEAVES: tuple[str, ...] = ("status", "inbox")
VERIFIER_LEAVES: tuple[str, ...] = ("status",)
ROOTS: dict[str, tuple[str, ...]] = {
    "session": SESSION_LEAVES,
    "device": DEVICE_LEAVES,
    "verifier": VERIFIER_LEAVES,
}

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


@dataclass(frozen=True, slots=True)
class TopicRef:
    """A parsed topic: which subtree (``session``/``device``/``verifier``), whose id, which leaf.

    For session topics ``ident`` is the session id and ``device`` the owning
    device's id; for the other subtrees ``device`` is empty.
    """

    root: str
    ident: str
    leaf: str
    device: str = ""


def _checked(ident: str, what: str) -> str:
    try:
        check_id(ident, what)
    except ProtocolError as exc:
        raise TopicError(str(exc)) from exc
    return ident


def _level(part: str, what: str) -> str:
    """One level of a filter spec: an id, or ``*``/``+`` for any."""
    return "+" if part in ("*", "+") else _checked(part, what)


HA_PREFIX = "homeassistant"
HA_COMPONENTS = ("sensor", "binary_sensor")
_HA_ID_RE = re.compile(r"[a-zA-Z0-9_-]{1,128}")


@dataclass(frozen=True, slots=True)
class Topics:
    """Builds and parses every topic of the middleware."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not _PREFIX_RE.fullmatch(self.prefix) or len(self.prefix) > 128:
            raise TopicError(
                f"invalid topic prefix {self.prefix!r}: use letters, digits, _.- and /"
            )

    def _build(self, root: str, ident: str, leaf: str) -> str:
        return f"{self.prefix}/{root}/{_checked(ident, f'{root} id')}/{leaf}"

    # --- concrete topics -------------------------------------------------
    def session(self, device_id: str, session_id: str, leaf: SessionLeaf) -> str:
        """``{prefix}/session/{device_id}/{session_id}/{leaf}``."""
        if leaf not in SESSION_LEAVES:
            raise TopicError(f"unknown session leaf {leaf!r}")
        did = _checked(device_id, "device id")
        return f"{self.prefix}/session/{did}/{_checked(session_id, 'session id')}/{leaf}"

    def device_status(self, device_id: str) -> str:
        return self._build("device", device_id, "status")

    def device_inbox(self, device_id: str) -> str:
        return self._build("device", device_id, "inbox")

    def verifier_status(self, verifier_id: str) -> str:
        return self._build("verifier", verifier_id, "status")

    def ha_discovery(
        self, component: str, node_id: str, object_id: str, discovery_prefix: str = HA_PREFIX
    ) -> str:
        """Home Assistant discovery: ``{discovery_prefix}/{component}/{node}/{object}/config``.

        Outside the middleware prefix (Home Assistant listens on its own prefix); node ids
        are made of the middleware prefix and the device or verifier id, so two fleets on one
        broker do not collide."""
        if component not in HA_COMPONENTS:
            raise TopicError(f"unknown Home Assistant component {component!r}")
        parts = (node_id, object_id)
        for part in parts:
            if not _HA_ID_RE.fullmatch(part):
                raise TopicError(f"invalid Home Assistant id {part!r}")
        root = _checked(discovery_prefix, "discovery prefix")
        return f"{root}/{component}/{node_id}/{object_id}/config"

    def ha_node_id(self, kind: str, ident: str) -> str:
        """``mw_v1_device_pi-1``: the discovery node id of a device or verifier."""
        raw = f"{self.prefix}_{kind}_{_checked(ident, f'{kind} id')}"
        return re.sub(r"[^a-zA-Z0-9_-]", "_", raw)

    # --- filters -----------------------------------------------------------
    def all_sessions(self, leaf: SessionLeaf | Literal["#"]) -> str:
        """One leaf (or everything) of every session of every device."""
        if leaf != "#" and leaf not in SESSION_LEAVES:
            raise TopicError(f"unknown session leaf {leaf!r}")
        return f"{self.prefix}/session/+/+/{leaf}"

    def device_sessions(self, device_id: str, leaf: SessionLeaf | Literal["#"]) -> str:
        """One leaf (or everything) of every session of one device."""
        if leaf != "#" and leaf not in SESSION_LEAVES:
            raise TopicError(f"unknown session leaf {leaf!r}")
        return f"{self.prefix}/session/{_checked(device_id, 'device id')}/+/{leaf}"

    def shared_open(self, group: str = DEFAULT_SHARE_GROUP) -> str:
        """MQTT 5 shared subscription: each open reaches exactly one verifier of the group."""
        return f"$share/{_checked(group, 'share group')}/{self.prefix}/session/+/+/open"

    def all_device_status(self) -> str:
        return f"{self.prefix}/device/+/status"

    def all_verifier_status(self) -> str:
        return f"{self.prefix}/verifier/+/status"

    def everything(self) -> str:
        return f"{self.prefix}/#"

    def subtree(self, spec: str) -> str:
        """Filter for a CLI spec.

        ``all``; ``session/SID`` (that session, whichever device owns it);
        ``session/SID/LEAF``; ``session/DID/SID``; ``session/DID/SID/LEAF``;
        ``device/DID`` (its status and inbox; ``device/DID/sessions`` for all its
        sessions); ``device/DID/LEAF``; ``verifier/VID``; ``*`` or ``+`` for any id.
        """
        if spec in ("", "all", "#"):
            return self.everything()
        parts = spec.strip("/").split("/")
        root = parts[0]
        if root not in ROOTS or len(parts) > (4 if root == "session" else 3):
            raise TopicError(
                "expected session/ID, session/DEVICE/ID, device/ID, verifier/ID or all;"
                f" got {spec!r}"
            )
        if len(parts) == 1:
            return f"{self.prefix}/{root}/#"
        if root == "session":
            rest = parts[1:]
            leaf = "#"
            if len(rest) > 1 and rest[-1] in SESSION_LEAVES:
                leaf = rest.pop()
            if len(rest) == 1:
                did, sid = "+", _level(rest[0], "session id")
            elif len(rest) == 2:
                did, sid = _level(rest[0], "device id"), _level(rest[1], "session id")
            else:
                raise TopicError(f"unknown session leaf {parts[-1]!r}")
            return f"{self.prefix}/session/{did}/{sid}/{leaf}"
        ident = _level(parts[1], f"{root} id")
        if len(parts) == 3:
            if root == "device" and parts[2] == "sessions":
                return f"{self.prefix}/session/{ident}/+/#"
            if parts[2] not in ROOTS[root]:
                raise TopicError(f"unknown {root} leaf {parts[2]!r}")
            return f"{self.prefix}/{root}/{ident}/{parts[2]}"
        return f"{self.prefix}/{root}/{ident}/#"

    # --- parsing -----------------------------------------------------------
    def parse(self, topic: str) -> TopicRef:
        """Split a concrete topic into (root, id, leaf[, device]); raise TopicError if foreign."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise TopicError(f"topic {topic!r} is outside prefix {self.prefix!r}")
        parts = topic[len(head) :].split("/")
        if parts[0] == "session":
            if len(parts) != 4 or parts[3] not in SESSION_LEAVES:
                raise TopicError(f"topic {topic!r} is not in the topic tree")
            return TopicRef(
                "session",
                _checked(parts[2], "session id"),
                parts[3],
                _checked(parts[1], "device id"),
            )
        if len(parts) != 3 or parts[0] not in ROOTS or parts[2] not in ROOTS[parts[0]]:
            raise TopicError(f"topic {topic!r} is not in the topic tree")
        return TopicRef(parts[0], _checked(parts[1], f"{parts[0]} id"), parts[2])

    def all_patterns(self) -> list[str]:
        """Every concrete topic shape, with ``{id}`` placeholders (for the AsyncAPI check).

        Session shapes are ``{prefix}/session/{device}/{id}/{leaf}``.
        """
        return [
            f"{self.prefix}/{root}/{{device}}/{{id}}/{leaf}"
            if root == "session"
            else f"{self.prefix}/{root}/{{id}}/{leaf}"
            for root, leaves in ROOTS.items()
            for leaf in leaves
        ]


def strip_share(filter_: str) -> str:
    """``$share/group/a/b`` -> ``a/b``; other filters unchanged."""
    if filter_.startswith("$share/"):
        parts = filter_.split("/", 2)
        if len(parts) < 3 or not parts[2]:
            raise TopicError(f"malformed shared subscription {filter_!r}")
        return parts[2]
    return filter_


def matches(filter_: str, topic: str) -> bool:
    """MQTT topic-filter matching (``+`` one level, ``#`` the rest); shares stripped."""
    f = strip_share(filter_).split("/")
    t = topic.split("/")
    if t and t[0].startswith("$") and f[0] in ("+", "#"):
        return False
    for i, part in enumerate(f):
        if part == "#":
            return True
        if i >= len(t):
            return False
        if part != "+" and part != t[i]:
            return False
    return len(f) == len(t)


def check_topic(topic: str) -> None:
    """Raise TopicError unless ``topic`` is a valid MQTT topic name (no wildcards)."""
    if not topic or "+" in topic or "#" in topic or "\x00" in topic or len(topic.encode()) > 65535:
        raise TopicError(f"invalid topic name {topic!r}")


def check_filter(filter_: str) -> None:
    """Raise TopicError unless ``filter_`` is a valid MQTT topic filter (shares allowed)."""
    if not filter_ or len(filter_.encode()) > 65535 or "\x00" in filter_:
        raise TopicError(f"invalid topic filter {filter_!r}")
    if filter_.startswith("$share/"):
        group = filter_.split("/", 2)[1]
        if not group or "+" in group or "#" in group:
            raise TopicError(f"invalid share group in {filter_!r}")
    levels = strip_share(filter_).split("/")
    for i, level in enumerate(levels):
        bad_hash = "#" in level and (level != "#" or i != len(levels) - 1)
        if bad_hash or ("+" in level and level != "+"):
            raise TopicError(f"invalid wildcard in topic filter {filter_!r}")
