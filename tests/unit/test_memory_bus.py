"""The in-memory broker and bus: the semantics every transport must offer."""

from __future__ import annotations

import asyncio

import pytest

from middleware.broker_bridge.bus import Bus, BusMessage, Subscription, Will
from middleware.errors import BusClosedError
from middleware.protocol import Topics
from tests.unit.membus import InMemoryBroker, InMemoryBus

T = Topics()


def drain(sub: Subscription) -> list[BusMessage]:
    """Everything queued right now, without waiting."""
    out: list[BusMessage] = []
    while True:
        try:
            item = sub._queue.get_nowait()
        except asyncio.QueueEmpty:
            return out
        if item is Subscription._CLOSED:
            sub._queue.put_nowait(item)
            return out
        out.append(item)  # type: ignore[arg-type]


def payloads(msgs: list[BusMessage]) -> list[bytes]:
    return [m.payload for m in msgs]


@pytest.fixture
def broker() -> InMemoryBroker:
    return InMemoryBroker()


async def test_is_a_bus(broker: InMemoryBroker) -> None:
    assert isinstance(InMemoryBus(broker), Bus)


async def test_publish_subscribe_with_metadata(broker: InMemoryBroker) -> None:
    async with InMemoryBus(broker, "a") as a, InMemoryBus(broker, "b") as b:
        async with b.subscribe(T.all_sessions("draft")) as sub:
            topic = T.session("d1", "s1", "draft")
            await a.publish(
                topic,
                b"x",
                qos=1,
                content_type="application/msgpack",
                expiry=30.0,
                user_properties={"trace": "t1"},
                correlation=b"c1",
            )
            await a.publish(T.session("d1", "s1", "verdict"), b"not for sub")
            msg = await sub.get(timeout=5)
            assert msg == BusMessage(
                topic, b"x", 1, False, "application/msgpack", 30.0, {"trace": "t1"}, b"c1"
            )
            assert drain(sub) == []


async def test_async_for_and_delivered_count(broker: InMemoryBroker) -> None:
    async with InMemoryBus(broker) as bus:
        sub = await bus.subscribe("mw/v1/#")
        for i in range(3):
            await bus.publish(T.device_status(f"d{i}"), str(i).encode())
        await sub.close()  # iteration drains what is queued, then ends
        got = [m.payload async for m in sub]
        assert got == [b"0", b"1", b"2"]
        assert sub.delivered == 3


async def test_fan_out_to_every_matching_subscription(broker: InMemoryBroker) -> None:
    async with (
        InMemoryBus(broker, "pub") as pub,
        InMemoryBus(broker, "c1") as c1,
        InMemoryBus(broker, "c2") as c2,
    ):
        s1 = await c1.subscribe("mw/v1/session/+/+/text")
        s2 = await c1.subscribe("mw/v1/session/d1/s1/#")
        s3 = await c2.subscribe("mw/v1/#")
        s4 = await c2.subscribe("mw/v1/device/+/status")
        await pub.publish(T.session("d1", "s1", "text"), b"t")
        assert payloads(drain(s1)) == [b"t"]
        assert payloads(drain(s2)) == [b"t"]
        assert payloads(drain(s3)) == [b"t"]
        assert drain(s4) == []
        assert broker.published == 1


async def test_retained_delivered_to_late_subscribers(broker: InMemoryBroker) -> None:
    async with InMemoryBus(broker, "v") as v, InMemoryBus(broker, "d") as d:
        state = T.session("d1", "s1", "state")
        await v.publish(state, b"old", retain=True)
        await v.publish(state, b"new", retain=True)
        await v.publish(T.session("d1", "s1", "verdict"), b"not retained")
        assert set(broker.retained) == {state}
        late = await d.subscribe(T.subtree("session/s1"))
        got = drain(late)
        assert payloads(got) == [b"new"] and got[0].retain is True
        other = await d.subscribe(T.subtree("session/s2"))
        assert drain(other) == []


async def test_empty_retained_payload_clears(broker: InMemoryBroker) -> None:
    async with InMemoryBus(broker) as bus:
        topic = T.session("d1", "s1", "result")
        await bus.publish(topic, b"final", retain=True)
        live = await bus.subscribe(topic)
        assert payloads(drain(live)) == [b"final"]
        await bus.publish(topic, b"", retain=True)
        assert topic not in broker.retained
        assert payloads(drain(live)) == [b""]  # live subscribers still see the clearing message
        late = await bus.subscribe(T.all_sessions("result"))
        assert drain(late) == []


