"""Shared fixtures: a real Mosquitto for integration tests, per-test topic prefixes, and
the real SmolLM2-135M model (loaded once per run, shared by tests/integration and tests/faults).

``mosquitto`` (session) is one broker for the whole run; ``fresh_mosquitto``
(function) is a private broker a test may kill and restart.  Both skip only
when there is neither a mosquitto binary nor a Docker engine, and fail instead
of skipping when ``CI`` or ``MW_REQUIRE_BROKER`` is set.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from middleware.broker_bridge.mqtt import MqttSettings
from middleware.mosquitto import Broker, MosquittoProcess, mosquitto_available
from tests.brokers import MosquittoContainer, docker_available


def _new_broker() -> Broker:
    if mosquitto_available():
        return MosquittoProcess()
    if docker_available():
        return MosquittoContainer()
    reason = (
        "no mosquitto binary (PATH, /usr/sbin) and no reachable Docker engine: "
        "install it with `apt-get install -y mosquitto` or `bash scripts/run.sh install`"
    )
    if os.environ.get("CI") or os.environ.get("MW_REQUIRE_BROKER"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[Broker]:
    """One Mosquitto for the whole session, on a free loopback port.  Do not kill it."""
    broker = _new_broker()
    with broker:
        yield broker


@pytest.fixture
def fresh_mosquitto() -> Iterator[Broker]:
    """A private Mosquitto for one test: it may ``kill()``, ``stop()`` and ``restart()`` it."""
    broker = _new_broker()
    with broker:
        yield broker


@pytest.fixture
def unique_prefix() -> str:
    """A topic prefix no other test uses, e.g. ``mw/test-1a2b3c4d``."""
    return f"mw/test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def mqtt_settings(mosquitto: Broker) -> Callable[..., MqttSettings]:
    """Factory: ``mqtt_settings(client_id="x", clean_start=False, ...)`` for the session broker."""

    def make(**overrides: Any) -> MqttSettings:
        base: dict[str, Any] = {
            "host": mosquitto.host,
            "port": mosquitto.port,
            "connect_timeout": 10.0,
            "request_timeout": 10.0,
        }
        base.update(overrides)
        return MqttSettings(**base)

    return make


@pytest.fixture(scope="session")
def smollm2() -> Any:
    """The real SmolLM2-135M target, loaded once per test session."""
    from middleware.models.loading import load_causal_lm

    return load_causal_lm("smollm2")


@pytest.fixture(scope="session")
def quant4(smollm2: Any) -> Any:
    """A 4-bit copy of SmolLM2 (made once): a realistic, imperfect drafter."""
    from middleware.nodes.drafters.quantized import quantize_model

    return quantize_model(smollm2.model, 4)
