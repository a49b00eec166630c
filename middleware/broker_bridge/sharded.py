"""Fleets past one broker: :class:`ShardedBus`, one :class:`Bus` over N MQTT brokers.

Why: one Mosquitto is a single point of failure and a ceiling (one process, one
thread; in ``bench.verifier_overhead`` a raw paho echo through one Mosquitto
reached 1,100-2,800 drafts/s, two QoS 1 messages each, on this loaded 2-core
machine).  Mosquitto has no clustering, so a larger fleet is split: each device is
assigned to one of N independent brokers and every verifier is a client of all
of them.

* **Assignment** is rendezvous (highest-random-weight) hashing of the device id
  over the broker list (:func:`broker_order`): stable across processes and
  restarts, and adding a broker moves only about 1/(N+1) of the devices.  A
  device's second-ranked broker is its failover broker (``[bus] failover``).
* **Subscriptions fan out**: every filter (the shared ``$share/mw-verifiers/...``
  open subscription included) is subscribed on every broker, so each broker's
  shared subscription load-balances that broker's opens over all verifiers.
* **Publishes route**: a topic under ``session/{did}/...`` or ``device/{did}/...``
  goes to the broker that device was last heard on (learned from every incoming
  message that is not retained, so a device that failed over is answered where it
  is now), else to its hash-assigned broker.  Anything else (verifier status, Home Assistant
  discovery) goes to every broker.
* **Losing a broker affects only its devices**: the other connections are
  independent :class:`MqttBus` clients with their own reconnect supervisors.  A
  publish routed to a broker that is down is dropped and counted (``undelivered``)
  instead of waiting for it: the protocol heals a lost verdict by the device's
  resend, and the device resends on its failover broker if it has one.
  Subscribing never waits for a broker that is down; it is subscribed when it
  comes back (the MqttBus re-subscribes every open filter after a reconnect).

``VerifierService`` and the tools see one :class:`Bus`; nothing above changes.
The first ``connect()`` needs every broker (a misconfigured list fails at start,
not silently); later losses are survived.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable, Sequence

import structlog

from middleware.broker_bridge.bus import Bus, BusMessage, Subscription
from middleware.broker_bridge.mqtt import MqttBus
from middleware.errors import BusError, ConfigError
from middleware.protocol.topics import check_filter, check_topic

log = structlog.get_logger("middleware.sharded")

Endpoint = tuple[str, int]


def parse_endpoint(spec: str, default_port: int = 1883) -> Endpoint:
    """``host:port``, ``host`` or ``[v6addr]:port`` as (host, port); ConfigError if malformed."""
    spec = spec.strip()
    host, port = spec, default_port
    if spec.startswith("["):
        end = spec.find("]")
        if end < 0:
            raise ConfigError(f"malformed broker address {spec!r}")
        host, rest = spec[1:end], spec[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"malformed broker address {spec!r}")
            port = _port(rest[1:], spec)
    elif spec.count(":") == 1:
        host, _, p = spec.partition(":")
        port = _port(p, spec)
    if not host:
        raise ConfigError(f"broker address {spec!r} has no host")
    return host, port


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigError(f"broker address {spec!r}: port must be 1-65535")
    return int(text)


def broker_order(device_id: str, brokers: Sequence[Endpoint]) -> list[int]:
    """Indices of ``brokers`` in the device's preference order (rendezvous hashing).

    The first is the device's broker, the second its failover broker.  The score
    of (device, broker) is a keyed BLAKE2b of both, so it is the same in every
    process (unlike ``hash()``) and independent of the list's order.
    """
    key = device_id.encode()

    def score(i: int) -> bytes:
        host, port = brokers[i]
        return hashlib.blake2b(f"{host}:{port}".encode(), key=key[:64], digest_size=8).digest()

    return sorted(range(len(brokers)), key=score, reverse=True)


class _Forward(Subscription):
    """The one subscription a ShardedBus holds on each broker: it carries every filter
    (so the MqttBus re-subscribes them after a reconnect) and hands each message to
    the ShardedBus instead of queueing it."""

    def __init__(self, index: int, sink: Callable[[int, BusMessage], None]) -> None:
        super().__init__("", 1, 1, _no_close)
        self._index = index
        self._sink = sink

    def matches(self, topic: str) -> bool:
        return True  # the broker only sends what some filter of ours matched

    def put_nowait(self, msg: BusMessage) -> None:
        self._sink(self._index, msg)

    def set_filters(self, filters: list[str], qos: int) -> None:
        self._extra = filters
        self.qos = qos


async def _no_close(sub: Subscription) -> None:
    return None


class ShardedBus(Bus):
    """One :class:`Bus` over several brokers (see the module docstring).

    ``children`` are not-yet-connected buses, one per broker, in the order of
    ``brokers`` (the hash assignment uses that list).  ``publish_timeout`` bounds a
    routed publish on a broker that drops while it waits for the PUBACK (seconds);
    the message is then counted in ``undelivered`` and the call returns.
    """

    def __init__(
        self,
        children: Sequence[MqttBus],
        brokers: Sequence[Endpoint],
        prefix: str,
        *,
        publish_timeout: float = 2.0,
        subscribe_timeout: float = 5.0,
    ) -> None:
        super().__init__()
        if not children or len(children) != len(brokers):
            raise ConfigError("ShardedBus needs one bus per broker")
        self.children = list(children)
        self.brokers = list(brokers)
        self.publish_timeout = publish_timeout
        self.subscribe_timeout = subscribe_timeout
        self.undelivered = 0  # routed publishes dropped: their broker was down
        self._head = prefix + "/"
        self._where: dict[str, int] = {}  # device id -> broker it was last heard on
        self._home: dict[str, int] = {}  # device id -> hash-assigned broker (cache)
        self._forward = [_Forward(i, self._from_child) for i in range(len(children))]
        self._filters: dict[str, int] = {}  # filter -> qos, over all our subscriptions

    # --- lifecycle ------------------------------------------------------------------
    async def connect(self) -> None:
        self._check_open()
        for child, fwd in zip(self.children, self._forward, strict=True):
            child._subs.append(fwd)  # before connecting: subscribed with the CONNECT
            child._routes.clear()
        try:
            async with asyncio.TaskGroup() as tg:
                for child in self.children:
                    tg.create_task(child.connect())
        except BaseExceptionGroup as eg:  # not except*: device code parses on Python 3.10
            await self._close_children()
            first = next((e for e in eg.exceptions if isinstance(e, BusError)), None)
            if first is not None:
                raise BusError(f"sharded bus: {first}") from first
            raise
        except BaseException:
            await self._close_children()
            raise

    async def _disconnect(self) -> None:
        await self._close_children()

    async def _close_children(self) -> None:
        for child in self.children:
            with contextlib.suppress(Exception):
                await child.close()

    @property
    def is_connected(self) -> bool:
        """True while every broker is connected."""
        return all(c.is_connected for c in self.children)

    def broker_of(self, device_id: str) -> int:
        """The broker a publish for ``device_id`` goes to: where it was last heard, else
        its hash-assigned one."""
        i = self._where.get(device_id)
        if i is not None:
            return i
        i = self._home.get(device_id)
        if i is None:
            i = self._home[device_id] = broker_order(device_id, self.brokers)[0]
        return i

    # --- data path ------------------------------------------------------------------
    def _device_of(self, topic: str) -> str | None:
        """``{did}`` of ``{prefix}/session/{did}/...`` and ``{prefix}/device/{did}/...``."""
        if not topic.startswith(self._head):
            return None
        parts = topic[len(self._head) :].split("/", 2)
        if len(parts) == 3 and parts[0] in ("session", "device"):
            return parts[1]
        return None

    def _from_child(self, index: int, msg: BusMessage) -> None:
        # Learned from live messages only: a retained one (a device's old status on a broker
        # that came back) says where the device was, not where it is.
        did = None if msg.retain else self._device_of(msg.topic)
        if did is not None and self._where.get(did) != index:
            if did in self._where:
                log.info("sharded.device_moved", device_id=did, broker=self._name(index))
            self._where[did] = index
        self._dispatch(msg)

    async def _carry(self, msg: BusMessage, timeout: float | None = None) -> None:
        """To the device's broker for its topics (dropped and counted when that broker is
        down), to every broker that is up otherwise (BusError only if none took it)."""
        self._check_open()
        check_topic(msg.topic)
        did = self._device_of(msg.topic)
        if did is not None:
            child = self.children[self.broker_of(did)]
            if not child.is_connected:
                self._undelivered(msg.topic, child, "broker down")
                return
            try:
                await child._carry(msg, self.publish_timeout)
            except BusError as exc:
                if self._closed:
                    raise
                self._undelivered(msg.topic, child, str(exc))
            return
        # To the brokers that are up (one that is down gets the next status publish; the
        # verifier republishes its status every few seconds); with none up, wait like a
        # single bus would.
        targets = [c for c in self.children if c.is_connected] or self.children
        results = await asyncio.gather(
            *(c._carry(msg, timeout) for c in targets), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        for r in errors:
            if not isinstance(r, BusError):
                raise r
        if len(errors) == len(results):
            raise errors[0]

    def _undelivered(self, topic: str, child: MqttBus, why: str) -> None:
        self.undelivered += 1
        log.warning(
            "sharded.undelivered",
            topic=topic,
            broker=self._name(self.children.index(child)),
            reason=why,
        )

    def _name(self, index: int) -> str:
        host, port = self.brokers[index]
        return f"{host}:{port}"

    async def _subscribe(self, filter_: str, qos: int) -> None:
        check_filter(filter_)
        self._filters[filter_] = max(qos, self._filters.get(filter_, 0))
        self._sync_filters()
        await self._each_connected(lambda c: c._subscribe(filter_, self._filters[filter_]))

    async def _unsubscribe(self, filter_: str) -> None:
        self._filters.pop(filter_, None)
        self._sync_filters()
        await self._each_connected(lambda c: c._unsubscribe(filter_))

    def _sync_filters(self) -> None:
        qos = max(self._filters.values(), default=1)
        for fwd in self._forward:
            fwd.set_filters(list(self._filters), qos)

    async def _each_connected(self, op: Callable[[MqttBus], object]) -> None:
        """Run ``op`` on every connected broker at once; a broker that is down (or drops
        meanwhile) gets the filter from its re-subscribe after the reconnect."""
        live = [c for c in self.children if c.is_connected]
        results = await asyncio.gather(
            *(asyncio.wait_for(op(c), self.subscribe_timeout) for c in live),  # type: ignore[arg-type]
            return_exceptions=True,
        )
        for child, r in zip(live, results, strict=True):
            if isinstance(r, BusError | TimeoutError):
                log.warning("sharded.subscribe_deferred", broker=repr(child), error=str(r))
            elif isinstance(r, BaseException):
                raise r


def device_endpoints(device_id: str, brokers: Sequence[Endpoint], failover: bool) -> list[Endpoint]:
    """The brokers a device connects to, in order: its own, then (``failover``) the next."""
    order = broker_order(device_id, brokers)
    return [brokers[i] for i in order[: 2 if failover else 1]]
