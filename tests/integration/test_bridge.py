"""The MQTT <-> ZeroMQ bridge against a real Mosquitto and a real hub (no mocks)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from middleware.broker_bridge.bridge import MARK, Bridge
from middleware.broker_bridge.bus import CONTENT_MSGPACK, BusMessage, Subscription
from middleware.broker_bridge.embedded import MosquittoProcess
from middleware.broker_bridge.mqtt import MqttBus, MqttSettings
from middleware.broker_bridge.zmq import HubSettings, ZmqBus, ZmqHub, ZmqSettings
from middleware.protocol import Topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
async def hub() -> AsyncIterator[ZmqHub]:
    async with ZmqHub(HubSettings(port=0, sweep_interval=0.02)) as h:
        yield h


def mq(broker: Any, **kw: Any) -> MqttSettings:
    return MqttSettings(
        host=broker.host, port=broker.port, reconnect_min=0.05, reconnect_max=0.5, **kw
    )


def zq(hub: ZmqHub, **kw: Any) -> ZmqSettings:
    return ZmqSettings(
        port=hub.port, heartbeat=0.1, liveness=3, reconnect_min=0.02, reconnect_max=0.2, **kw
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


async def until(predicate: Callable[[], bool], limit: float = 20.0) -> None:
    async with asyncio.timeout(limit):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_relays_both_ways_keeping_properties(
    mosquitto: Any, hub: ZmqHub, unique_prefix: str
) -> None:
    t = Topics(unique_prefix)
    async with (
        MqttBus(mq(mosquitto)) as m,
        ZmqBus(zq(hub)) as z,
        MqttBus(mq(mosquitto)) as m_obs,
        ZmqBus(zq(hub)) as z_obs,
    ):
        async with (
            Bridge(m, z, prefix=unique_prefix, bridge_id="b1") as bridge,
            m_obs.subscribe(t.everything()) as on_mqtt,
            z_obs.subscribe(t.everything()) as on_zmq,
        ):
            draft = t.session("d1", "s1", "draft")
            verdict = t.session("d1", "s1", "verdict")
            await m_obs.publish(
                draft,
                b"\x00draft",
                qos=1,
                content_type=CONTENT_MSGPACK,
                expiry=30,
                user_properties={"trace": "abc"},
                correlation=b"\x01\x02",
            )
            await z_obs.publish(
                verdict,
                b"\x00verdict",
                qos=1,
                content_type=CONTENT_MSGPACK,
                user_properties={"trace": "def"},
                correlation=b"\x03",
            )
            await z_obs.publish(t.session("d1", "s1", "text"), b"qos0", qos=0)
            got_z, got_m = await drain(on_zmq), await drain(on_mqtt)
    relayed_draft = next(x for x in got_z if x.topic == draft)
    assert relayed_draft.payload == b"\x00draft" and relayed_draft.qos == 1
    assert relayed_draft.content_type == CONTENT_MSGPACK
    assert relayed_draft.correlation == b"\x01\x02"
    assert dict(relayed_draft.user_properties) == {"trace": "abc", MARK: "b1"}
    assert relayed_draft.expiry is not None and 0 < relayed_draft.expiry <= 30
    relayed_verdict = next(x for x in got_m if x.topic == verdict)
    assert (relayed_verdict.payload, relayed_verdict.correlation) == (b"\x00verdict", b"\x03")
    assert dict(relayed_verdict.user_properties) == {"trace": "def", MARK: "b1"}
    text = next(x for x in got_m if x.topic == t.session("d1", "s1", "text"))
    assert (text.payload, text.qos) == (b"qos0", 0)
    # each side saw each message exactly once: the originals and one relay each, no echo
    assert sorted(x.topic for x in got_z) == sorted([draft, verdict, t.session("d1", "s1", "text")])
    assert sorted(x.topic for x in got_m) == sorted([draft, verdict, t.session("d1", "s1", "text")])
    assert bridge.stats["to_zmq"]["relayed"] == 1 and bridge.stats["to_mqtt"]["relayed"] == 2
    assert bridge.stats["to_zmq"]["echoes"] == 2 and bridge.stats["to_mqtt"]["echoes"] == 1


async def test_retained_state_reaches_late_subscribers_on_both_sides(
    mosquitto: Any, hub: ZmqHub, unique_prefix: str
) -> None:
    t = Topics(unique_prefix)
    async with (
        MqttBus(mq(mosquitto)) as m,
        ZmqBus(zq(hub)) as z,
        MqttBus(mq(mosquitto)) as dev,
        ZmqBus(zq(hub)) as ver,
    ):
        async with (
            Bridge(m, z, prefix=unique_prefix),
            dev.subscribe(t.device_status("pi-1")) as seen_z,
            ver.subscribe(t.session("d1", "s1", "state")) as seen_m,
        ):
            await ver.publish(t.session("d1", "s1", "state"), b"state-v1", retain=True)
            await dev.publish(t.device_status("pi-1"), b"online", retain=True)
            await seen_z.get(10)  # both relayed (the bridge works sequentially)
            await seen_m.get(10)
        async with MqttBus(mq(mosquitto)) as late_m, ZmqBus(zq(hub)) as late_z:
            async with (
                late_m.subscribe(t.all_sessions("state")) as on_m,
                late_z.subscribe(t.all_device_status()) as on_z,
            ):
                from_m, from_z = await on_m.get(10), await on_z.get(10)
    assert (from_m.payload, from_m.retain) == (b"state-v1", True)
    # MQTT cleared the flag on live delivery; the bridge knows status topics are retained
    assert (from_z.payload, from_z.retain) == (b"online", True)


async def test_shared_opens_reach_one_verifier_across_the_bridge(
    mosquitto: Any, hub: ZmqHub, unique_prefix: str
) -> None:
    t = Topics(unique_prefix)
    async with (
        MqttBus(mq(mosquitto)) as m,
        ZmqBus(zq(hub)) as z,
        MqttBus(mq(mosquitto)) as dev,
        ZmqBus(zq(hub)) as v1,
        ZmqBus(zq(hub)) as v2,
    ):
        async with (
            v1.subscribe(t.shared_open()) as o1,
            v2.subscribe(t.shared_open()) as o2,
            Bridge(m, z, prefix=unique_prefix),
        ):
            for i in range(6):
                await dev.publish(t.session("d1", f"s{i}", "open"), b"%d" % i)
            got1, got2 = await drain(o1), await drain(o2)
    assert len(got1) == len(got2) == 3
    assert sorted(x.payload for x in got1 + got2) == [b"%d" % i for i in range(6)]


async def test_a_cycle_of_bridges_cannot_loop(
    mosquitto: Any, hub: ZmqHub, unique_prefix: str
) -> None:
    """Two bridges over the same pair form a cycle: each copy stops after one round."""
    t = Topics(unique_prefix)
    topic = t.session("d1", "s1", "draft")
    async with (
        MqttBus(mq(mosquitto)) as ma,
        ZmqBus(zq(hub)) as za,
        MqttBus(mq(mosquitto)) as mb,
        ZmqBus(zq(hub)) as zb,
        MqttBus(mq(mosquitto)) as m_obs,
        ZmqBus(zq(hub)) as z_obs,
    ):
        async with (
            Bridge(ma, za, prefix=unique_prefix, bridge_id="A"),
            Bridge(mb, zb, prefix=unique_prefix, bridge_id="B"),
            m_obs.subscribe(topic) as on_m,
            z_obs.subscribe(topic) as on_z,
        ):
            await m_obs.publish(topic, b"once")
            got_m, got_z = await drain(on_m, 0.5), await drain(on_z, 0.5)
    assert sorted(x.user_properties.get(MARK, "") for x in got_z) == ["A", "B"]
    assert sorted(x.user_properties.get(MARK, "") for x in got_m) == ["", "A,B", "B,A"]


async def test_survives_broker_and_hub_restarts(
    fresh_mosquitto: MosquittoProcess, unique_prefix: str
) -> None:
    t = Topics(unique_prefix)
    topic_m, topic_z = t.session("d1", "s1", "verdict"), t.session("d1", "s1", "draft")
    dev_id = f"{unique_prefix}-dev".replace("/", "-")
    at_dev: set[bytes] = set()
    at_ver: set[bytes] = set()
    async with ZmqHub(HubSettings(port=0, sweep_interval=0.02)) as hub:
        port = hub.port
        async with (
            MqttBus(mq(fresh_mosquitto, request_timeout=0.5)) as m,
            ZmqBus(zq(hub)) as z,
            MqttBus(
                mq(fresh_mosquitto, client_id=dev_id, clean_start=False, session_expiry=300)
            ) as dev,
            ZmqBus(zq(hub)) as ver,
        ):
            async with (
                Bridge(m, z, prefix=unique_prefix) as bridge,
                dev.subscribe(topic_m) as on_dev,
                ver.subscribe(topic_z) as on_ver,
            ):
                await ver.publish(topic_m, b"before")
                assert await next_new(on_dev, at_dev) == b"before"

                fresh_mosquitto.stop()  # the broker goes away ...
                await until(lambda: not m.is_connected)
                await ver.publish(topic_m, b"during broker outage")  # ... the hub takes it,
                await until(lambda: bridge.stats["to_mqtt"]["retries"] > 0)  # the bridge retries
                await asyncio.to_thread(fresh_mosquitto.start)
                assert await next_new(on_dev, at_dev) == b"during broker outage"
                await dev.publish(topic_z, b"after broker restart")
                assert await next_new(on_ver, at_ver) == b"after broker restart"

                await hub.close()  # now the hub restarts
                async with ZmqHub(HubSettings(port=port)):
                    # until both have re-subscribed at the new hub (a message routed
                    # before a subscription exists is not delivered, as with MQTT)
                    await until(
                        lambda: (
                            z.hub_restarts == ver.hub_restarts == 1
                            and z.is_connected
                            and ver.is_connected
                        )
                    )
                    await dev.publish(topic_z, b"after hub restart")
                    assert await next_new(on_ver, at_ver) == b"after hub restart"
                    await ver.publish(topic_m, b"and back")
                    assert await next_new(on_dev, at_dev) == b"and back"
    assert m.reconnects >= 1 and z.hub_restarts == 1
    assert bridge.stats["to_mqtt"]["failed"] == bridge.stats["to_zmq"]["failed"] == 0
