"""The bus encodes MQTT 5 PUBLISH properties itself: byte for byte what paho would send."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from middleware.broker_bridge.mqtt import publish_packet_size, publish_properties
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
