"""The MQTT-to-ZeroMQ bridge: relays topic subtrees between two buses, both ways.

Devices on Mosquitto and verifiers on ZeroMQ then form one system.  The
bridge's ZeroMQ side is a device-like DEALER (:class:`ZmqBus`) connected to the
verifiers' endpoints, one at a time with failover::

    async with MqttBus(mqtt_settings) as m, ZmqBus(zmq_settings) as z:
        async with Bridge(m, z, prefix="mw/v1"):
            ...   # MQTT -> the verifier; what the verifier publishes -> MQTT

What is kept: topic, payload, QoS (as delivered to the bridge, at most the
subscription's QoS 1), content type, remaining expiry, user properties,
correlation data and the retain flag (see "retain" below).

Loop prevention: every relayed message carries the user property
``mw-bridge``, the comma-separated ids of the bridges it passed.  A bridge
never relays a message whose list holds its own id, so its own relays coming
back (each side echoes them to the bridge's subscription) stop there, and
any topology of bridges, cycles included, cannot loop.

``$share`` groups: on MQTT the broker shares; on ZeroMQ the bridge's one
connection reaches one verifier, which owns every session relayed through it
(a bridge per verifier group, or verifiers on MQTT, spread the load).  The
bridge's subscription on the ZeroMQ side is also a state request: the verifier
answers with its latest retained state, which the bridge relays retained, so
the MQTT broker's store is filled after a bridge or verifier restart.

Retain: a ZeroMQ verifier delivers messages with the retain flag they were
published with, but an MQTT broker clears it on live delivery (MQTT 5 "retain
as published" is off in :class:`MqttBus`), so on the MQTT side only messages
sent from the broker's store at (re)subscription arrive marked.  Topics that
the protocol always publishes retained (session ``state``/``result``, device
and verifier ``status``, see ``retained_filters``) are therefore relayed
retained whatever the flag says.

Delivery guarantee, per direction: messages are relayed one at a time in
arrival order; each relay publish (QoS >= 1) returns only after the other
side acknowledged it (the verifier's ``puback`` or MQTT PUBACK), and the bridge moves on
to the next message only then, so order is kept.  A relay that fails while
the other side is disconnected is retried with backoff for as long as the
outage lasts; one that fails ``max_attempts`` times while it is connected
(refused, too large for the broker) is logged, counted in ``failed`` and
skipped.  The source side, however, acknowledges a message as soon as it is
queued on the bridge's subscription (paho acknowledges when the message
callback returns; a ZeroMQ verifier needs no acknowledgement from receivers).  Hence:
while the bridge process lives, every message it received is relayed at least
once (duplicates are possible after a timeout), across restarts of either
side; what sits in its queue (at most ``maxsize`` per direction, the oldest
dropped and counted beyond that) is lost if the bridge process dies.  Closing
that window needs manual acknowledgement in the source bus (acknowledge after
the relay's ack).  What is published on a side while the bridge is not
connected to it reaches the bridge only if that side queues it: give the
bridge's MqttBus a persistent session (``clean_start=False``); on the ZeroMQ
side the verifier's state request answers for what was retained.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import structlog

from middleware.broker_bridge._aio import backoff
from middleware.broker_bridge.bus import Bus, BusMessage, Subscription
from middleware.errors import BusClosedError, BusError, ConfigError, TopicError
from middleware.protocol.topics import DEFAULT_PREFIX, Topics, matches

log = structlog.get_logger("middleware.bridge")

MARK = "mw-bridge"
MAX_HOPS = 16


def retained_filters(prefix: str = DEFAULT_PREFIX) -> tuple[str, ...]:
    """Filters of the topics the protocol always publishes retained."""
    t = Topics(prefix)
    return (
        t.all_sessions("state"),
        t.all_sessions("result"),
        t.all_device_status(),
        t.all_verifier_status(),
    )


@dataclass(slots=True)
class DirectionStats:
    """Counters of one direction."""

    relayed: int = 0  # messages taken by the other side
    echoes: int = 0  # our own relays seen again: not relayed back
    retries: int = 0  # relay publishes that failed and were tried again
    failed: int = 0  # messages the other side refused for good: logged and skipped
    dropped: int = 0  # overflow of the bridge's subscription queue


class Bridge:
    """Relays ``filters`` between ``mqtt_bus`` and ``zmq_bus`` in both directions.

    The buses are the caller's (connected before, closed after); the bridge
    owns its subscriptions and one task (``bridge[<id>]``) with two named
    relay loops.  Either bus may reconnect at any time.
    """

    def __init__(
        self,
        mqtt_bus: Bus,
        zmq_bus: Bus,
        filters: Sequence[str] | None = None,
        prefix: str = DEFAULT_PREFIX,
        *,
        bridge_id: str | None = None,
        retain: Sequence[str] | None = None,
        maxsize: int = 10_000,
        retry_min: float = 0.05,
        retry_max: float = 2.0,
        max_attempts: int = 5,
    ) -> None:
        self.mqtt_bus = mqtt_bus
        self.zmq_bus = zmq_bus
        self.prefix = prefix
        self.filters = tuple(filters) if filters is not None else (Topics(prefix).everything(),)
        self.bridge_id = bridge_id or f"bridge-{uuid.uuid4().hex[:8]}"
        self.retain_filters = tuple(retain) if retain is not None else retained_filters(prefix)
        self.to_zmq = DirectionStats()
        self.to_mqtt = DirectionStats()
        self._maxsize = maxsize
        self.max_attempts = max_attempts
        self._retry = (retry_min, retry_max)
        self._subs: list[Subscription] = []
        self._task: asyncio.Task[None] | None = None
        if not self.filters or any(f.startswith("$share/") or not f for f in self.filters):
            raise ConfigError("bridge filters must be plain, non-empty topic filters")
        if "," in self.bridge_id or not self.bridge_id:
            raise ConfigError(f"bridge id {self.bridge_id!r} must be non-empty without commas")
        if not 0 < retry_min <= retry_max:
            raise ConfigError("need 0 < retry_min <= retry_max")

    # --- lifecycle --------------------------------------------------------------
    async def start(self) -> Self:
        """Subscribe on both sides (nothing published afterwards is missed), start relaying."""
        if self._task is not None:
            raise BusError(f"{self.bridge_id} already started")
        try:
            from_mqtt = await self._open(self.mqtt_bus)
            from_zmq = await self._open(self.zmq_bus)
        except BaseException:
            await self._close_subs()
            raise
        self._task = asyncio.get_running_loop().create_task(
            self._run(from_mqtt, from_zmq), name=f"bridge[{self.bridge_id}]"
        )
        log.info("bridge.started", bridge=self.bridge_id, filters=list(self.filters))
        return self

    async def close(self) -> None:
        """Stop relaying and close the bridge's subscriptions (the buses stay open)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._close_subs()

    async def wait(self) -> None:
        """Wait until both relay loops have ended (their buses closed); raises what failed."""
        if self._task is not None:
            await self._task

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _open(self, bus: Bus) -> Subscription:
        sub = await bus.subscribe(self.filters[0], qos=1, maxsize=self._maxsize)
        self._subs.append(sub)
        for f in self.filters[1:]:
            await sub.add(f)
        return sub

    async def _close_subs(self) -> None:
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(BusError):
                await sub.close()

    async def _run(self, from_mqtt: Subscription, from_zmq: Subscription) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._relay(from_mqtt, self.zmq_bus, self.to_zmq), name="mqtt->zmq")
            tg.create_task(self._relay(from_zmq, self.mqtt_bus, self.to_mqtt), name="zmq->mqtt")

    # --- relaying ------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, dict[str, int]]:
        """Counters per direction (``to_zmq``, ``to_mqtt``)."""
        out = {}
        for name, st, sub in (("to_zmq", self.to_zmq, 0), ("to_mqtt", self.to_mqtt, 1)):
            if len(self._subs) > sub:
                st.dropped = self._subs[sub].dropped
            out[name] = {
                "relayed": st.relayed,
                "echoes": st.echoes,
                "retries": st.retries,
                "failed": st.failed,
                "dropped": st.dropped,
            }
        return out

    async def _relay(self, source: Subscription, dest: Bus, stats: DirectionStats) -> None:
        async for msg in source:
            hops = msg.user_properties.get(MARK, "")
            path = hops.split(",") if hops else []
            if self.bridge_id in path or len(path) >= MAX_HOPS:
                stats.echoes += 1
                continue
            try:
                taken = await self._forward(msg, dest, ",".join([*path, self.bridge_id]), stats)
            except BusClosedError:
                return  # the owner closed that bus: nothing more can be relayed
            if taken:
                stats.relayed += 1
            else:
                stats.failed += 1

    async def _forward(self, msg: BusMessage, dest: Bus, hops: str, stats: DirectionStats) -> bool:
        """Publish on ``dest`` until it is acknowledged (True) or refused for good (False).

        Failures while ``dest`` is disconnected are retried for as long as it
        takes; a message that fails ``max_attempts`` times while ``dest`` is
        connected (refused, too large for the broker) is logged and skipped,
        so one bad message cannot stall its direction.  BusClosedError ends it.
        """
        props = dict(msg.user_properties)
        props[MARK] = hops
        retain = msg.retain or any(matches(f, msg.topic) for f in self.retain_filters)
        delay = self._retry[0]
        attempts = 0
        while True:
            try:
                await dest.publish(
                    msg.topic,
                    msg.payload,
                    qos=msg.qos,
                    retain=retain,
                    content_type=msg.content_type,
                    expiry=msg.expiry,
                    user_properties=props,
                    correlation=msg.correlation,
                )
                return True
            except BusClosedError:
                raise
            except (BusError, TopicError) as exc:
                up = bool(getattr(dest, "is_connected", True))
                attempts += 1 if up else 0
                if isinstance(exc, TopicError) or attempts >= self.max_attempts:
                    log.error(
                        "bridge.relay_failed",
                        bridge=self.bridge_id,
                        topic=msg.topic,
                        error=str(exc),
                        attempts=attempts,
                    )
                    return False
                stats.retries += 1
                log.warning(
                    "bridge.relay_retry",
                    bridge=self.bridge_id,
                    topic=msg.topic,
                    error=str(exc),
                    dest_connected=up,
                    retry_in=round(delay, 3),
                )
                delay = await backoff(delay, self._retry[1])

    def __repr__(self) -> str:
        return f"Bridge({self.bridge_id}, {list(self.filters)})"
