"""Build the configured transport for a role (verifier, device, tool): MQTT 5 or ZeroMQ."""

from __future__ import annotations

from middleware.broker_bridge.bus import Bus, Will
from middleware.config import BusSection
from middleware.errors import ConfigError


def make_bus(
    cfg: BusSection,
    client_id: str,
    *,
    will: Will | None = None,
    persistent: bool = False,
    serve: bool = False,
    connect_timeout: float = 10.0,
) -> Bus:
    """A not-yet-connected Bus for ``cfg``; ``persistent`` keeps the broker session while
    offline; ``serve`` (verifiers) binds ``zmq_bind`` instead of connecting to
    ``zmq_endpoints`` on the ZeroMQ transport (MQTT: ignored, everyone connects);
    ``connect_timeout`` (seconds) bounds the first connect (``mw-cli`` tools: their --timeout)."""
    if cfg.transport == "mqtt":
        from middleware.broker_bridge.mqtt import MqttBus, MqttSettings, TlsSettings

        tls = None
        if cfg.tls_ca or cfg.tls_cert:
            tls = TlsSettings(
                ca_file=cfg.tls_ca or None,
                cert_file=cfg.tls_cert or None,
                key_file=cfg.tls_key or None,
            )
        return MqttBus(
            MqttSettings(
                host=cfg.host,
                port=cfg.port,
                client_id=client_id,
                username=cfg.username or None,
                password=cfg.password or None,
                tls=tls,
                keepalive=cfg.keepalive,
                clean_start=not persistent,
                session_expiry=cfg.session_expiry if persistent else 0,
                will=will,
                connect_timeout=connect_timeout,
            )
        )
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
