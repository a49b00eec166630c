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
    serve: bool = False,
    connect_timeout: float = 10.0,
    device_id: str | None = None,
) -> Bus:
    """A not-yet-connected Bus for ``cfg``; ``persistent`` keeps the broker session while
    offline; ``serve`` (verifiers) binds ``zmq_bind`` instead of connecting to
    ``zmq_endpoints`` on the ZeroMQ transport (MQTT: ignored, everyone connects);
    ``connect_timeout`` (seconds) bounds the first connect (``mw-cli`` tools: their --timeout).

    With ``[bus] brokers`` (a sharded fleet) a device (``device_id`` given) gets one
    connection to the broker its id hashes to, then its failover broker with
    ``[bus] failover``; verifiers and tools get a
    :class:`~middleware.broker_bridge.sharded.ShardedBus` over every broker.
    """
    if cfg.transport == "mqtt":
        from middleware.broker_bridge.mqtt import MqttBus

        def settings(host: str, port: int, rest: tuple[tuple[str, int], ...] = ()) -> MqttSettings:
            return _mqtt_settings(
                cfg, host, port, client_id, will, persistent, rest, connect_timeout
            )

        if not cfg.brokers:
            return MqttBus(settings(cfg.host, cfg.port))
        from middleware.broker_bridge.sharded import ShardedBus, device_endpoints, parse_endpoint

        brokers = [parse_endpoint(b) for b in cfg.brokers]
        if device_id is not None:
            (host, port), *rest = device_endpoints(device_id, brokers, cfg.failover)
            return MqttBus(settings(host, port, tuple(rest)))
        children = [MqttBus(settings(host, port)) for host, port in brokers]
        return ShardedBus(children, brokers, cfg.prefix)
    if cfg.transport == "zmq":
        from middleware.broker_bridge import zmq as z

        if serve:
            return z.ZmqServerBus(
                z.ZmqServerSettings(bind=cfg.zmq_bind, server_id=client_id, will=will)
            )
        endpoints = tuple(e.strip() for e in cfg.zmq_endpoints.split(","))
        return z.ZmqBus(
            z.ZmqSettings(
                endpoints=endpoints,
                client_id=client_id,
                will=will,
                connect_timeout=connect_timeout,
            )
        )
    raise ConfigError(f"unknown transport {cfg.transport!r} (expected 'mqtt' or 'zmq')")


def _mqtt_settings(
    cfg: BusSection,
    host: str,
    port: int,
    client_id: str,
    will: Will | None,
    persistent: bool,
    fallbacks: tuple[tuple[str, int], ...] = (),
    connect_timeout: float = 10.0,
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
        connect_timeout=connect_timeout,
    )
