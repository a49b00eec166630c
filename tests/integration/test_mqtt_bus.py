"""MqttBus against a real Mosquitto started by the fixtures (no mocks)."""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from middleware.broker_bridge.bus import CONTENT_MSGPACK, BusMessage, Subscription, Will
from middleware.broker_bridge.mqtt import MqttBus, MqttSettings
from middleware.errors import BusClosedError, BusError, ConfigError, TopicError
from middleware.mosquitto import MosquittoProcess, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

Settings = Callable[..., MqttSettings]


def _fast(broker: MosquittoProcess, **kw: Any) -> MqttSettings:
    """Settings for a broker a test kills: quick reconnect attempts."""
    return MqttSettings(
        host=broker.host, port=broker.port, reconnect_min=0.05, reconnect_max=0.5, **kw
    )


async def _until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll a condition (state changes driven by the broker), failing after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110  (no event exists for "disconnected")
            await asyncio.sleep(0.01)


async def _next_until(sub: Subscription, payload: bytes, timeout: float = 15.0) -> list[BusMessage]:
    """Messages received up to and including the first with ``payload``."""
    got: list[BusMessage] = []
    while not got or got[-1].payload != payload:
        got.append(await sub.get(timeout=timeout))
    return got


def _mqtt_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("mqtt[")]


async def test_round_trip_keeps_mqtt5_properties(
    mqtt_settings: Settings, unique_prefix: str
) -> None:
    async with MqttBus(mqtt_settings()) as pub, MqttBus(mqtt_settings()) as sub_bus:
        async with sub_bus.subscribe(f"{unique_prefix}/+/draft", qos=1) as sub:
            await pub.publish(
                f"{unique_prefix}/s1/draft",
                b"\x00\x01\xffbin",
                qos=1,
                content_type=CONTENT_MSGPACK,
                expiry=30,
                user_properties={"trace": "t-1", "sid": "s1"},
                correlation=b"\xde\xad\xbe\xef",
            )
            await pub.publish(f"{unique_prefix}/s2/draft", b"plain", qos=0)
            first = await sub.get(timeout=10)
            second = await sub.get(timeout=10)
    assert first.topic == f"{unique_prefix}/s1/draft"
    assert first.payload == b"\x00\x01\xffbin"
    assert (first.qos, first.retain) == (1, False)
    assert first.content_type == CONTENT_MSGPACK
    assert dict(first.user_properties) == {"trace": "t-1", "sid": "s1"}
    assert first.correlation == b"\xde\xad\xbe\xef"
    assert first.expiry is not None and 0 < first.expiry <= 30
    assert second == BusMessage(f"{unique_prefix}/s2/draft", b"plain", qos=0)
    assert _mqtt_tasks() == []


async def test_qos1_sequential_and_concurrent_publishes_all_arrive(
    mqtt_settings: Settings, unique_prefix: str
) -> None:
    topic = f"{unique_prefix}/q1"
    async with MqttBus(mqtt_settings()) as pub, MqttBus(mqtt_settings()) as sub_bus:
        async with sub_bus.subscribe(topic, qos=1) as sub:
            for i in range(100):
                await pub.publish(topic, b"seq-%d" % i, qos=1)
            # more than max_inflight (20) at once: paho queues the rest until PUBACKs return
            await asyncio.gather(*(pub.publish(topic, b"par-%d" % i, qos=1) for i in range(150)))
            got = [(await sub.get(timeout=10)).payload for _ in range(250)]
    assert got[:100] == [b"seq-%d" % i for i in range(100)]
    assert sorted(got[100:]) == sorted(b"par-%d" % i for i in range(150))
    assert sub.dropped == 0


async def test_retained_message_reaches_late_subscriber_and_empty_payload_clears_it(
    mqtt_settings: Settings, unique_prefix: str
) -> None:
    topic = f"{unique_prefix}/device/d1/status"
    async with MqttBus(mqtt_settings()) as pub:
        await pub.publish(topic, b"online", qos=1, retain=True)
        async with MqttBus(mqtt_settings()) as late, late.subscribe(topic) as sub:
            msg = await sub.get(timeout=10)
        assert (msg.payload, msg.retain) == (b"online", True)

        await pub.publish(topic, b"", qos=1, retain=True)  # clears the retained message
        async with MqttBus(mqtt_settings()) as later, later.subscribe(topic) as sub:
            await pub.publish(topic, b"marker", qos=1)
            got = await _next_until(sub, b"marker")
    assert [m.payload for m in got] == [b"marker"]  # nothing retained arrived before it
    assert got[0].retain is False


