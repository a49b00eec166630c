"""The bus encodes MQTT 5 PUBLISH properties itself: byte for byte what paho would send."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt import _packet
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from middleware.broker_bridge.mqtt import (
    ReceivedProperties,
    ReceivedReasonCode,
    publish_packet_size,
    publish_properties,
)
from middleware.errors import BusError

text = st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), max_size=40)


def paho_reference(
    content_type: str | None, expiry: int | None, user: dict[str, str], corr: bytes | None
) -> bytes:
    ref = Properties(PacketTypes.PUBLISH)
    if content_type is not None:
        ref.ContentType = content_type
    if expiry is not None:
        ref.MessageExpiryInterval = expiry
    if user:
        ref.UserProperty = list(user.items())
    if corr is not None:
        ref.CorrelationData = corr
    return ref.pack()


@settings(max_examples=300, deadline=None)
@given(
    st.none() | text,
    st.none() | st.integers(1, 2**32 - 1),
    st.dictionaries(text, text, max_size=4),
    st.none() | st.binary(max_size=40),
)
def test_packed_properties_equal_paho(content_type, expiry, user, corr) -> None:
    mine = publish_properties(content_type, expiry, user, corr)
    if content_type is None and expiry is None and not user and corr is None:
        assert mine is None
        return
    assert mine is not None
    assert mine.pack() == paho_reference(content_type, expiry, user, corr)
    decoded = Properties(PacketTypes.PUBLISH)
    decoded.unpack(mine.pack())
    assert getattr(decoded, "ContentType", None) == content_type
    assert dict(getattr(decoded, "UserProperty", [])) == user


def test_expiry_rounds_up_and_is_bounded() -> None:
    assert publish_properties(None, 0.2, None, None).pack() == paho_reference(None, 1, {}, None)
    assert publish_properties(None, 29.5, None, None).pack() == paho_reference(None, 30, {}, None)
    for bad in (0, -1, 2.0**32):
        with pytest.raises(BusError):
            publish_properties(None, bad, None, None)


def test_strings_the_broker_would_refuse_are_refused_here() -> None:
    for bad in ({"a": "x\x00"}, {"\x00": ""}, {"a": "\ud800"}):
        with pytest.raises(BusError):
            publish_properties(None, None, bad, None)
    with pytest.raises(BusError):
        publish_properties("x" * 70000, None, None, None)


def test_packet_size_counts_the_properties() -> None:
    props = publish_properties("application/json", None, {"trace": "a/1/2"}, None)
    bare = publish_packet_size("a/b", 10, 1, None)
    assert publish_packet_size("a/b", 10, 1, props) == bare - 1 + len(props.pack())


# --- received: ReceivedProperties parses what paho's Properties.unpack parses -------------
def _attrs(props: Properties) -> dict[str, object]:
    return {
        k: v
        for k, v in vars(props).items()
        if k not in ("packetType", "types", "names", "properties")
    }


@settings(max_examples=300, deadline=None)
@given(
    st.none() | text.filter(lambda t: "\ufeff" not in t),
    st.none() | st.integers(0, 2**32 - 1),
    st.lists(st.tuples(text, text).filter(lambda kv: "\ufeff" not in "".join(kv)), max_size=4),
    st.none() | st.binary(max_size=40),
    st.none() | st.integers(0, 1),
    st.lists(st.integers(1, 268_435_455), max_size=3),
    st.none() | st.integers(1, 65535),
    st.none() | text.filter(lambda t: "\ufeff" not in t),
)
def test_received_properties_equal_paho(
    content_type, expiry, user, corr, fmt, sub_ids, alias, response
) -> None:
    ref = Properties(PacketTypes.PUBLISH)
    for name, value in (
        ("ContentType", content_type),
        ("MessageExpiryInterval", expiry),
        ("CorrelationData", corr),
        ("PayloadFormatIndicator", fmt),
        ("TopicAlias", alias),
        ("ResponseTopic", response),
    ):
        if value is not None:
            setattr(ref, name, value)
    if user:
        ref.UserProperty = user
    if sub_ids:
        ref.SubscriptionIdentifier = sub_ids
    wire = ref.pack() + b"payload"
    theirs, their_len = Properties(PacketTypes.PUBLISH).unpack(wire)
    mine, my_len = ReceivedProperties(PacketTypes.PUBLISH).unpack(wire)
    assert my_len == their_len
    assert _attrs(mine) == _attrs(theirs)
    assert str(mine) == str(theirs) and mine.json() == theirs.json()


@pytest.mark.parametrize(
    "wire",
    [
        b"\x05\x03\x00\x09ab",  # a string longer than the block
        b"\x03\x02\x00\x00",  # a four-byte integer cut short
        b"\x02\x11\x00",  # a CONNECT-only property (session expiry) in a PUBLISH
        b"\x04\x01\x00\x01\x00",  # payload format indicator twice
        b"\x02\x01\x02",  # payload format indicator 2
        b"\x03\x23\x00\x00",  # topic alias 0
        b"\x05\x03\x00\x02\x00a",  # U+0000 in a string
        b"\x0a\x00",  # the block is longer than the packet
        b"\xff\xff\xff\xff\x7f",  # a five-byte length
        b"\x04\x03\x00\x02\xc3",  # invalid UTF-8 (cut)
    ],
)
def test_malformed_received_properties_are_malformed_packets(wire: bytes) -> None:
    with pytest.raises(MalformedPacket):
        ReceivedProperties(PacketTypes.PUBLISH).unpack(wire)


def test_paho_builds_received_properties_and_reason_codes_with_ours() -> None:
    """If a paho upgrade moves where it builds them, this fails (and paho's slower classes,
    still correct, are used meanwhile)."""
    pkt = _packet.decode_publish(0x30, b"\x00\x01t" + b"\x03\x03\x00\x00" + b"x", 5)
    assert type(pkt.properties) is ReceivedProperties
    assert pkt.payload == b"x" and pkt.properties.ContentType == ""
    ack = _packet.decode_puback(0x40, b"\x00\x07", 5)
    assert type(ack.reason) is ReceivedReasonCode and type(ack.properties) is ReceivedProperties
    assert (ack.mid, ack.reason.value, ack.reason.is_failure) == (7, 0, False)


def test_received_properties_of_other_packets_equal_paho() -> None:
    """A PUBACK with a reason string and a user property: paho's parser, shared tables."""
    ref = Properties(PacketTypes.PUBACK)
    ref.ReasonString = "no subscribers"
    ref.UserProperty = [("a", "1"), ("b", "2")]
    wire = ref.pack()
    theirs, _ = Properties(PacketTypes.PUBACK).unpack(wire)
    mine, _ = ReceivedProperties(PacketTypes.PUBACK).unpack(wire)
    assert _attrs(mine) == _attrs(theirs) and str(mine) == str(theirs)
    assert ReceivedProperties(PacketTypes.PUBACK).isEmpty()


@pytest.mark.parametrize("packet_type", range(1, 16))
@pytest.mark.parametrize(
    ("name", "ident"),
    [
        ("Success", -1),
        ("Unspecified error", -1),
        ("Not authorized", -1),
        ("Success", 0),
        ("Success", 16),
    ],
)
def test_received_reason_codes_equal_paho(packet_type: int, name: str, ident: int) -> None:
    kwargs = {"aName": name, "identifier": ident}
    try:
        theirs = ReasonCode(packet_type, **kwargs)
    except (KeyError, ValueError) as exc:
        with pytest.raises(type(exc)):
            ReceivedReasonCode(packet_type, **kwargs)
        return
    mine = ReceivedReasonCode(packet_type, **kwargs)
    assert (mine.value, str(mine), repr(mine), mine.is_failure) == (
        theirs.value,
        str(theirs),
        repr(theirs),
        theirs.is_failure,
    )
    assert mine == theirs
