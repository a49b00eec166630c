"""ZmqBus (device DEALER) and ZmqServerBus (verifier ROUTER) over real loopback sockets.

No mocks: raw pyzmq sockets stand in for hostile peers, and the fault-injecting TCP
proxy black-holes a link so that only the ZMTP heartbeats can notice it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio

from middleware.broker_bridge import zmq_wire as w
from middleware.broker_bridge.bus import CONTENT_MSGPACK, BusMessage, Subscription, Will
from middleware.broker_bridge.zmq import (
    ZmqBus,
    ZmqServerBus,
    ZmqServerSettings,
    ZmqSettings,
    check_endpoint,
)
from middleware.errors import BusError, ConfigError, TopicError
from tests.integration.proxy import TcpProxy

pytestmark = pytest.mark.timeout(60)

HB = 0.1  # ZMTP heartbeat: a silent peer is dropped after 0.3 s
FAST: dict[str, Any] = {
    "heartbeat": HB,
    "handshake_timeout": 0.5,
    "reconnect_min": 0.02,
    "reconnect_max": 0.2,
    "connect_timeout": 10.0,
    "request_timeout": 10.0,
}
V_WILL = Will("t/verifier/v/status", b"offline-v")
D_WILL = Will("t/device/d/status", b"offline-d")


def server(will: Will | None = V_WILL, sid: str = "v") -> ZmqServerBus:
    return ZmqServerBus(
        ZmqServerSettings(bind="tcp://127.0.0.1:*", server_id=sid, will=will, heartbeat=HB)
    )


def device(*servers: ZmqServerBus | str, **kw: Any) -> ZmqBus:
    eps = tuple(s if isinstance(s, str) else s.endpoint for s in servers)
    return ZmqBus(ZmqSettings(endpoints=eps, **{**FAST, **kw}))


@pytest.fixture
async def v() -> AsyncIterator[ZmqServerBus]:
    async with server() as bus:
        yield bus


async def until(predicate: Callable[[], bool], limit: float = 20.0) -> None:
    async with asyncio.timeout(limit):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def drain(sub: Subscription, settle: float = 0.3) -> list[BusMessage]:
    got: list[BusMessage] = []
    while True:
        try:
            got.append(await sub.get(timeout=settle))
        except TimeoutError:
            return got


# --- data path ------------------------------------------------------------------------------
async def test_device_publish_reaches_the_verifier_with_every_property(v: ZmqServerBus) -> None:
    async with v.subscribe("t/+/draft") as sub, device(v) as d:
        await d.publish(
            "t/s1/draft",
            b"\x00\x01\xffbin",
            qos=1,
            content_type=CONTENT_MSGPACK,
            expiry=30,
            user_properties={"trace": "t-1"},
            correlation=b"\xde\xad",
        )
        await d.publish("t/s2/other", b"not matched", qos=1)
        assert await sub.get(5) == BusMessage(
            "t/s1/draft",
            b"\x00\x01\xffbin",
            qos=1,
            content_type=CONTENT_MSGPACK,
            expiry=30.0,
            user_properties={"trace": "t-1"},
            correlation=b"\xde\xad",
        )
        assert await drain(sub) == []


async def test_shared_filter_is_a_plain_one_on_the_verifier(v: ZmqServerBus) -> None:
    async with v.subscribe("$share/verifiers/t/+/open") as sub, device(v) as d:
        await d.publish("t/s1/open", b"o", qos=1)
        assert (await sub.get(5)).payload == b"o"


async def test_verifier_publishes_only_to_matching_devices(v: ZmqServerBus) -> None:
    async with device(v) as a, device(v) as b:
        async with a.subscribe("t/a/#") as on_a, b.subscribe("t/b/#") as on_b:
            await v.publish("t/a/verdict", b"for a")
            await v.publish("t/b/verdict", b"for b")
            assert [m.payload for m in await drain(on_a)] == [b"for a"]
            assert [m.payload for m in await drain(on_b)] == [b"for b"]


async def test_subscribe_is_a_state_request_answered_by_the_verifier(v: ZmqServerBus) -> None:
    await v.publish("t/s1/state", b"old", retain=True)
    await v.publish("t/s1/state", b"epoch 2", retain=True)
    await v.publish("t/s2/state", b"gone", retain=True)
    await v.publish("t/s2/state", b"", retain=True)  # cleared
    await v.publish("t/s3/verdict", b"live only")  # not state
    await v.publish("t/s4/state", b"expired", retain=True, expiry=0.05)
    await v.publish("t/s5/state", b"expires", retain=True, expiry=3600)
    await asyncio.sleep(0.1)
    async with device(v) as d, d.subscribe("t/+/#") as sub:
        got = await drain(sub)
    assert [(m.topic, m.payload, m.retain) for m in got] == [
        ("t/s1/state", b"epoch 2", True),
        ("t/s5/state", b"expires", True),
    ]
    assert got[0].expiry is None
    assert got[1].expiry is not None and 0 < got[1].expiry < 3600


async def test_topic_errors_are_refused_before_sending(v: ZmqServerBus) -> None:
    async with device(v) as d:
        with pytest.raises(TopicError):
            await d.publish("t/+/bad", b"x")
        with pytest.raises(TopicError):
            await d.subscribe("t/#/x")


# --- liveness: wills from the handshake ---------------------------------------------------------
async def test_device_crash_delivers_its_will_clean_close_does_not(v: ZmqServerBus) -> None:
    async with v.subscribe("t/device/+/status") as status:
        clean = device(v, client_id="clean", will=Will("t/device/c/status", b"offline-c"))
        async with clean:
            await until(lambda: v.peers == 1)
        crashed = device(v, client_id="crash", will=D_WILL)
        await crashed.connect()
        await until(lambda: v.peers == 1)
        crashed.crash()
        assert (await status.get(10)).payload == b"offline-d"
        assert await drain(status) == []  # the clean one said bye: no will
    assert v.wills == 1


async def test_blackholed_link_is_noticed_by_zmtp_heartbeats_on_both_sides(
    v: ZmqServerBus,
) -> None:
    """Bytes stop both ways but no socket closes: only the heartbeats can tell."""
    async with TcpProxy("127.0.0.1", v.port) as proxy:
        d = device(f"tcp://127.0.0.1:{proxy.port}", will=D_WILL, connect_timeout=10.0)
        async with v.subscribe("t/device/+/status") as status, d:
            async with d.subscribe("t/verifier/+/status") as vstatus:
                proxy.blackholed = True
                assert (await status.get(10)).payload == b"offline-d"  # the verifier's view
                assert (await vstatus.get(10)).payload == b"offline-v"  # the device's view
                assert not d.is_connected
                proxy.blackholed = False
                await d.wait_connected(20)  # and back on the same endpoint
                await d.publish("t/after", b"x")


# --- failover ------------------------------------------------------------------------------------
async def test_failover_to_the_next_verifier_resubscribes_and_resends() -> None:
    async with server(sid="v1") as v1, server(sid="v2") as v2:
        async with v2.subscribe("t/+/draft") as on_v2, device(v1, v2) as d:
            assert d.server_id == "v1"
            async with d.subscribe("t/s1/#") as sub, d.subscribe("t/verifier/#") as vstat:
                await v2.publish("t/s1/state", b"v2 state", retain=True)
                v1.crash()
                assert (await vstat.get(10)).payload == b"offline-v"  # v1's will
                await d.publish("t/s1/draft", b"after", qos=1)  # waits for v2, then acked
                assert d.server_id == "v2" and d.failovers >= 1
                assert (await on_v2.get(5)).payload == b"after"
                # re-subscribed on v2: its state answered the request, its verdicts arrive
                await v2.publish("t/s1/verdict", b"v")
                payloads = [m.payload for m in await drain(sub)]
                assert payloads == [b"v2 state", b"v"]


async def test_first_connect_skips_a_dead_endpoint() -> None:
    with zmq.Context.instance().socket(zmq.REP) as dead:  # listens, never says welcome
        port = dead.bind_to_random_port("tcp://127.0.0.1")
        async with server() as v, device(f"tcp://127.0.0.1:{port}", v) as d:
            assert d.server_id == "v" and d.failovers == 1


async def test_no_verifier_at_all_fails_connect_in_time() -> None:
    d = device("tcp://127.0.0.1:1", connect_timeout=1.0)
    with pytest.raises(BusError):
        await d.connect()
    await d.close()


# --- untrusted bytes ---------------------------------------------------------------------------
async def test_malformed_frames_are_counted_and_dropped(v: ZmqServerBus) -> None:
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(v.endpoint)
    try:
        await sock.send_multipart([w.pack(w.Head(w.PUB, t="t/x", q=1, m=1)), b"x"])  # no hello yet
        assert w.unpack((await asyncio.wait_for(sock.recv_multipart(), 5))[0]).c == w.UNKNOWN
        await sock.send_multipart([w.pack(w.Head(w.HELLO, id="raw", v=w.VERSION))])
        assert w.unpack((await asyncio.wait_for(sock.recv_multipart(), 5))[0]).c == w.WELCOME
        for junk in (
            b"\xc1",
            b"\x93\x01\x02\x03",
            w.pack(w.Head("nope")),
            msgpack.packb({"c": "pub", "t": 7, "q": 1}),
        ):
            await sock.send_multipart([junk])
        await until(lambda: v.malformed == 4)
        async with device(v) as d, v.subscribe("t/ok") as sub:  # still serving
            await d.publish("t/ok", b"fine")
            assert (await sub.get(5)).payload == b"fine"
    finally:
        sock.close()


# --- settings ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("endpoint", "bind"),
    [("v1:5555", False), ("tcp://v1", False), ("tcp://*:5555", False), ("tcp://v:70000", True)],
)
def test_bad_endpoints_are_config_errors(endpoint: str, bind: bool) -> None:
    with pytest.raises(ConfigError):
        check_endpoint(endpoint, bind=bind)


def test_good_endpoints() -> None:
    assert check_endpoint("tcp://*:5555", bind=True) == "tcp://*:5555"
    assert check_endpoint("tcp://[::1]:5555") == "tcp://[::1]:5555"
    with pytest.raises(ConfigError):
        ZmqSettings(endpoints=())


async def test_bind_conflict_is_a_bus_error(v: ZmqServerBus) -> None:
    other = ZmqServerBus(ZmqServerSettings(bind=v.endpoint))
    with pytest.raises(BusError, match="cannot bind"):
        await other.connect()


def test_factory_binds_verifiers_and_connects_everyone_else() -> None:
    from middleware.broker_bridge.factory import make_bus
    from middleware.config import BusSection

    cfg = BusSection(
        transport="zmq", zmq_endpoints="tcp://v1:5555, tcp://v2:5556", zmq_bind="tcp://*:5557"
    )
    verifier_bus = make_bus(cfg, "mw-verifier-v1", will=V_WILL, serve=True)
    device_bus = make_bus(cfg, "mw-node-d", will=D_WILL, persistent=True)
    assert isinstance(verifier_bus, ZmqServerBus)
    assert (verifier_bus.settings.bind, verifier_bus.settings.will) == ("tcp://*:5557", V_WILL)
    assert isinstance(device_bus, ZmqBus)
    assert device_bus.settings.endpoints == ("tcp://v1:5555", "tcp://v2:5556")
    assert (device_bus.client_id, device_bus.settings.will) == ("mw-node-d", D_WILL)