async def test_retained_not_sent_to_shared_subscriptions(broker: InMemoryBroker) -> None:
    async with InMemoryBus(broker) as bus:
        await bus.publish(T.session("d1", "s1", "open"), b"o", retain=True)
        shared = await bus.subscribe(T.shared_open())
        assert drain(shared) == []  # MQTT 5: no retained messages for shared subscriptions


async def test_last_will_on_crash(broker: InMemoryBroker) -> None:
    topic = T.device_status("pi-1")
    will = Will(topic, b'{"online":false}', qos=1, retain=True)
    async with InMemoryBus(broker, "watch") as watch:
        sub = await watch.subscribe(T.all_device_status())
        dev = InMemoryBus(broker, "pi-1", will=will)
        await dev.__aenter__()
        dev_sub = await dev.subscribe("mw/v1/#")
        await dev.publish(topic, b'{"online":true}', retain=True)
        assert payloads(drain(sub)) == [b'{"online":true}']
        dev.crash()
        got = drain(sub)
        assert payloads(got) == [will.payload] and got[0].retain
        assert broker.retained[topic].payload == will.payload  # late watchers see it offline
        assert dev not in broker.clients
        # its own subscriptions end (after what was already queued): no hanging iterator
        assert payloads([m async for m in dev_sub]) == [b'{"online":true}']
        with pytest.raises(BusClosedError):
            await dev.publish(topic, b"x")


async def test_clean_close_sends_no_will(broker: InMemoryBroker) -> None:
    will = Will(T.verifier_status("v1"), b"offline")
    async with InMemoryBus(broker, "watch") as watch:
        sub = await watch.subscribe(T.all_verifier_status())
        async with InMemoryBus(broker, "v1", will=will):
            pass
        assert drain(sub) == []
        bus = InMemoryBus(broker, "v2", will=Will(T.verifier_status("v2"), b"offline"))
        async with bus:
            pass
        bus.crash()  # already disconnected cleanly: the will was discarded
        assert drain(sub) == []
        assert broker.retained == {}


async def test_shared_subscription_round_robin(broker: InMemoryBroker) -> None:
    buses = [InMemoryBus(broker, f"v{i}") for i in range(3)]
    async with InMemoryBus(broker, "dev") as dev:
        subs = []
        for b in buses:
            await b.__aenter__()
            subs.append(await b.subscribe(T.shared_open("verifiers")))
        monitor = await dev.subscribe(T.all_sessions("open"))  # a plain subscriber sees all
        for i in range(30):
            await dev.publish(T.session("d1", f"s{i}", "open"), str(i).encode())
        counts = [len(drain(s)) for s in subs]
        assert counts == [10, 10, 10]
        assert len(drain(monitor)) == 30
        for b in buses:
            await b.close()


async def test_two_share_groups_each_round_robin(broker: InMemoryBroker) -> None:
    """Each group balances on its own, whatever the other groups do."""
    async with InMemoryBus(broker, "dev") as dev:
        members: dict[str, list[Subscription]] = {"g1": [], "g2": []}
        buses = []
        for group in ("g1", "g2"):
            for i in range(2):
                b = InMemoryBus(broker, f"{group}-{i}")
                await b.__aenter__()
                buses.append(b)
                members[group].append(await b.subscribe(T.shared_open(group)))
        for i in range(20):
            await dev.publish(T.session("d1", f"s{i}", "open"), b"o")
        for group, subs in members.items():
            assert [len(drain(s)) for s in subs] == [10, 10], group
        for b in buses:
            await b.close()


async def test_shared_member_that_leaves_gets_nothing(broker: InMemoryBroker) -> None:
    async with (
        InMemoryBus(broker, "dev") as dev,
        InMemoryBus(broker, "v1") as v1,
        InMemoryBus(broker, "v2") as v2,
    ):
        keep = await v1.subscribe(T.shared_open())
        s_a = await v2.subscribe(T.shared_open())
        s_b = await v2.subscribe(T.shared_open())  # the same filter twice on one client
        await s_a.close()
        await s_b.close()
        for i in range(6):
            await dev.publish(T.session("d1", f"s{i}", "open"), b"o")
        assert len(drain(keep)) == 6  # nothing lost to the client that left the group