async def test_last_will_published_after_its_delay_when_client_dies(
    mqtt_settings: Settings, unique_prefix: str
) -> None:
    status = f"{unique_prefix}/device/d1/status"
    will = Will(status, b"offline", qos=1, retain=True, delay=1.0)
    device_settings = mqtt_settings(
        client_id=f"dev-{uuid.uuid4().hex[:8]}", will=will, session_expiry=5
    )
    async with MqttBus(mqtt_settings()) as watcher_bus, MqttBus(mqtt_settings()) as other:
        async with watcher_bus.subscribe(f"{unique_prefix}/device/+/status") as watch:
            device = MqttBus(device_settings)
            await device.connect()
            await device.publish(status, b"online", qos=1, retain=True)
            assert (await watch.get(timeout=10)).payload == b"online"

            device.crash()  # TCP close without DISCONNECT
            t_crash = time.perf_counter()
            await other.publish(f"{unique_prefix}/device/marker/status", b"marker", qos=1)
            first = await watch.get(timeout=10)
            second = await watch.get(timeout=15)
            will_after = time.perf_counter() - t_crash
        # the will is retained: a late subscriber sees the device as offline
        async with other.subscribe(status) as late:
            retained = await late.get(timeout=10)
        await other.publish(status, b"", qos=1, retain=True)
    assert first.payload == b"marker"  # sent right after the crash, before the delayed will
    assert (second.topic, second.payload) == (status, b"offline")
    assert (retained.payload, retained.retain) == (b"offline", True)
    print(f"will arrived {will_after:.2f}s after the crash (will delay 1 s)")


async def test_clean_close_does_not_publish_the_will(
    mqtt_settings: Settings, unique_prefix: str
) -> None:
    status = f"{unique_prefix}/device/d2/status"
    device_settings = mqtt_settings(will=Will(status, b"offline", qos=1, retain=False))
    async with MqttBus(mqtt_settings()) as watcher_bus, MqttBus(mqtt_settings()) as other:
        async with watcher_bus.subscribe(f"{unique_prefix}/device/+/status") as watch:
            async with MqttBus(device_settings) as device:
                await device.publish(status, b"online", qos=1)
            # Two sequential round trips: by the second the broker has long handled
            # the DISCONNECT, so a will (wrongly) sent would have arrived before it.
            await other.publish(status, b"marker-1", qos=1)
            got = await _next_until(watch, b"marker-1")
            await other.publish(status, b"marker-2", qos=1)
            got += await _next_until(watch, b"marker-2")
    assert [m.payload for m in got] == [b"online", b"marker-1", b"marker-2"]


async def test_shared_subscription_splits_messages_between_members(
    mqtt_settings: Settings, unique_prefix: str
) -> None:
    shared = f"$share/g-{uuid.uuid4().hex[:6]}/{unique_prefix}/session/+/open"
    n = 40
    received: dict[str, list[bytes]] = {"a": [], "b": []}
    all_in = asyncio.Event()

    async def consume(name: str, sub: Subscription) -> None:
        async for msg in sub:
            received[name].append(msg.payload)
            if sum(map(len, received.values())) == n:
                all_in.set()

    async with (
        MqttBus(mqtt_settings()) as a,
        MqttBus(mqtt_settings()) as b,
        MqttBus(mqtt_settings()) as pub,
    ):
        async with (
            a.subscribe(shared) as sub_a,
            b.subscribe(shared) as sub_b,
            asyncio.TaskGroup() as tg,
        ):
            tg.create_task(consume("a", sub_a), name="consume-a")
            tg.create_task(consume("b", sub_b), name="consume-b")
            for i in range(n):
                await pub.publish(f"{unique_prefix}/session/s{i}/open", b"%d" % i, qos=1)
            await asyncio.wait_for(all_in.wait(), 20)
            await sub_a.close()
            await sub_b.close()
    assert received["a"] and received["b"], received
    assert not set(received["a"]) & set(received["b"])
    assert sorted(received["a"] + received["b"]) == sorted(b"%d" % i for i in range(n))


