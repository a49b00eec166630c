"""The MQTT <-> ZeroMQ bridge against a real Mosquitto and real ZeroMQ verifier sockets.

The bridge's ZeroMQ side is a device-like DEALER (:class:`ZmqBus`) connected to
verifier ROUTERs (:class:`ZmqServerBus`); no mocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from middleware.broker_bridge.bridge import MARK, Bridge
from middleware.broker_bridge.bus import CONTENT_MSGPACK, BusMessage, Subscription, Will
from middleware.broker_bridge.mqtt import MqttBus, MqttSettings
from middleware.broker_bridge.zmq import ZmqBus, ZmqServerBus, ZmqServerSettings, ZmqSettings
from middleware.errors import BusError
from middleware.mosquitto import MosquittoProcess
from middleware.protocol import Topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def verifier(bind: str = "tcp://127.0.0.1:*", will: Will | None = None) -> ZmqServerBus:
    return ZmqServerBus(ZmqServerSettings(bind=bind, heartbeat=0.1, will=will))


@pytest.fixture
async def ver() -> AsyncIterator[ZmqServerBus]:
    async with verifier() as v:
        yield v


def mq(broker: Any, **kw: Any) -> MqttSettings:
    return MqttSettings(
        host=broker.host, port=broker.port, reconnect_min=0.05, reconnect_max=0.5, **kw
    )


def zq(*verifiers: ZmqServerBus | str, **kw: Any) -> ZmqSettings:
    eps = tuple(v if isinstance(v, str) else v.endpoint for v in verifiers)
    return ZmqSettings(
        endpoints=eps,
        heartbeat=0.1,
        handshake_timeout=0.5,
        reconnect_min=0.02,
        reconnect_max=0.2,
        **kw,
    )


async def drain(sub: Subscription, settle: float = 0.3) -> list[BusMessage]:
    got: list[BusMessage] = []
    while True:
        try:
            got.append(await sub.get(timeout=settle))
        except TimeoutError:
            return got


async def next_new(sub: Subscription, seen: set[bytes], limit: float = 30.0) -> bytes:
    """The next payload not seen before (at-least-once relays may repeat one)."""
    while True:
        payload = (await sub.get(limit)).payload
        if payload not in seen:
            seen.add(payload)
            return payload


async def rebind(bind: str) -> ZmqServerBus:
    """A verifier on the address a closed one had (libzmq releases it a moment later)."""
    async with asyncio.timeout(20):
        while True:
            v = verifier(bind)
            try:
                await v.connect()
                return v
            except BusError:
                await asyncio.sleep(0.05)


async def until(predicate: Callable[[], bool], limit: float = 20.0) -> None:
    async with asyncio.timeout(limit):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_relays_both_ways_keeping_properties(
    mosquitto: Any, ver: ZmqServerBus, unique_prefix: str
) -> None:
    t = Topics(unique_prefix)
    draft = t.session("d1", "s1", "draft")
    verdict = t.session("d1", "s1", "verdict")
    text = t.session("d1", "s1", "text")
    async with MqttBus(mq(mosquitto)) as m, ZmqBus(zq(ver)) as z, MqttBus(mq(mosquitto)) as dev:
        async with (
            Bridge(m, z, prefix=unique_prefix, bridge_id="b1") as bridge,
            dev.subscribe(t.everything()) as on_mqtt,
            ver.subscribe(t.everything()) as on_ver,
        ):
            await dev.publish(
                draft,
                b"\x00draft",
                qos=1,
                content_type=CONTENT_MSGPACK,
                expiry=30,
                user_properties={"trace": "abc"},
                correlation=b"\x01\x02",
            )
            await ver.publish(
                verdict,
                b"\x00verdict",
                qos=1,
                content_type=CONTENT_MSGPACK,
                user_properties={"trace": "def"},
                correlation=b"\x03",
            )
            await ver.publish(text, b"qos0", qos=0)
            got_v, got_m = await drain(on_ver), await drain(on_mqtt)
    relayed_draft = next(x for x in got_v if x.topic == draft)
    assert relayed_draft.payload == b"\x00draft" and relayed_draft.qos == 1
    assert relayed_draft.content_type == CONTENT_MSGPACK
    assert relayed_draft.correlation == b"\x01\x02"
    assert dict(relayed_draft.user_properties) == {"trace": "abc", MARK: "b1"}
    assert relayed_draft.expiry is not None and 0 < relayed_draft.expiry <= 30
    relayed_verdict = next(x for x in got_m if x.topic == verdict)
    assert (relayed_verdict.payload, relayed_verdict.correlation) == (b"\x00verdict", b"\x03")
    assert dict(relayed_verdict.user_properties) == {"trace": "def", MARK: "b1"}
    relayed_text = next(x for x in got_m if x.topic == text)
    assert (relayed_text.payload, relayed_text.qos) == (b"qos0", 0)
    # the verifier saw its own two publishes and the one relayed draft; MQTT each message once
    assert sorted(x.topic for x in got_v) == sorted([draft, verdict, text])
    assert sorted(x.topic for x in got_m) == sorted([draft, verdict, text])
    assert bridge.stats["to_zmq"]["relayed"] == 1 and bridge.stats["to_mqtt"]["relayed"] == 2
    assert bridge.stats["to_zmq"]["echoes"] == 2  # its relays to MQTT came back: not relayed
    assert bridge.stats["to_mqtt"]["echoes"] == 0  # a verifier does not echo what it receives


async def test_the_bridge_state_request_fills_the_mqtt_retained_store(
    mosquitto: Any, ver: ZmqServerBus, unique_prefix: str
) -> None:
    """State the verifier published before the bridge came reaches late MQTT subscribers."""
    t = Topics(unique_prefix)
    await ver.publish(t.session("d1", "s1", "state"), b"state-v1", retain=True)
    await ver.publish(t.verifier_status("v1"), b"online", retain=True)
    async with MqttBus(mq(mosquitto)) as m, ZmqBus(zq(ver)) as z:
        async with Bridge(m, z, prefix=unique_prefix) as bridge:
            await until(lambda: bridge.stats["to_mqtt"]["relayed"] == 2)
    async with MqttBus(mq(mosquitto)) as late, late.subscribe(t.everything()) as on_m:
        got = {x.topic: (x.payload, x.retain) for x in await drain(on_m)}
    assert got == {
        t.session("d1", "s1", "state"): (b"state-v1", True),
        t.verifier_status("v1"): (b"online", True),
    }


async def test_the_bridge_fails_over_to_the_next_verifier(
    mosquitto: Any, unique_prefix: str
) -> None:
    t = Topics(unique_prefix)
    draft = t.session("d1", "s1", "draft")
    v1_will = Will(t.verifier_status("v1"), b"offline", retain=True)
    async with verifier(will=v1_will) as v1, verifier() as v2:
        async with (
            MqttBus(mq(mosquitto)) as m,
            ZmqBus(zq(v1, v2)) as z,
            MqttBus(mq(mosquitto)) as dev,
            v1.subscribe(draft) as on_v1,
            v2.subscribe(draft) as on_v2,
            Bridge(m, z, prefix=unique_prefix),
            dev.subscribe(t.verifier_status("v1")) as status,
        ):
            await dev.publish(draft, b"to v1")
            assert (await on_v1.get(10)).payload == b"to v1"
            v1.crash()
            assert (await status.get(10)).payload == b"offline"  # v1's will, relayed to MQTT
            await dev.publish(draft, b"to v2")
            # "to v1" may come again: its ack could have died with v1 (at least once)
            assert await next_new(on_v2, {b"to v1"}, 20) == b"to v2"
    assert z.failovers >= 1


async def test_two_bridges_on_one_pair_cannot_loop(
    mosquitto: Any, ver: ZmqServerBus, unique_prefix: str
) -> None:
    """Each bridge relays the original once; each one's relay of a verdict back to the
    verifier's side stops there (a verifier does not republish what it receives)."""
    t = Topics(unique_prefix)
    draft, verdict = t.session("d1", "s1", "draft"), t.session("d1", "s1", "verdict")
    async with (
        MqttBus(mq(mosquitto)) as ma,
        ZmqBus(zq(ver)) as za,
        MqttBus(mq(mosquitto)) as mb,
        ZmqBus(zq(ver)) as zb,
        MqttBus(mq(mosquitto)) as dev,
    ):
        async with (
            Bridge(ma, za, prefix=unique_prefix, bridge_id="A"),
            Bridge(mb, zb, prefix=unique_prefix, bridge_id="B"),
            dev.subscribe(verdict) as on_m,
            ver.subscribe(t.everything()) as on_v,
        ):
            await dev.publish(draft, b"once")
            await ver.publish(verdict, b"v")
            got_m, got_v = await drain(on_m, 0.5), await drain(on_v, 0.5)
    marks_v = sorted((x.topic, x.user_properties.get(MARK, "")) for x in got_v)
    assert marks_v == sorted(
        [(draft, "A"), (draft, "B"), (verdict, ""), (verdict, "A,B"), (verdict, "B,A")]
    )
    assert sorted(x.user_properties.get(MARK, "") for x in got_m) == ["A", "B"]


