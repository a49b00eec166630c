"""The ZeroMQ wire: msgpack command headers plus a raw payload frame.

Every message between a device's :class:`~middleware.broker_bridge.zmq.ZmqBus`
(DEALER) and a verifier's :class:`~middleware.broker_bridge.zmq.ZmqServerBus`
(ROUTER) is one header frame, a msgpack map whose ``"c"`` names the command,
and, for ``pub``/``msg``, a second frame with the payload bytes (never
re-encoded)::

    device -> verifier                         verifier -> device
    hello   id, v, will?                       welcome  id, v, will?
    sub     rid, f        (state request)      msg ...  the verifier's state matching f
                                               suback   rid, err?
    unsub   f
    pub     m?, t, q, r, ct?, e?, up?, co?  +P puback   m, err?   (QoS >= 1 only)
    bye                                        msg      t, q, r, ct?, e?, up?, co?  +P
                                               unknown  (no hello on record: say hello)
                                               probe    (ignored; see ZmqServerBus._probe)

Liveness is not on this wire: both sockets run ZMTP heartbeats
(``ZMQ_HEARTBEAT_IVL``/``TIMEOUT``/``TTL``), so libzmq closes a silent
connection and each side learns of it from its socket monitor.

Keys: ``m`` message id, ``rid`` request id, ``t`` topic, ``q`` QoS, ``r``
retain, ``ct`` content type, ``e`` expiry (s), ``up`` user properties, ``co``
correlation bytes, ``will`` ``[topic, payload, qos, retain, delay]``.
Decoding untrusted frames raises only :class:`ProtocolError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgpack

from middleware.broker_bridge.bus import BusMessage, Will
from middleware.errors import ProtocolError

VERSION = 2
MAX_HEADER = 1 << 20  # bytes; a header is small, anything larger is hostile

HELLO, WELCOME, SUB, SUBACK, UNSUB = "hello", "welcome", "sub", "suback", "unsub"
PUB, PUBACK, MSG, BYE, UNKNOWN = "pub", "puback", "msg", "bye", "unknown"
PROBE = "probe"  # verifier -> device, ignored: does the route still exist?


def pack(cmd: str, **fields: Any) -> bytes:
    """A header frame for ``cmd``; ``None`` fields are left out."""
    body = {"c": cmd}
    body.update({k: v for k, v in fields.items() if v is not None})
    return msgpack.packb(body, use_bin_type=True)


def unpack(frame: bytes) -> dict[str, Any]:
    """Decode a header frame; ProtocolError unless it is a map with a string ``c``."""
    if len(frame) > MAX_HEADER:
        raise ProtocolError(f"zmq header of {len(frame)} bytes")
    try:
        head = msgpack.unpackb(frame, raw=False, strict_map_key=True, max_bin_len=MAX_HEADER)
    except (
        ValueError,
        TypeError,
        msgpack.ExtraData,
        msgpack.FormatError,
        msgpack.StackError,
        RecursionError,
    ) as exc:
        raise ProtocolError(f"zmq header is not msgpack: {exc}") from exc
    if not isinstance(head, dict) or not isinstance(head.get("c"), str):
        raise ProtocolError("zmq header is not a command map")
    return head


def message_fields(
    topic: str,
    qos: int,
    retain: bool,
    content_type: str | None,
    expiry: float | None,
    user_properties: Mapping[str, str] | None,
    correlation: bytes | None,
) -> dict[str, Any]:
    """The header fields of a ``pub``/``msg`` (everything but the payload; unset ones left out)."""
    fields: dict[str, Any] = {"t": topic, "q": qos, "r": retain}
    if content_type is not None:
        fields["ct"] = content_type
    if expiry is not None:
        fields["e"] = expiry
    if user_properties:
        fields["up"] = {str(k): str(v) for k, v in user_properties.items()}
    if correlation is not None:
        fields["co"] = bytes(correlation)
    return fields


def msg_frames(msg: BusMessage) -> list[bytes]:
    """The ``msg`` frames that carry ``msg`` to a device."""
    fields = message_fields(
        msg.topic,
        msg.qos,
        msg.retain,
        msg.content_type,
        msg.expiry,
        msg.user_properties,
        msg.correlation,
    )
    return [pack(MSG, **fields), msg.payload]


def message_from(head: Mapping[str, Any], payload: bytes) -> BusMessage:
    """A :class:`BusMessage` from a ``pub``/``msg`` header and its payload frame."""
    topic, qos, retain = head.get("t"), head.get("q", 0), head.get("r", False)
    ct, expiry, up, co = head.get("ct"), head.get("e"), head.get("up", {}), head.get("co")
    if not isinstance(topic, str) or not topic:
        raise ProtocolError("message without a topic")
    if not isinstance(qos, int) or isinstance(qos, bool) or qos not in (0, 1, 2):
        raise ProtocolError(f"bad qos in message to {topic!r}")
    if not isinstance(retain, bool):
        raise ProtocolError("bad retain flag")
    if ct is not None and not isinstance(ct, str):
        raise ProtocolError("bad content type")
    if expiry is not None and (
        not isinstance(expiry, int | float) or isinstance(expiry, bool) or not expiry > 0
    ):
        raise ProtocolError("bad expiry")
    if not isinstance(up, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in up.items()
    ):
        raise ProtocolError("bad user properties")
    if co is not None and not isinstance(co, bytes):
        raise ProtocolError("bad correlation data")
    return BusMessage(
        topic=topic,
        payload=payload,
        qos=qos,
        retain=retain,
        content_type=ct,
        expiry=float(expiry) if expiry is not None else None,
        user_properties=up,
        correlation=co,
    )


def will_to_wire(will: Will | None) -> list[Any] | None:
    if will is None:
        return None
    return [will.topic, will.payload, will.qos, will.retain, will.delay]


def will_from_wire(raw: Any) -> Will | None:
    """Decode a hello's or welcome's will; ProtocolError when malformed."""
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) != 5:
        raise ProtocolError("will: expected [topic, payload, qos, retain, delay]")
    topic, payload, qos, retain, delay = raw
    ok = (
        isinstance(topic, str)
        and topic
        and isinstance(payload, bytes)
        and qos in (0, 1, 2)
        and isinstance(retain, bool)
        and isinstance(delay, int | float)
        and 0 <= delay <= 86_400 * 365
    )
    if not ok:
        raise ProtocolError("will: bad field")
    return Will(topic, payload, int(qos), retain, float(delay))
