"""Build the configured transport for a role (verifier, device, tool): MQTT 5 or ZeroMQ."""

from __future__ import annotations

from typing import TYPE_CHECKING

from middleware.broker_bridge.bus import Bus, Will
from middleware.config import BusSection
from middleware.errors import ConfigError

if TYPE_CHECKING:
    from middleware.broker_bridge.mqtt import MqttSettings


def make_bus(
    cfg: BusSection,
    client_id: str,
    *,
    will: Will | None = None,
    persistent: bool = False,
    device_id: str | None = None,
) -> Bus:
    """A not-yet-connected Bus for ``cfg``; ``persistent`` keeps the broker session while offline.

    With ``[bus] brokers`` (a sharded fleet) a device (``device_id`` given) gets one
    connection to the broker its id hashes to, then its failover broker with
    ``[bus] failover``; verifiers and tools get a
    :class:`~middleware.broker_bridge.sharded.ShardedBus` over every broker.
    """
    if cfg.transport == "mqtt":
        from middleware.broker_bridge.mqtt import MqttBus

        if not cfg.brokers:
            return MqttBus(_mqtt_settings(cfg, cfg.host, cfg.port, client_id, will, persistent))
        from middleware.broker_bridge.sharded import ShardedBus, device_endpoints, parse_endpoint

        brokers = [parse_endpoint(b) for b in cfg.brokers]
        if device_id is not None:
            (host, port), *rest = device_endpoints(device_id, brokers, cfg.failover)
            s = _mqtt_settings(cfg, host, port, client_id, will, persistent, tuple(rest))
            return MqttBus(s)
        children = [
            MqttBus(_mqtt_settings(cfg, host, port, client_id, will, persistent))
            for host, port in brokers
        ]
        return ShardedBus(children, brokers, cfg.prefix)
    if cfg.transport == "zmq":
        from middleware.broker_bridge.zmq import ZmqBus, ZmqSettings

        return ZmqBus(ZmqSettings(host=cfg.host, port=cfg.port, client_id=client_id, will=will))
    raise ConfigError(f"unknown transport {cfg.transport!r} (expected 'mqtt' or 'zmq')")


def _mqtt_settings(
    cfg: BusSection,
    host: str,
    port: int,
    client_id: str,
    will: Will | None,
    persistent: bool,
    fallbacks: tuple[tuple[str, int], ...] = (),
) -> MqttSettings:
    from middleware.broker_bridge.mqtt import MqttSettings, TlsSettings

    tls = None
    if cfg.tls_ca or cfg.tls_cert:
        tls = TlsSettings(
            ca_file=cfg.tls_ca or None,
            cert_file=cfg.tls_cert or None,
            key_file=cfg.tls_key or None,
        )
    return MqttSettings(
        host=host,
        port=port,
        client_id=client_id,
        username=cfg.username or None,
        password=cfg.password or None,
        tls=tls,
        keepalive=cfg.keepalive,
        clean_start=not persistent,
        session_expiry=cfg.session_expiry if persistent else 0,
        will=will,
        fallbacks=fallbacks,
    )