async def test_bus_reconnects_and_resubscribes_after_broker_is_killed(
    fresh_mosquitto: MosquittoProcess, unique_prefix: str
) -> None:
    topic = f"{unique_prefix}/x"
    async with MqttBus(_fast(fresh_mosquitto)) as pub, MqttBus(_fast(fresh_mosquitto)) as sub_bus:
        async with sub_bus.subscribe(topic) as sub:
            await pub.publish(topic, b"before", qos=1)
            assert (await sub.get(timeout=10)).payload == b"before"

            fresh_mosquitto.kill()
            await _until(lambda: not pub.is_connected and not sub_bus.is_connected)
            with pytest.raises(BusError):
                await pub.publish(topic, b"gives-up", qos=1, timeout=0.3)
            during = asyncio.create_task(pub.publish(topic, b"during", qos=1, timeout=30))

            await asyncio.to_thread(fresh_mosquitto.start)
            await sub_bus.wait_connected(timeout=15)
            await pub.wait_connected(timeout=15)
            await during  # waited for the reconnect, then got its PUBACK
            await pub.publish(topic, b"after", qos=1)
            got = await _next_until(sub, b"after")
    assert got[-1].payload == b"after"
    assert (pub.reconnects, sub_bus.reconnects) == (1, 1)
    assert _mqtt_tasks() == []


async def test_persistent_session_survives_broker_restart(
    fresh_mosquitto: MosquittoProcess, unique_prefix: str
) -> None:
    topic = f"{unique_prefix}/verdict"
    device = MqttBus(
        _fast(fresh_mosquitto, client_id="dev-restart", clean_start=False, session_expiry=300)
    )
    inbox = await device.subscribe(topic, qos=1)
    async with device, MqttBus(_fast(fresh_mosquitto)) as pub:
        await pub.publish(topic, b"before", qos=1)
        assert (await inbox.get(timeout=10)).payload == b"before"

        await asyncio.to_thread(fresh_mosquitto.stop)  # SIGTERM: the broker saves its sessions
        await _until(lambda: not device.is_connected and not pub.is_connected)
        during = asyncio.create_task(pub.publish(topic, b"during", qos=1, timeout=30))
        await asyncio.to_thread(fresh_mosquitto.start)
        await device.wait_connected(timeout=15)
        await during
        await pub.publish(topic, b"after", qos=1)
        got = await _next_until(inbox, b"after")
        session_present = device.session_present
    assert session_present
    assert [m.payload for m in got] == [b"during", b"after"]


async def test_broker_restart_keeps_port_and_persisted_retained_messages(
    fresh_mosquitto: MosquittoProcess, unique_prefix: str
) -> None:
    topic = f"{unique_prefix}/verifier/v1/status"
    port, pid = fresh_mosquitto.port, fresh_mosquitto.pid
    async with MqttBus(_fast(fresh_mosquitto)) as bus:
        await bus.publish(topic, b"ready", qos=1, retain=True)
    await asyncio.to_thread(fresh_mosquitto.restart)  # SIGTERM saves the database
    assert (fresh_mosquitto.port, fresh_mosquitto.running) == (port, True)
    assert fresh_mosquitto.pid != pid
    async with MqttBus(_fast(fresh_mosquitto)) as bus, bus.subscribe(topic) as sub:
        msg = await sub.get(timeout=10)
    assert (msg.payload, msg.retain) == (b"ready", True)


async def test_offline_persistent_client_receives_qos1_messages_on_reconnect(
    mqtt_settings: Settings, unique_prefix: str
) -> None:
    topic = f"{unique_prefix}/device/d3/inbox"
    device_settings = mqtt_settings(
        client_id=f"dev-{uuid.uuid4().hex[:8]}", clean_start=False, session_expiry=60
    )
    first = MqttBus(device_settings)
    await first.subscribe(topic, qos=1)  # before connect: subscribed with the CONNECT
    async with first:
        pass  # online once, then offline (normal DISCONNECT; the session stays 60 s)

    async with MqttBus(mqtt_settings()) as pub:
        for i in range(5):
            await pub.publish(topic, b"queued-%d" % i, qos=1)

    again = MqttBus(device_settings)
    inbox = await again.subscribe(topic, qos=1)  # registered before the broker flushes the queue
    async with again:
        got = [(await inbox.get(timeout=10)).payload for _ in range(5)]
        session_present = again.session_present
    assert session_present
    assert got == [b"queued-%d" % i for i in range(5)]