async def test_survives_broker_and_verifier_restarts(
    fresh_mosquitto: MosquittoProcess, unique_prefix: str
) -> None:
    t = Topics(unique_prefix)
    topic_m, topic_z = t.session("d1", "s1", "verdict"), t.session("d1", "s1", "draft")
    dev_id = f"{unique_prefix}-dev".replace("/", "-")
    at_dev: set[bytes] = set()
    at_ver: set[bytes] = set()
    ver = verifier()
    await ver.connect()
    bind = ver.endpoint
    try:
        async with (
            MqttBus(mq(fresh_mosquitto, request_timeout=0.5)) as m,
            ZmqBus(zq(ver)) as z,
            MqttBus(
                mq(fresh_mosquitto, client_id=dev_id, clean_start=False, session_expiry=300)
            ) as dev,
        ):
            async with (
                Bridge(m, z, prefix=unique_prefix) as bridge,
                dev.subscribe(topic_m) as on_dev,
            ):
                on_ver = await ver.subscribe(topic_z)
                await ver.publish(topic_m, b"before")
                assert await next_new(on_dev, at_dev) == b"before"

                fresh_mosquitto.stop()  # the broker goes away ...
                await until(lambda: not m.is_connected)
                await ver.publish(topic_m, b"during broker outage")  # ... the bridge has it,
                await until(lambda: bridge.stats["to_mqtt"]["retries"] > 0)  # and retries
                await asyncio.to_thread(fresh_mosquitto.start)
                assert await next_new(on_dev, at_dev) == b"during broker outage"
                await dev.publish(topic_z, b"after broker restart")
                assert await next_new(on_ver, at_ver) == b"after broker restart"

                await ver.close()  # now the verifier restarts on the same address
                ver = await rebind(bind)
                on_ver = await ver.subscribe(topic_z)
                await until(lambda: z.is_connected and z.reconnects >= 1)
                await dev.publish(topic_z, b"after verifier restart")
                assert await next_new(on_ver, at_ver) == b"after verifier restart"
                # the bridge's DEALER re-subscribed before relaying that (one connection,
                # in order), so the verifier knows its filters by now
                await ver.publish(topic_m, b"and back")
                assert await next_new(on_dev, at_dev) == b"and back"
    finally:
        await ver.close()
    assert m.reconnects >= 1
    assert bridge.stats["to_mqtt"]["failed"] == bridge.stats["to_zmq"]["failed"] == 0
