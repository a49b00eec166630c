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
A header is one typed :class:`Head` (msgspec checks every field's type while it
decodes); decoding untrusted frames raises only :class:`ProtocolError`.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from middleware.broker_bridge.bus import BusMessage, Will
from middleware.errors import ProtocolError

VERSION = 2
MAX_HEADER = 1 << 20  # bytes; a header is small, anything larger is hostile

HELLO, WELCOME, SUB, SUBACK, UNSUB = "hello", "welcome", "sub", "suback", "unsub"
PUB, PUBACK, MSG, BYE, UNKNOWN = "pub", "puback", "msg", "bye", "unknown"
PROBE = "probe"  # verifier -> device, ignored: does the route still exist?

_Topic = Annotated[str, msgspec.Meta(min_length=1)]


class WireWill(msgspec.Struct, array_like=True, frozen=True):
    """A will in a hello or welcome: ``[topic, payload, qos, retain, delay]``."""

    topic: _Topic
    payload: bytes
    qos: Literal[0, 1, 2]
    retain: bool
    delay: Annotated[float, msgspec.Meta(ge=0, le=86_400 * 365)]

    @classmethod
    def of(cls, will: Will | None) -> WireWill | None:
        if will is None:
            return None
        return cls(will.topic, will.payload, will.qos, will.retain, will.delay)  # type: ignore[arg-type]

    def will(self) -> Will:
        return Will(self.topic, self.payload, self.qos, self.retain, self.delay)


class Head(msgspec.Struct, omit_defaults=True, frozen=True):
    """A header frame; which fields a command uses is in the module docstring."""

    c: str
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
    v: int | None = None
    will: WireWill | None = None
    rid: int | None = None
    f: str | None = None
    m: int | None = None
    err: str | None = None
    t: _Topic | None = None
    q: Literal[0, 1, 2] = 0
    r: bool = False
    ct: str | None = None
    e: Annotated[float, msgspec.Meta(gt=0)] | None = None
    up: dict[str, str] = {}
    co: bytes | None = None

    def message(self, payload: bytes) -> BusMessage:
        """The :class:`BusMessage` a ``pub``/``msg`` header and its payload frame carry."""
        if self.t is None:
            raise ProtocolError("message without a topic")
        return BusMessage(self.t, payload, self.q, self.r, self.ct, self.e, self.up, self.co)


_encode = msgspec.msgpack.Encoder().encode
_decoder = msgspec.msgpack.Decoder(Head)


def pack(head: Head) -> bytes:
    return _encode(head)


def unpack(frame: bytes) -> Head:
    """Decode a header frame; ProtocolError unless it is a well-typed command map."""
    if len(frame) > MAX_HEADER:
        raise ProtocolError(f"zmq header of {len(frame)} bytes")
    try:
        return _decoder.decode(frame)
    except msgspec.MsgspecError as exc:
        raise ProtocolError(f"zmq header: {exc}") from exc


def message_head(cmd: str, msg: BusMessage, mid: int | None = None) -> Head:
    """The ``pub``/``msg`` header of ``msg`` (everything but the payload)."""
    return Head(
        cmd,
        m=mid,
        t=msg.topic,
        q=msg.qos,  # type: ignore[arg-type]
        r=msg.retain,
        ct=msg.content_type,
        e=msg.expiry,
        up={str(k): str(v) for k, v in msg.user_properties.items()},
        co=None if msg.correlation is None else bytes(msg.correlation),
    )


def msg_frames(msg: BusMessage) -> list[bytes]:
    """The ``msg`` frames that carry ``msg`` to a device."""
    return [pack(message_head(MSG, msg)), msg.payload]
