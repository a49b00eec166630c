"""A ShardedBus over three real Mosquitto processes: fan-out, routing, one broker killed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from middleware.broker_bridge.factory import make_bus
from middleware.broker_bridge.mqtt import MqttBus, MqttSettings
from middleware.broker_bridge.sharded import ShardedBus, broker_order
from middleware.config import BusSection
from middleware.mosquitto import MosquittoProcess, mosquitto_available
from middleware.protocol import Topics

pytestmark = pytest.mark.integration


@pytest.fixture
def brokers() -> Iterator[list[MosquittoProcess]]:
    if not mosquitto_available():
        pytest.skip("no mosquitto binary")
    procs = [MosquittoProcess() for _ in range(3)]
    try:
        for p in procs:
            p.__enter__()
        yield procs
    finally:
        for p in procs:
            p.__exit__(None, None, None)


def one_device_per_broker(cfg: BusSection) -> list[str]:
    """Device ids whose hash-assigned brokers are 0, 1 and 2 of ``cfg.brokers``."""
    eps = [(b.split(":")[0], int(b.split(":")[1])) for b in cfg.brokers]
    found: dict[int, str] = {}
    for i in range(1000):
        found.setdefault(broker_order(f"dev-{i}", eps)[0], f"dev-{i}")
        if len(found) == 3:
            return [found[k] for k in range(3)]
    raise AssertionError("no spread")


async def test_fan_out_routing_and_a_killed_broker_affects_only_its_devices(
    brokers: list[MosquittoProcess], unique_prefix: str
) -> None:
    cfg = BusSection(
        prefix=unique_prefix, brokers=tuple(f"{b.host}:{b.port}" for b in brokers), failover=True
    )
    t = Topics(unique_prefix)
    dids = one_device_per_broker(cfg)
    verifier = make_bus(cfg, "verifier-1")
    assert isinstance(verifier, ShardedBus)
    devices = {d: make_bus(cfg, f"node-{d}", device_id=d, persistent=True) for d in dids}
    for d, bus in devices.items():
        assert isinstance(bus, MqttBus)
        assert bus.endpoint == (brokers[dids.index(d)].host, brokers[dids.index(d)].port)
    async with verifier:
        drafts = await verifier.subscribe(t.all_sessions("draft"))
        opens = await verifier.subscribe(t.shared_open())
        verdicts = {}
        for d, bus in devices.items():
            await bus.connect()
            verdicts[d] = await bus.subscribe(t.session(d, "s1", "verdict"))

        async def round_trip(d: str, n: int) -> None:
            await devices[d].publish(t.session(d, "s1", "draft"), f"{d}-{n}".encode())
            msg = await drafts.get(timeout=10)
            assert msg.topic == t.session(d, "s1", "draft") and msg.payload == f"{d}-{n}".encode()
            await verifier.publish(t.session(d, "s1", "verdict"), b"ok-" + msg.payload)
            answer = await verdicts[d].get(timeout=10)
            assert answer.payload == f"ok-{d}-{n}".encode()

        for d in dids:  # every broker carries its own devices, opens included
            await round_trip(d, 0)
            await devices[d].publish(t.session(d, "s1", "open"), b"open")
            assert (await opens.get(timeout=10)).topic == t.session(d, "s1", "open")

        # A topic that is no device's goes to every broker.
        watchers = [MqttBus(MqttSettings(host=b.host, port=b.port)) for b in brokers]
        for w in watchers:
            await w.connect()
        subs = [await w.subscribe(t.verifier_status("verifier-1")) for w in watchers]
        await verifier.publish(t.verifier_status("verifier-1"), b"online", retain=True)
        for s in subs:
            assert (await s.get(timeout=10)).payload == b"online"
        for w in watchers:
            await w.close()

        brokers[0].kill()
        lost = dids[0]
        await asyncio.sleep(0.5)
        for d in dids[1:]:  # the others do not notice
            await round_trip(d, 1)
        # The lost broker's device moves to its failover broker; the verifier learns it
        # from the device's next message and answers there.
        await devices[lost].wait_connected(30)
        assert devices[lost].endpoint != (brokers[0].host, brokers[0].port)
        await round_trip(lost, 2)
        assert verifier.broker_of(lost) != 0
        # A status (no device's topic) still goes out at once, to the brokers that are up.
        await asyncio.wait_for(verifier.publish(t.verifier_status("verifier-1"), b"up"), 5)
        # A publish to a device whose broker is down returns at once, counted.
        before = verifier.undelivered
        verifier._where.pop(lost)  # back to its hash-assigned (dead) broker
        await asyncio.wait_for(verifier.publish(t.session(lost, "s1", "verdict"), b"x"), 5)
        assert verifier.undelivered == before + 1
        for bus in devices.values():
            await bus.close()
