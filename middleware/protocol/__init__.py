"""The wire protocol: typed, validated messages and the topic tree.

``decode(data)`` turns untrusted bytes into one of the message values below
and raises only :class:`~middleware.errors.ProtocolError`.
"""

from __future__ import annotations

from typing import Any, TypeVar

from middleware.errors import ProtocolError
from middleware.protocol.codec import DEFAULT_LIMITS, SCHEMA_VERSION, Limits, unpack
from middleware.protocol.session import (
    CloseSession,
    Draft,
    OpenSession,
    SamplingParams,
    SessionState,
    SparseDist,
    Verdict,
)
from middleware.protocol.status import DeviceStatus, VerifierStatus
from middleware.protocol.text import PromptRequest, Result, TextChunk
from middleware.protocol.topics import DEFAULT_PREFIX, Topics, matches

Message = (
    OpenSession
    | Draft
    | Verdict
    | SessionState
    | CloseSession
    | DeviceStatus
    | VerifierStatus
    | TextChunk
    | Result
    | PromptRequest
)

MESSAGE_TYPES: dict[str, Any] = {
    cls.TYPE: cls
    for cls in (
        OpenSession,
        Draft,
        Verdict,
        SessionState,
        CloseSession,
        DeviceStatus,
        VerifierStatus,
        TextChunk,
        Result,
        PromptRequest,
    )
}

M = TypeVar("M")


def decode(
    data: bytes | bytearray | memoryview,
    limits: Limits = DEFAULT_LIMITS,
    expect: type[M] | tuple[type, ...] | None = None,
) -> M:
    """Decode any middleware message (msgpack or JSON); only ProtocolError escapes."""
    env = unpack(data, limits)
    cls = MESSAGE_TYPES.get(env["t"])
    if cls is None:
        raise ProtocolError(f"unknown message type {env['t']!r:.40}")
    if expect is not None and not (cls is expect or (isinstance(expect, tuple) and cls in expect)):
        raise ProtocolError(f"unexpected message type {env['t']!r} here")
    try:
        return cls.from_wire(env, limits)
    except ProtocolError:
        raise
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise ProtocolError(f"{env['t']}: {type(exc).__name__}: {exc}") from exc


__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_PREFIX",
    "MESSAGE_TYPES",
    "SCHEMA_VERSION",
    "CloseSession",
    "DeviceStatus",
    "Draft",
    "Limits",
    "Message",
    "OpenSession",
    "PromptRequest",
    "ProtocolError",
    "Result",
    "SamplingParams",
    "SessionState",
    "SparseDist",
    "TextChunk",
    "Topics",
    "Verdict",
    "VerifierStatus",
    "decode",
    "matches",
]
