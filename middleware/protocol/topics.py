"""The topic tree, built in exactly one place.

Every topic lives under a configurable prefix (default ``mw/v1``)::

    {prefix}/session/{sid}/open      device -> verifiers (shared subscription)  msgpack
    {prefix}/session/{sid}/draft     device -> owning verifier                  msgpack
    {prefix}/session/{sid}/verdict   owning verifier -> device                  msgpack
    {prefix}/session/{sid}/state     owning verifier, retained                  msgpack
    {prefix}/session/{sid}/text      device, text stream                        JSON
    {prefix}/session/{sid}/result    device, retained final result              JSON
    {prefix}/device/{did}/status     device, retained, last will                JSON
    {prefix}/device/{did}/inbox      anyone -> device, prompts                  JSON or text
    {prefix}/verifier/{vid}/status   verifier, retained, last will              JSON
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
    "session": SESSION_LEAVES, "device": DEVICE_LEAVES, "verifier": VERIFIER_LEAVES,
}

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


@dataclass(frozen=True, slots=True)
class TopicRef:
    """A parsed topic: which subtree (``session``/``device``/``verifier``), whose id, which leaf."""

    root: str
    ident: str
    leaf: str


@dataclass(frozen=True, slots=True)
class Topics:
    """Builds and parses every topic of the middleware."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not _PREFIX_RE.fullmatch(self.prefix) or len(self.prefix) > 128:
            raise TopicError(f"invalid topic prefix {self.prefix!r}: use letters, digits, _.- and /")

    def _build(self, root: str, ident: str, leaf: str) -> str:
        try:
            check_id(ident, f"{root} id")
        except ProtocolError as exc:
            raise TopicError(str(exc)) from exc
        return f"{self.prefix}/{root}/{ident}/{leaf}"

    # --- concrete topics -------------------------------------------------
    def session(self, session_id: str, leaf: SessionLeaf) -> str:
        if leaf not in SESSION_LEAVES:
            raise TopicError(f"unknown session leaf {leaf!r}")
        return self._build("session", session_id, leaf)

    def device_status(self, device_id: str) -> str:
        return self._build("device", device_id, "status")

    def device_inbox(self, device_id: str) -> str:
        return self._build("device", device_id, "inbox")

    def verifier_status(self, verifier_id: str) -> str:
        return self._build("verifier", verifier_id, "status")

    # --- filters -----------------------------------------------------------
    def all_sessions(self, leaf: SessionLeaf | Literal["#"]) -> str:
        if leaf != "#" and leaf not in SESSION_LEAVES:
            raise TopicError(f"unknown session leaf {leaf!r}")
        return f"{self.prefix}/session/+/{leaf}"

    def shared_open(self, group: str = DEFAULT_SHARE_GROUP) -> str:
        """MQTT 5 shared subscription: each open reaches exactly one verifier of the group."""
        try:
            check_id(group, "share group")
        except ProtocolError as exc:
            raise TopicError(str(exc)) from exc
        return f"$share/{group}/{self.prefix}/session/+/open"

    def all_device_status(self) -> str:
        return f"{self.prefix}/device/+/status"

    def all_verifier_status(self) -> str:
        return f"{self.prefix}/verifier/+/status"

    def everything(self) -> str:
        return f"{self.prefix}/#"

    def subtree(self, spec: str) -> str:
        """Filter for a CLI spec: ``session/123``, ``device/pi-1``, ``verifier/v1`` or ``all``."""
        if spec in ("", "all", "#"):
            return self.everything()
        parts = spec.strip("/").split("/")
        if parts[0] not in ROOTS or len(parts) > 3:
            raise TopicError(f"expected session/ID, device/ID, verifier/ID or all; got {spec!r}")
        if len(parts) == 1:
            return f"{self.prefix}/{parts[0]}/#"
        ident = "+" if parts[1] in ("*", "+") else parts[1]
        if ident != "+":
            try:
                check_id(ident, f"{parts[0]} id")
            except ProtocolError as exc:
                raise TopicError(str(exc)) from exc
        if len(parts) == 3:
            if parts[2] not in ROOTS[parts[0]]:
                raise TopicError(f"unknown {parts[0]} leaf {parts[2]!r}")
            return f"{self.prefix}/{parts[0]}/{ident}/{parts[2]}"
        return f"{self.prefix}/{parts[0]}/{ident}/#"

    # --- parsing -----------------------------------------------------------
    def parse(self, topic: str) -> TopicRef:
        """Split a concrete topic into (root, id, leaf); raise TopicError if foreign."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise TopicError(f"topic {topic!r} is outside prefix {self.prefix!r}")
        parts = topic[len(head):].split("/")
        if len(parts) != 3 or parts[0] not in ROOTS or parts[2] not in ROOTS[parts[0]]:
            raise TopicError(f"topic {topic!r} is not in the topic tree")
        try:
            check_id(parts[1], f"{parts[0]} id")
        except ProtocolError as exc:
            raise TopicError(str(exc)) from exc
        return TopicRef(parts[0], parts[1], parts[2])

    def all_patterns(self) -> list[str]:
        """Every concrete topic shape, with ``{id}`` placeholders (for the AsyncAPI check)."""
        return [f"{self.prefix}/{root}/{{id}}/{leaf}" for root, leaves in ROOTS.items()
                for leaf in leaves]


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
