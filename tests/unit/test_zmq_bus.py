"""ZmqBus and ZmqHub over real sockets on random loopback ports (no mocks).

Raw DEALER/ROUTER sockets speaking the hub protocol stand in for a client
that stops heartbeating and for a hub or consumer that stops reading.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from middleware.broker_bridge import zmq_wire as w
from middleware.broker_bridge.bus import CONTENT_MSGPACK, BusMessage, Subscription, Will
from middleware.broker_bridge.zmq import HubSettings, ZmqBus, ZmqHub, ZmqSettings
from middleware.errors import BusClosedError, BusError, ConfigError, TopicError

pytestmark = pytest.mark.timeout(30)

FAST = {
    "heartbeat": 0.05,
    "liveness": 3,
    "reconnect_min": 0.02,
    "reconnect_max": 0.2,
    "connect_timeout": 5.0,
    "request_timeout": 5.0,
}


@pytest.fixture
async def hub() -> AsyncIterator[ZmqHub]:
    async with ZmqHub(HubSettings(port=0, sweep_interval=0.02)) as h:
        yield h


def cfg(hub: ZmqHub, **kw: Any) -> ZmqSettings:
    return ZmqSettings(port=hub.port, **{**FAST, **kw})


async def until(predicate: Callable[[], bool], limit: float = 10.0) -> None:
    """Poll a condition driven by another party (hub sweep, reconnect)."""
    async with asyncio.timeout(limit):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def drain(sub: Subscription, settle: float = 0.2) -> list[BusMessage]:
    """Everything that arrives until the subscription is quiet for ``settle`` seconds."""
    got: list[BusMessage] = []
    while True:
        try:
            got.append(await sub.get(timeout=settle))
        except TimeoutError:
            return got


def raw_dealer(port: int, **opts: int) -> zmq.asyncio.Socket:
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    for k, v in opts.items():
        sock.setsockopt(getattr(zmq, k), v)
    sock.connect(f"tcp://127.0.0.1:{port}")
    return sock


async def raw_hello(
    sock: zmq.asyncio.Socket,
    client_id: str,
    hb: float = 10.0,
    live: int = 3,
    will: Will | None = None,
) -> None:
    await sock.send_multipart(
        [w.pack(w.HELLO, id=client_id, v=w.VERSION, hb=hb, live=live, will=w.will_to_wire(will))]
    )
    head = w.unpack((await asyncio.wait_for(sock.recv_multipart(), 5))[0])
    assert head["c"] == w.WELCOME


# --- pub/sub and properties -------------------------------------------------------------
async def test_round_trip_keeps_every_property(hub: ZmqHub) -> None:
    async with ZmqBus(cfg(hub)) as pub, ZmqBus(cfg(hub)) as sub_bus:
        async with sub_bus.subscribe("t/+/draft") as sub:
            await pub.publish(
                "t/s1/draft",
                b"\x00\x01\xffbin",
                qos=1,
                content_type=CONTENT_MSGPACK,
                expiry=30,
                user_properties={"trace": "t-1", "sid": "s1"},
                correlation=b"\xde\xad\xbe\xef",
            )
            await pub.publish("t/s2/draft", b"plain", qos=0)
            await pub.publish("t/s3/other", b"not matched", qos=1)
            first, second = await sub.get(5), await sub.get(5)
            assert await drain(sub) == []
    assert first == BusMessage(
        "t/s1/draft",
        b"\x00\x01\xffbin",
        qos=1,
        retain=False,
        content_type=CONTENT_MSGPACK,
        expiry=30.0,
        user_properties={"trace": "t-1", "sid": "s1"},
        correlation=b"\xde\xad\xbe\xef",
    )
    assert second == BusMessage("t/s2/draft", b"plain", qos=0)


async def test_overlapping_filters_deliver_once_per_subscription(hub: ZmqHub) -> None:
    async with ZmqBus(cfg(hub)) as pub, ZmqBus(cfg(hub)) as sub_bus:
        async with (
            sub_bus.subscribe("a/#") as wide,
            sub_bus.subscribe("a/b") as exact,
            sub_bus.subscribe("+/b") as plus,
        ):
            await pub.publish("a/b", b"1")
            await pub.publish("$sys/b", b"dollar topics never match wildcards")
            got = [await drain(s) for s in (wide, exact, plus)]
    assert [[m.payload for m in g] for g in got] == [[b"1"], [b"1"], [b"1"]]
    assert hub.stats.delivered == 1  # one copy to the client, fanned out locally


async def test_added_and_removed_filters(hub: ZmqHub) -> None:
    async with ZmqBus(cfg(hub)) as pub, ZmqBus(cfg(hub)) as sub_bus:
        async with sub_bus.subscribe() as sub:
            await sub.add("x/1")
            await sub.add("x/2")
            await pub.publish("x/1", b"a")
            await pub.publish("x/2", b"b")
            assert [m.payload for m in await drain(sub)] == [b"a", b"b"]
            await sub.remove("x/1")
            await pub.publish("x/1", b"gone")
            await pub.publish("x/2", b"c")
            assert [m.payload for m in await drain(sub)] == [b"c"]


async def test_invalid_topics_and_settings_are_refused(hub: ZmqHub) -> None:
    async with ZmqBus(cfg(hub)) as bus:
        with pytest.raises(TopicError):
            await bus.publish("a/+", b"x")
        with pytest.raises(TopicError):
            await bus.subscribe("a/#/b")
        with pytest.raises(BusError):
            await bus.publish("a", b"x", qos=3)
    with pytest.raises(BusClosedError):
        await bus.publish("a", b"x")
    with pytest.raises(ConfigError):
        ZmqSettings(heartbeat=0)


async def test_first_connect_fails_without_a_hub() -> None:
    from middleware.broker_bridge.embedded import free_port

    bus = ZmqBus(ZmqSettings(port=free_port(), **{**FAST, "connect_timeout": 0.3}))
    with pytest.raises(BusError, match="no answer from a hub"):
        await bus.connect()


# --- retained messages -------------------------------------------------------------------
async def test_retained_delivered_to_new_subscribers_and_deleted_by_empty(hub: ZmqHub) -> None:
    async with ZmqBus(cfg(hub)) as pub, ZmqBus(cfg(hub)) as late:
        await pub.publish(
            "r/state", b"v1", retain=True, content_type="x", user_properties={"k": "v"}
        )
        await pub.publish("r/state", b"v2", retain=True)
        await pub.publish("r/short", b"expires", retain=True, expiry=0.05)
        await asyncio.sleep(0.1)  # let r/short's expiry pass
        async with late.subscribe("r/#") as sub:
            got = await drain(sub)
        assert [(m.topic, m.payload, m.retain) for m in got] == [("r/state", b"v2", True)]
        async with late.subscribe("$share/g/r/#") as shared:
            assert await drain(shared) == []  # MQTT: no retained messages for shared subscriptions
        await pub.publish("r/state", b"", retain=True)
        async with late.subscribe("r/#") as sub:
            assert await drain(sub) == []
    assert hub.retained() == {}


async def test_live_messages_keep_their_retain_flag(hub: ZmqHub) -> None:
    async with ZmqBus(cfg(hub)) as pub, ZmqBus(cfg(hub)) as sub_bus:
        async with sub_bus.subscribe("f/#") as sub:
            await pub.publish("f/a", b"r", retain=True)
            await pub.publish("f/b", b"n")
            got = await drain(sub)
    assert [(m.topic, m.retain) for m in got] == [("f/a", True), ("f/b", False)]


async def test_retained_survive_a_restart_only_when_persisted(tmp_path: Path) -> None:
    path = str(tmp_path / "retained.msgpack")
    for persist, expect in ((path, [b"kept"]), (None, [])):
        async with ZmqHub(HubSettings(port=0, persist_path=persist)) as hub:
            async with ZmqBus(cfg(hub)) as bus:
                await bus.publish("p/state", b"kept", retain=True, expiry=60)
            port = hub.port
        async with ZmqHub(HubSettings(port=port, persist_path=persist)) as hub2:
            async with ZmqBus(cfg(hub2)) as bus, bus.subscribe("p/#") as sub:
                got = await drain(sub)
        assert [m.payload for m in got] == expect
        if expect:
            assert got[0].expiry is not None and 0 < got[0].expiry <= 60


# --- last wills ----------------------------------------------------------------------------
async def test_will_published_when_client_crashes(hub: ZmqHub) -> None:
    will = Will("d/dev-1/status", b"offline", qos=1, retain=True)
    async with ZmqBus(cfg(hub)) as watcher, watcher.subscribe("d/+/status") as sub:
        dev = ZmqBus(cfg(hub, client_id="dev-1", will=will))
        await dev.connect()
        await dev.publish("d/dev-1/status", b"online", retain=True)
        assert (await sub.get(5)).payload == b"online"
        dev.crash()  # socket closed without bye: the heartbeats stop
        msg = await sub.get(5)
    assert (msg.topic, msg.payload, msg.retain) == ("d/dev-1/status", b"offline", True)
    assert hub.retained()["d/dev-1/status"].payload == b"offline"
    assert hub.stats.wills == 1 and "dev-1" not in hub.clients


async def test_will_published_when_heartbeats_stop_on_an_open_socket(hub: ZmqHub) -> None:
    async with ZmqBus(cfg(hub)) as watcher, watcher.subscribe("d/#") as sub:
        sock = raw_dealer(hub.port)
        try:
            await raw_hello(sock, "silent", hb=0.05, live=2, will=Will("d/silent", b"gone"))
            msg = await sub.get(5)  # the socket stays open, nothing is sent: dead all the same
        finally:
            sock.close(linger=0)
    assert (msg.topic, msg.payload) == ("d/silent", b"gone")


async def test_clean_close_and_early_return_discard_the_will(hub: ZmqHub) -> None:
    async with ZmqBus(cfg(hub)) as watcher, watcher.subscribe("d/#") as sub:
        async with ZmqBus(cfg(hub, client_id="polite", will=Will("d/polite", b"gone"))):
            pass  # bye
        sock = raw_dealer(hub.port)
        try:  # dies, but says hello again before its will's delay is over
            await raw_hello(sock, "back", hb=0.05, live=2, will=Will("d/back", b"gone", delay=0.3))
            await until(lambda: "back" not in hub.clients)
            await raw_hello(sock, "back", hb=10.0)
            await asyncio.sleep(0.5)  # past the will's delay
            await watcher.publish("d/sentinel", b"s")
            got = await drain(sub)
        finally:
            sock.close(linger=0)
    assert [m.topic for m in got] == ["d/sentinel"]
    assert hub.stats.wills == 0


# --- shared subscriptions -------------------------------------------------------------------
async def test_shared_subscription_round_robin(hub: ZmqHub) -> None:
    async with (
        ZmqBus(cfg(hub)) as pub,
        ZmqBus(cfg(hub)) as a,
        ZmqBus(cfg(hub)) as b,
        ZmqBus(cfg(hub)) as plain,
    ):
        async with (
            a.subscribe("$share/v/s/+/open") as sa,
            b.subscribe("$share/v/s/+/open") as sb,
            plain.subscribe("s/+/open") as sp,
        ):
            for i in range(10):
                await pub.publish(f"s/{i}/open", b"%d" % i)
            got_a, got_b, got_p = [await drain(s) for s in (sa, sb, sp)]
    assert len(got_a) == len(got_b) == 5  # each open to exactly one member, in turn
    assert sorted(m.payload for m in got_a + got_b) == sorted(b"%d" % i for i in range(10))
    assert len(got_p) == 10


# --- acknowledgements ---------------------------------------------------------------------
async def test_qos1_publish_returns_after_the_hub_routed_it(hub: ZmqHub) -> None:
    async with ZmqBus(cfg(hub)) as bus:
        for i in range(50):
            await bus.publish("ack/t", b"%d" % i, qos=1)
            assert hub.stats.published == i + 1  # the hub handled it before the ack
        await asyncio.gather(*(bus.publish("ack/t", b"x", qos=1) for _ in range(200)))
        assert hub.stats.published == 250
        assert bus.stats["inflight"] == 0


async def test_publish_waits_for_the_hub_and_times_out(hub: ZmqHub) -> None:
    port = hub.port
    async with ZmqBus(cfg(hub)) as bus:
        await hub.close()
        await until(lambda: not bus.is_connected)
        with pytest.raises(BusError, match="in time"):
            await bus.publish("x", b"lost?", qos=1, timeout=0.2)
        pending = asyncio.create_task(bus.publish("x", b"after restart", qos=1, timeout=10))
        async with ZmqHub(HubSettings(port=port)) as hub2:
            await pending  # acknowledged by the new hub
            assert hub2.stats.published >= 1


# --- flow control ---------------------------------------------------------------------------
async def test_hub_drops_and_counts_what_a_slow_consumer_cannot_take() -> None:
    async with ZmqHub(HubSettings(port=0, sndhwm=4)) as hub:
        slow = raw_dealer(hub.port, RCVHWM=4, RCVBUF=65536)
        try:
            await raw_hello(slow, "slow", hb=30.0)
            await slow.send_multipart([w.pack(w.SUB, rid=1, f="big/#", q=0)])
            assert w.unpack((await slow.recv_multipart())[0])["c"] == w.SUBACK
            n, payload = 400, b"x" * 65536
            async with ZmqBus(cfg(hub)) as pub:
                for _ in range(n):  # the slow client reads nothing meanwhile
                    await pub.publish("big/t", payload, qos=1)
            dropped = hub.client_stats("slow")["dropped"]
            received = 0
            while True:
                try:
                    frames = await asyncio.wait_for(slow.recv_multipart(), 0.5)
                except TimeoutError:
                    break
                received += w.unpack(frames[0])["c"] == w.MSG
        finally:
            slow.close(linger=0)
    assert dropped > 0
    assert received + dropped == n  # every message either delivered or counted as dropped
    assert hub.stats.dropped == dropped


async def test_client_counts_qos0_drops_when_its_send_queue_is_full() -> None:
    ctx = zmq.asyncio.Context.instance()
    router = ctx.socket(zmq.ROUTER)  # a "hub" that welcomes, then stops reading
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.RCVHWM, 4)
    router.setsockopt(zmq.RCVBUF, 65536)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    bus = ZmqBus(ZmqSettings(port=port, heartbeat=30.0, sndhwm=4, connect_timeout=5))
    try:
        connecting = asyncio.create_task(bus.connect())
        ident, _hello = await router.recv_multipart()
        await router.send_multipart([ident, w.pack(w.WELCOME, hub="fake", v=w.VERSION)])
        await connecting
        n = 400
        for _ in range(n):
            await bus.publish("q0", b"y" * 65536, qos=0)
        drops = bus.send_drops
        received = 0
        while True:
            try:
                frames = await asyncio.wait_for(router.recv_multipart(), 0.5)
            except TimeoutError:
                break
            received += w.unpack(frames[1])["c"] == w.PUB
    finally:
        bus.crash()
        router.close(linger=0)
    assert drops > 0
    assert received + drops == n


# --- hub restart, heartbeats, malformed input ---------------------------------------------------
async def test_clients_reconnect_and_resubscribe_after_a_hub_restart(hub: ZmqHub) -> None:
    port = hub.port
    async with ZmqBus(cfg(hub)) as pub, ZmqBus(cfg(hub)) as sub_bus:
        async with sub_bus.subscribe("h/main") as sub:
            await sub.add("h/extra")
            await hub.close()
            await until(lambda: not sub_bus.is_connected and not pub.is_connected)
            async with ZmqHub(HubSettings(port=port)) as hub2:
                await until(lambda: sub_bus.is_connected and pub.is_connected)
                await pub.publish("h/main", b"1")
                await pub.publish("h/extra", b"2")
                got = await drain(sub)
                assert set(hub2.clients) == {pub.client_id, sub_bus.client_id}
    assert [m.payload for m in got] == [b"1", b"2"]
    assert sub_bus.reconnects == 1 and sub_bus.hub_restarts == 1


async def test_hub_that_forgot_the_client_triggers_a_new_hello(hub: ZmqHub) -> None:
    """A client declared dead (paused longer than its liveness) is told ``unknown``
    on its next frame and starts a new session at once."""
    async with ZmqBus(cfg(hub, client_id="sleepy")) as bus, bus.subscribe("z/#") as sub:
        client = hub._clients[hub._by_id["sleepy"]]
        client.last_seen -= 60  # as if it had been silent for a minute
        await until(lambda: bus.reconnects == 1)
        await bus.publish("z/1", b"still subscribed")
        assert [m.payload for m in await drain(sub)] == [b"still subscribed"]
        assert bus.hub_restarts == 0


async def test_hub_refuses_another_protocol_version(hub: ZmqHub) -> None:
    sock = raw_dealer(hub.port)
    try:
        await sock.send_multipart([w.pack(w.HELLO, id="future", v=w.VERSION + 1)])
        head = w.unpack((await asyncio.wait_for(sock.recv_multipart(), 5))[0])
    finally:
        sock.close(linger=0)
    assert head["c"] == w.WELCOME and "err" in head
    assert "future" not in hub.clients


async def test_malformed_frames_are_counted_and_ignored(hub: ZmqHub) -> None:
    sock = raw_dealer(hub.port)
    try:
        await sock.send_multipart([b"\xc1not msgpack"])
        await sock.send_multipart([w.pack(w.HELLO, id="", v=w.VERSION)])
        await raw_hello(sock, "ok-after-garbage")
        await sock.send_multipart([w.pack(w.PUB, m=7, t="a/+", q=1), b"wildcard topic"])
        head = w.unpack((await asyncio.wait_for(sock.recv_multipart(), 5))[0])
    finally:
        sock.close(linger=0)
    assert head["c"] == w.PUBACK and head["m"] == 7 and "err" in head
    assert hub.stats.malformed == 3
