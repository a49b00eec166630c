"""Broker assignment of a sharded fleet: stable, balanced, minimal movement, failover order."""

from __future__ import annotations

import collections

import pytest

from middleware.broker_bridge.sharded import broker_order, device_endpoints, parse_endpoint
from middleware.errors import ConfigError

BROKERS = [("mq-1", 1883), ("mq-2", 1883), ("mq-3", 1883)]


def test_endpoints_parse_with_default_port_and_ipv6() -> None:
    assert parse_endpoint("mq-1:1884") == ("mq-1", 1884)
    assert parse_endpoint("mq-1") == ("mq-1", 1883)
    assert parse_endpoint("[::1]:1885") == ("::1", 1885)
    for bad in ("mq:0", "mq:x", ":1883", "[::1", "[::1]x"):
        with pytest.raises(ConfigError):
            parse_endpoint(bad)


def test_assignment_is_stable_and_independent_of_list_order() -> None:
    # Fixed figures: a process elsewhere (the device) must compute the same broker.
    assert broker_order("pi-1", BROKERS) == broker_order("pi-1", BROKERS)
    for did in ("pi-1", "jetson-7", "esp-42"):
        first = BROKERS[broker_order(did, BROKERS)[0]]
        assert BROKERS[::-1][broker_order(did, BROKERS[::-1])[0]] == first


def test_devices_spread_over_brokers_and_a_new_broker_moves_few() -> None:
    ids = [f"dev-{i}" for i in range(3000)]
    home = {d: BROKERS[broker_order(d, BROKERS)[0]] for d in ids}
    counts = collections.Counter(home.values())
    assert len(counts) == 3 and min(counts.values()) > 800  # ~1000 each
    more = [*BROKERS, ("mq-4", 1883)]
    moved = [d for d in ids if more[broker_order(d, more)[0]] != home[d]]
    # Rendezvous hashing: only devices that now rank mq-4 first move (~1/4), all to it.
    assert all(more[broker_order(d, more)[0]] == ("mq-4", 1883) for d in moved)
    assert 500 < len(moved) < 1000


def test_failover_broker_is_the_second_ranked_and_differs() -> None:
    for did in ("pi-1", "pi-2", "pi-3", "pi-4"):
        one = device_endpoints(did, BROKERS, failover=False)
        two = device_endpoints(did, BROKERS, failover=True)
        assert len(one) == 1 and len(two) == 2
        assert two[0] == one[0] and two[1] != two[0]


def test_make_bus_gives_devices_one_broker_and_everyone_else_all() -> None:
    from middleware.broker_bridge.factory import make_bus
    from middleware.broker_bridge.mqtt import MqttBus
    from middleware.broker_bridge.sharded import ShardedBus
    from middleware.config import BusSection

    cfg = BusSection(brokers=tuple(f"{h}:{p}" for h, p in BROKERS), failover=True)
    verifier = make_bus(cfg, "mw-verifier-v1")
    assert isinstance(verifier, ShardedBus)
    assert [c.settings.port for c in verifier.children] == [1883] * 3
    assert [c.settings.host for c in verifier.children] == ["mq-1", "mq-2", "mq-3"]
    device = make_bus(cfg, "mw-node-pi-1", persistent=True, device_id="pi-1")
    assert isinstance(device, MqttBus)
    home, second = device_endpoints("pi-1", BROKERS, failover=True)
    assert (device.settings.host, device.settings.port) == home
    assert device.settings.fallbacks == (second,)
    assert verifier.broker_of("pi-1") == BROKERS.index(home)
    single = make_bus(BusSection(), "x", device_id="pi-1")
    assert isinstance(single, MqttBus) and single.settings.fallbacks == ()