async def test_close_is_idempotent_and_the_bus_cannot_be_used_after(
    mqtt_settings: Settings, unique_prefix: str
) -> None:
    bus = MqttBus(mqtt_settings())
    await bus.connect()
    sub = await bus.subscribe(f"{unique_prefix}/#")
    await bus.close()
    await bus.close()
    assert not bus.is_connected
    with pytest.raises(BusClosedError):
        await bus.publish(f"{unique_prefix}/x", b"late")
    with pytest.raises(BusClosedError):
        bus.subscribe(f"{unique_prefix}/y")
    assert [m async for m in sub] == []  # iteration ended by close()
    assert _mqtt_tasks() == []


async def test_connect_to_a_closed_port_raises_bus_error() -> None:
    bus = MqttBus(MqttSettings(port=free_port(), connect_timeout=0.5, reconnect_min=0.05))
    with pytest.raises(BusError):
        await bus.connect()
    assert _mqtt_tasks() == []


async def test_close_during_the_first_connect_ends_connect() -> None:
    bus = MqttBus(MqttSettings(port=free_port(), connect_timeout=60, reconnect_min=0.05))
    connecting = asyncio.create_task(bus.connect())
    await asyncio.sleep(0.2)  # let it fail an attempt or two and back off
    await bus.close()
    with pytest.raises(BusClosedError):
        await connecting
    assert _mqtt_tasks() == []


async def test_client_socket_has_tcp_nodelay(mqtt_settings: Settings) -> None:
    # Regression guard for the one setting that moves QoS 1 round trips from
    # ~90 ms (Nagle + delayed ACK) to ~1 ms; reads paho's socket on purpose.
    async with MqttBus(mqtt_settings()) as bus:
        assert bus._client is not None
        sock = bus._client.socket()
        assert isinstance(sock, socket.socket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


async def test_invalid_topics_and_oversized_messages_are_refused_before_sending(
    mqtt_settings: Settings, unique_prefix: str
) -> None:
    async with MqttBus(mqtt_settings()) as bus:
        with pytest.raises(TopicError):
            await bus.subscribe(f"{unique_prefix}/#/x")
        with pytest.raises(TopicError):
            await bus.publish(f"{unique_prefix}/+/x", b"wildcard")
        with pytest.raises(BusError, match="maximum packet size"):
            await bus.publish(f"{unique_prefix}/big", b"\x00" * 1_100_000)  # broker limit: 1 MiB
        async with bus.subscribe(f"{unique_prefix}/ok") as sub:  # still connected and usable
            await bus.publish(f"{unique_prefix}/ok", b"x" * 500_000)
            assert len((await sub.get(timeout=10)).payload) == 500_000
        assert bus.reconnects == 0


def test_settings_reject_a_will_delay_longer_than_the_session() -> None:
    with pytest.raises(ConfigError):
        MqttSettings(will=Will("t", b"x", delay=5.0), session_expiry=0)
    with pytest.raises(ConfigError):
        MqttSettings(clean_start=False)  # a persistent session needs a fixed client id


async def test_qos1_ping_pong_latency(
    mqtt_settings: Settings, unique_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ping, pong = f"{unique_prefix}/ping", f"{unique_prefix}/pong"
    warmup, rounds = 20, 300
    samples: list[float] = []
    async with MqttBus(mqtt_settings()) as a, MqttBus(mqtt_settings()) as b:
        async with (
            b.subscribe(ping) as pings,
            a.subscribe(pong) as pongs,
            asyncio.TaskGroup() as tg,
        ):

            async def echo() -> None:
                async for msg in pings:
                    await b.publish(pong, msg.payload, qos=1)

            tg.create_task(echo(), name="echo")
            for i in range(warmup + rounds):
                t0 = time.perf_counter()
                await a.publish(ping, b"%d" % i, qos=1)
                reply = await pongs.get(timeout=10)
                samples.append(time.perf_counter() - t0)
                assert reply.payload == b"%d" % i
            await pings.close()
    ms = sorted(s * 1e3 for s in samples[warmup:])
    with capsys.disabled():
        print(
            f"\nQoS1 ping-pong over Mosquitto on loopback ({rounds} rounds): "
            f"median {statistics.median(ms):.3f} ms, p90 {ms[int(0.9 * len(ms))]:.3f} ms, "
            f"max {ms[-1]:.3f} ms"
        )
    assert len(ms) == rounds