async def test_bounded_queue_drops_oldest_and_counts(broker: InMemoryBroker) -> None:
    async with InMemoryBus(broker) as bus:
        sub = await bus.subscribe("mw/v1/#", maxsize=3)
        for i in range(10):
            await bus.publish(T.session("d1", "s", "draft"), str(i).encode())
        assert sub.dropped == 7
        assert bus.dropped == 7
        assert payloads(drain(sub)) == [b"7", b"8", b"9"]
        await bus.publish(T.session("d1", "s", "draft"), b"10")
        assert payloads(drain(sub)) == [b"10"] and sub.dropped == 7


async def test_close_ends_iteration(broker: InMemoryBroker) -> None:
    bus = InMemoryBus(broker)
    await bus.__aenter__()
    sub = await bus.subscribe("mw/v1/#")
    received: list[bytes] = []

    async def consume() -> None:
        async for msg in sub:
            received.append(msg.payload)

    task = asyncio.create_task(consume(), name="consume")
    await bus.publish(T.device_status("d"), b"1")
    await asyncio.sleep(0)
    await bus.close()
    await asyncio.wait_for(task, 5)  # ends instead of hanging
    assert received == [b"1"]
    with pytest.raises(BusClosedError):
        await sub.get(timeout=5)
    with pytest.raises(BusClosedError):  # and again: the end marker stays
        await sub.get(timeout=5)


async def test_subscription_close_ends_only_itself(broker: InMemoryBroker) -> None:
    async with InMemoryBus(broker) as bus:
        async with bus.subscribe("mw/v1/#") as first:
            pass
        assert [m async for m in first] == []
        second = await bus.subscribe("mw/v1/#")
        await bus.publish(T.device_status("d"), b"x")
        assert payloads(drain(second)) == [b"x"]
        assert first not in bus._subs


async def test_get_timeout(broker: InMemoryBroker) -> None:
    async with InMemoryBus(broker) as bus:
        sub = await bus.subscribe("mw/v1/#")
        with pytest.raises(TimeoutError):
            await sub.get(timeout=0.01)


async def test_publish_and_subscribe_after_close_raise(broker: InMemoryBroker) -> None:
    bus = InMemoryBus(broker)
    async with bus:
        pass
    with pytest.raises(BusClosedError):
        await bus.publish(T.device_status("d"), b"x")
    with pytest.raises(BusClosedError):
        bus.subscribe("mw/v1/#")
    await bus.close()  # idempotent
    assert bus not in broker.clients


async def test_enter_twice_raises(broker: InMemoryBroker) -> None:
    bus = InMemoryBus(broker)
    async with bus:
        with pytest.raises(RuntimeError, match="twice"):
            await bus.__aenter__()
    with pytest.raises(RuntimeError):  # closed buses cannot be reopened either
        await bus.__aenter__()


async def test_delivery_to_publisher_itself(broker: InMemoryBroker) -> None:
    async with InMemoryBus(broker) as bus:
        sub = await bus.subscribe(T.device_inbox("d"))
        await bus.publish(T.device_inbox("d"), b"hello")
        assert payloads(drain(sub)) == [b"hello"]


async def test_unsubscribed_filters_stop_delivery(broker: InMemoryBroker) -> None:
    async with InMemoryBus(broker, "a") as a, InMemoryBus(broker, "b") as b:
        sub = await b.subscribe(T.all_sessions("draft"))
        await sub.close()
        assert b._filters == []
        await a.publish(T.session("d1", "s", "draft"), b"x")
        assert drain(sub) == []


async def test_filters_added_and_removed_on_one_subscription(broker: InMemoryBroker) -> None:
    async with InMemoryBus(broker, "v") as v, InMemoryBus(broker, "d") as d:
        await v.publish(T.session("d1", "s1", "state"), b"retained", retain=True)
        sub = await d.subscribe()  # starts empty
        await v.publish(T.session("d1", "s1", "verdict"), b"before")
        assert drain(sub) == []
        await sub.add(T.session("d1", "s1", "verdict"))
        await sub.add(T.session("d1", "s1", "state"))
        assert payloads(drain(sub)) == [b"retained"]
        await v.publish(T.session("d1", "s1", "verdict"), b"v1")
        await v.publish(T.session("d1", "s2", "verdict"), b"other session")
        assert payloads(drain(sub)) == [b"v1"]
        await sub.remove(T.session("d1", "s1", "verdict"))
        await v.publish(T.session("d1", "s1", "verdict"), b"after")
        assert drain(sub) == []
        assert d._filters == [T.session("d1", "s1", "state")]
        await sub.close()
        assert d._filters == []
