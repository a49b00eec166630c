"""The ZeroMQ hub: the broker role for :class:`~middleware.broker_bridge.zmq.ZmqBus` clients.

One ROUTER socket bound on ``tcp://host:port``.  The hub keeps what an MQTT
broker keeps, so the middleware runs unchanged on a LAN with no broker:

* routing by topic filter with MQTT matching (``+``, ``#``, ``$`` topics),
  once per client however many of its filters match;
* ``$share/{group}/{filter}``: each message to one member of the group, round
  robin per (group, filter), like :class:`~middleware.broker_bridge.memory.InMemoryBroker`;
* retained messages (an empty retained payload deletes), sent with
  ``retain=True`` to each new subscription; live messages keep the retain flag
  they were published with (MQTT 5 "retain as published"), so a bridge can
  relay it;
* message expiry: a retained message is dropped when its expiry passes, and
  is delivered with the remaining expiry;
* last wills: a client that sends nothing (data or ``ping``) for
  ``heartbeat * liveness`` seconds is dead; its will goes out after the
  will's delay unless the same client id says ``hello`` again first.  A
  ``bye`` (clean close) discards the will.  Stopping the hub publishes no wills;
* acknowledgements: a QoS >= 1 ``pub`` is answered with ``puback`` once it
  has been routed, i.e. queued towards every subscriber (PUBACK semantics).
  Deliveries carry the publisher's QoS; the hub-to-client leg is not
  acknowledged (a client that dies loses what was queued towards it).

Flow control (the ZeroMQ guide's reliable patterns): sends to clients never
block the hub.  When a client's queue is at the high-water mark (``sndhwm``
messages, plus the kernel's socket buffers) the delivery is dropped and
counted per client (:meth:`ZmqHub.client_stats`) and in total
(:attr:`HubStats.dropped`).

Restart: clients notice the hub's silence (or get ``unknown`` from a new hub)
and reconnect and re-subscribe on their own.  Retained messages are lost with
the hub unless ``persist_path`` is set: then they are written there at most
``persist_interval`` seconds after a change (and on close) and loaded at start,
so a SIGKILL loses at most that interval.

Run in-process (``async with ZmqHub(HubSettings(port=0)) as hub``) or as a
service with :func:`serve_hub` (the ``mw-cli hub`` entry).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import msgpack
import structlog
import zmq

from middleware.broker_bridge import zmq_wire as w
from middleware.broker_bridge.bus import BusMessage, Will
from middleware.broker_bridge.zmq_pump import Pump
from middleware.errors import BusError, ConfigError, ProtocolError, TopicError
from middleware.protocol.topics import check_filter, check_topic, matches, strip_share

log = structlog.get_logger("middleware.zmq.hub")

DEFAULT_PORT = 5555
_MAX_CLIENT_ID = 256
_MAX_HEARTBEAT = 3600.0
_MAX_LIVENESS = 1000


@dataclass(frozen=True, slots=True)
class HubSettings:
    """How a :class:`ZmqHub` listens.  Durations in seconds."""

    host: str = "127.0.0.1"  # "0.0.0.0" or "*": every interface
    port: int = DEFAULT_PORT  # 0: a free port, read it from ZmqHub.port
    sndhwm: int = 10_000  # messages queued towards one client before deliveries drop
    rcvhwm: int = 10_000  # messages queued from all clients before the hub stops reading
    sweep_interval: float = 0.05  # how often dead clients and expired wills are looked for
    max_message_size: int = 16 << 20  # bytes per frame; a larger one disconnects its sender
    max_retained: int = 100_000  # retained topics kept; further new topics are not retained
    persist_path: str | None = None  # retained messages survive a restart when set
    persist_interval: float = 1.0
    bind_timeout: float = 5.0  # keep retrying a port still held by a hub that just closed

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("hub host is empty")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"hub port {self.port} out of range")
        if self.sndhwm < 1 or self.rcvhwm < 1:
            raise ConfigError("high-water marks must be >= 1")
        if self.sweep_interval <= 0 or self.persist_interval <= 0 or self.bind_timeout < 0:
            raise ConfigError("hub intervals must be positive")
        if self.max_message_size < 1024 or self.max_retained < 0:
            raise ConfigError("max_message_size must be >= 1024 and max_retained >= 0")


@dataclass(frozen=True, slots=True)
class HubStats:
    """Counters since the hub started."""

    clients: int
    retained: int
    published: int  # messages accepted for routing (wills included)
    delivered: int  # deliveries queued towards clients
    dropped: int  # deliveries dropped: the client's queue was at its high-water mark
    unroutable: int  # deliveries to a client whose connection had already gone
    malformed: int  # frames that were not valid protocol
    wills: int  # last wills published
    retained_refused: int  # retained messages not stored (max_retained reached)


@dataclass(slots=True)
class _Client:
    ident: bytes
    client_id: str
    heartbeat: float
    liveness: int
    will: Will | None
    last_seen: float
    filters: dict[str, int] = field(default_factory=dict)
    delivered: int = 0
    dropped: int = 0

    @property
    def deadline(self) -> float:
        return self.last_seen + self.heartbeat * self.liveness


@dataclass(slots=True)
class _Retained:
    fields: dict[str, Any]
    payload: bytes
    expires: float | None  # loop time


class ZmqHub:
    """The broker role for ZeroMQ clients; an async context manager (start/close)."""

    def __init__(self, settings: HubSettings | None = None) -> None:
        self.settings = settings or HubSettings()
        self.hub_id = uuid.uuid4().hex[:12]
        self.port = self.settings.port
        self._pump: Pump | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clients: dict[bytes, _Client] = {}
        self._by_id: dict[str, bytes] = {}
        self._exact: dict[str, dict[bytes, None]] = {}  # wildcard-free, unshared filter -> clients
        self._patterns: dict[bytes, list[str]] = {}  # wildcard or $share filters, per client
        self._rr: dict[tuple[str, str], itertools.count[int]] = {}
        self._retained: dict[str, _Retained] = {}
        self._pending_wills: dict[str, tuple[float, Will]] = {}  # client id -> (due, will)
        self._dirty = False
        self._counts = dict.fromkeys(
            (
                "published",
                "delivered",
                "dropped",
                "unroutable",
                "malformed",
                "wills",
                "retained_refused",
            ),
            0,
        )

    # --- lifecycle ------------------------------------------------------------
    @property
    def host(self) -> str:
        return self.settings.host

    @property
    def endpoint(self) -> str:
        """Where clients connect (``tcp://host:port``; a wildcard host reads as loopback)."""
        host = "127.0.0.1" if self.settings.host in ("*", "0.0.0.0") else self.settings.host
        return f"tcp://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> Self:
        """Bind the ROUTER socket and start serving in a background task."""
        if self._task is not None:
            raise BusError("hub already started")
        self._loop = asyncio.get_running_loop()
        self._load()
        self._pump = Pump(await self._bind(), self._on_frames, self._loop)
        self._task = self._loop.create_task(self._run(), name=f"zmq-hub[{self.port}]")
        log.info(
            "hub.started", endpoint=self.endpoint, hub=self.hub_id, retained=len(self._retained)
        )
        return self

    async def close(self) -> None:
        """Stop serving, persist the retained messages, close the socket (no wills are sent)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        pump, self._pump = self._pump, None
        if pump is not None:
            pump.close()
            self._save_now()
        self._pending_wills.clear()

    async def serve_forever(self) -> None:
        """Wait until the hub stops (it raises if its task failed)."""
        if self._task is None:
            raise BusError("hub not started")
        await self._task

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _bind(self) -> zmq.Socket[bytes]:
        s = self.settings
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full queue raises instead of dropping silently
        sock.setsockopt(zmq.SNDHWM, s.sndhwm)
        sock.setsockopt(zmq.RCVHWM, s.rcvhwm)
        sock.setsockopt(zmq.MAXMSGSIZE, s.max_message_size)
        sock.setsockopt(zmq.LINGER, 0)
        host = "*" if s.host == "0.0.0.0" else s.host
        deadline = time.monotonic() + s.bind_timeout
        while True:
            try:
                if s.port == 0:
                    sock.bind(f"tcp://{host}:*")
                else:
                    sock.bind(f"tcp://{host}:{s.port}")
                break
            except zmq.ZMQError as exc:
                # a hub closed a moment ago may still hold the port in libzmq's I/O thread
                if exc.errno == errno.EADDRINUSE and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                    continue
                sock.close(linger=0)
                raise BusError(f"hub cannot bind tcp://{host}:{s.port}: {exc}") from exc
        endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.port = int(endpoint.rsplit(":", 1)[1])
        return sock

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as tg:  # receiving is the pump's reader callback
            tg.create_task(self._sweep(), name="sweep")
            if self.settings.persist_path:
                tg.create_task(self._persist(), name="persist")

    # --- inspection -----------------------------------------------------------
    @property
    def stats(self) -> HubStats:
        return HubStats(clients=len(self._clients), retained=len(self._retained), **self._counts)

    @property
    def clients(self) -> list[str]:
        """Client ids of the live sessions."""
        return [c.client_id for c in self._clients.values()]

    def client_stats(self, client_id: str) -> dict[str, int]:
        """Deliveries queued and dropped (high-water mark) for one live client."""
        c = self._clients.get(self._by_id.get(client_id, b""))
        if c is None:
            raise KeyError(client_id)
        return {"delivered": c.delivered, "dropped": c.dropped}

    def retained(self) -> dict[str, BusMessage]:
        """The retained messages, by topic."""
        return {
            t: w.message_from(r.fields, r.payload)
            for t, r in self._retained.items()
            if not self._expired(r)
        }

    # --- receive ----------------------------------------------------------------
    def _on_frames(self, frames: list[bytes]) -> None:
        try:
            self._handle(frames)
        except ProtocolError as exc:
            self._counts["malformed"] += 1
            log.warning("hub.malformed", error=str(exc)[:200])

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            raise ProtocolError("frame without a header")
        ident, head = frames[0], w.unpack(frames[1])
        cmd = head["c"]
        if cmd == w.HELLO:
            self._hello(ident, head)
            return
        client = self._clients.get(ident)
        if client is None:
            if cmd != w.BYE:  # a new hub, or the client was declared dead: start over
                self._send(ident, [w.pack(w.UNKNOWN)])
            return
        client.last_seen = self._now()
        if cmd == w.PUB:
            self._on_publish(client, head, frames[2] if len(frames) > 2 else b"")
        elif cmd == w.PING:
            self._send(ident, [_PONG])
        elif cmd == w.SUB:
            self._on_subscribe(client, head)
        elif cmd == w.UNSUB:
            self._remove_filter(client, str(head.get("f", "")))
            self._send(ident, [w.pack(w.UNSUBACK, rid=head.get("rid"))])
        elif cmd == w.BYE:
            self._forget(client)
            log.info("hub.client_left", client=client.client_id)
        else:
            raise ProtocolError(f"unknown command {cmd!r:.40}")

    def _hello(self, ident: bytes, head: Mapping[str, Any]) -> None:
        cid = head.get("id")
        if not isinstance(cid, str) or not 0 < len(cid) <= _MAX_CLIENT_ID:
            raise ProtocolError("hello without a valid client id")
        if head.get("v") != w.VERSION:
            err = f"client {cid!r} speaks protocol {head.get('v')!r}, not {w.VERSION}"
            self._send(ident, [w.pack(w.WELCOME, hub=self.hub_id, v=w.VERSION, err=err)])
            raise ProtocolError(err)
        will = w.will_from_wire(head.get("will"))
        hb = w.positive(head, "hb", 1.0, _MAX_HEARTBEAT)
        live = int(w.positive(head, "live", 3, _MAX_LIVENESS))
        for old in (self._by_id.get(cid), ident):
            prev = self._clients.get(old) if old is not None else None
            if prev is not None:  # takeover: the same client reconnected, its will is void
                self._forget(prev)
        self._pending_wills.pop(cid, None)  # back before the will's delay passed
        client = _Client(ident, cid, hb, max(1, live), will, self._now())
        self._clients[ident] = client
        self._by_id[cid] = ident
        self._send(ident, [w.pack(w.WELCOME, hub=self.hub_id, v=w.VERSION)])
        log.info("hub.client_joined", client=cid, heartbeat=hb, will=will is not None)

    def _on_subscribe(self, client: _Client, head: Mapping[str, Any]) -> None:
        f, qos, rid = head.get("f"), head.get("q", 1), head.get("rid")
        try:
            if not isinstance(f, str):
                raise TopicError("subscription without a filter")
            check_filter(f)
        except TopicError as exc:
            self._send(client.ident, [w.pack(w.SUBACK, rid=rid, err=str(exc))])
            return
        self._add_filter(client, f, qos if qos in (0, 1, 2) else 1)
        self._send(client.ident, [w.pack(w.SUBACK, rid=rid)])
        if not f.startswith("$share/"):  # MQTT: shared subscriptions get no retained messages
            for topic, r in list(self._retained.items()):
                if matches(f, topic):
                    self._send_retained(client, topic, r)

    def _on_publish(self, client: _Client, head: Mapping[str, Any], payload: bytes) -> None:
        mid = head.get("m")
        try:
            msg = w.message_from(head, payload)
            check_topic(msg.topic)
        except (ProtocolError, TopicError) as exc:
            self._counts["malformed"] += 1
            if mid is not None:
                self._send(client.ident, [w.pack(w.PUBACK, m=mid, err=str(exc)[:200])])
            return
        self._publish(msg)
        if msg.qos >= 1 and mid is not None:
            self._send(client.ident, [w.pack(w.PUBACK, m=mid)])

    # --- routing ----------------------------------------------------------------
    def _publish(self, msg: BusMessage) -> None:
        self._counts["published"] += 1
        fields = w.message_fields(
            msg.topic,
            msg.qos,
            msg.retain,
            msg.content_type,
            msg.expiry,
            msg.user_properties,
            msg.correlation,
        )
        if msg.retain:
            self._store(msg.topic, fields, msg.payload, msg.expiry)
        frames = [w.pack(w.MSG, **fields), msg.payload]
        for client in self._recipients(msg.topic):
            self._deliver(client, frames)

    def _recipients(self, topic: str) -> list[_Client]:
        targets: dict[bytes, None] = dict(self._exact.get(topic, {}))
        groups: dict[tuple[str, str], list[bytes]] = {}
        for ident, filters in self._patterns.items():
            for f in filters:
                if not matches(f, topic):
                    continue
                if f.startswith("$share/"):
                    groups.setdefault((f.split("/", 2)[1], strip_share(f)), []).append(ident)
                else:
                    targets[ident] = None
        for key, members in groups.items():
            pick = members[next(self._rr.setdefault(key, itertools.count())) % len(members)]
            targets.setdefault(pick, None)  # a client gets one copy whatever matched
        return [self._clients[i] for i in targets if i in self._clients]

    def _deliver(self, client: _Client, frames: list[bytes]) -> None:
        if self._send(client.ident, frames, client):
            client.delivered += 1
            self._counts["delivered"] += 1

    def _send_retained(self, client: _Client, topic: str, r: _Retained) -> None:
        if self._expired(r):
            del self._retained[topic]
            self._dirty = True
            return
        fields = dict(r.fields, r=True)
        if r.expires is not None:
            fields["e"] = max(0.001, r.expires - self._now())
        self._deliver(client, [w.pack(w.MSG, **fields), r.payload])

    def _send(self, ident: bytes, frames: list[bytes], client: _Client | None = None) -> bool:
        """Queue frames towards a client without blocking; False (counted) if they were dropped."""
        try:
            if self._require_pump().send([ident, *frames]):
                return True
        except zmq.ZMQError:  # EHOSTUNREACH: its connection is gone; the sweep will bury it
            self._counts["unroutable"] += 1
            return False
        self._counts["dropped"] += 1  # its queue is at the high-water mark
        if client is not None:
            client.dropped += 1
        return False

    # --- subscriptions -------------------------------------------------------------
    def _add_filter(self, client: _Client, f: str, qos: int) -> None:
        if f in client.filters:
            client.filters[f] = qos
            return
        client.filters[f] = qos
        if f.startswith("$share/") or "+" in f or "#" in f:
            self._patterns.setdefault(client.ident, []).append(f)
        else:
            self._exact.setdefault(f, {})[client.ident] = None

    def _remove_filter(self, client: _Client, f: str) -> None:
        if client.filters.pop(f, None) is None:
            return
        pats = self._patterns.get(client.ident)
        if pats is not None and f in pats:
            pats.remove(f)
            if not pats:
                del self._patterns[client.ident]
        members = self._exact.get(f)
        if members is not None:
            members.pop(client.ident, None)
            if not members:
                del self._exact[f]

    def _forget(self, client: _Client) -> None:
        """Remove a client and its subscriptions (its will is handled by the caller)."""
        for f in list(client.filters):
            self._remove_filter(client, f)
        self._clients.pop(client.ident, None)
        if self._by_id.get(client.client_id) == client.ident:
            del self._by_id[client.client_id]

    # --- liveness and wills ---------------------------------------------------------
    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            now = self._now()
            for client in [c for c in self._clients.values() if c.deadline < now]:
                self._forget(client)
                log.warning(
                    "hub.client_dead",
                    client=client.client_id,
                    silent_s=round(now - client.last_seen, 3),
                    will=client.will is not None,
                )
                if client.will is not None:
                    self._pending_wills[client.client_id] = (now + client.will.delay, client.will)
            for cid, (due, will) in list(self._pending_wills.items()):
                if due <= now:
                    del self._pending_wills[cid]
                    self._counts["wills"] += 1
                    self._publish(BusMessage(will.topic, will.payload, will.qos, will.retain))

    # --- retained messages and persistence --------------------------------------------
    def _store(
        self, topic: str, fields: dict[str, Any], payload: bytes, expiry: float | None
    ) -> None:
        self._dirty = True
        if not payload:
            self._retained.pop(topic, None)
            return
        if topic not in self._retained and len(self._retained) >= self.settings.max_retained:
            self._counts["retained_refused"] += 1
            return
        expires = self._now() + expiry if expiry is not None else None
        self._retained[topic] = _Retained(fields, payload, expires)

    def _expired(self, r: _Retained) -> bool:
        return r.expires is not None and r.expires <= self._now()

    async def _persist(self) -> None:
        while True:
            await asyncio.sleep(self.settings.persist_interval)
            if self._dirty:
                self._dirty = False
                blob = self._snapshot()
                await asyncio.to_thread(_write_atomic, Path(self.settings.persist_path or ""), blob)

    def _snapshot(self) -> bytes:
        now, wall = self._now(), time.time()
        rows = [
            [r.fields, r.payload, None if r.expires is None else wall + r.expires - now]
            for r in self._retained.values()
            if not self._expired(r)
        ]
        return msgpack.packb(rows, use_bin_type=True)

    def _save_now(self) -> None:
        if self.settings.persist_path:
            _write_atomic(Path(self.settings.persist_path), self._snapshot())
            self._dirty = False

    def _load(self) -> None:
        path = self.settings.persist_path
        if not path or not os.path.exists(path):
            return
        try:
            rows = msgpack.unpackb(Path(path).read_bytes(), raw=False)
            now, wall = self._now(), time.time()
            for fields, payload, until in rows:
                msg = w.message_from(fields, payload)
                if until is None or until > wall:
                    expiry = None if until is None else until - wall
                    self._retained[msg.topic] = _Retained(
                        fields, payload, None if expiry is None else now + expiry
                    )
        except (OSError, ValueError, TypeError, ProtocolError, msgpack.UnpackException) as exc:
            log.error("hub.persist_unreadable", path=path, error=str(exc)[:200])

    # --- helpers --------------------------------------------------------------------------
    def _now(self) -> float:
        return self._loop.time() if self._loop is not None else time.monotonic()

    def _require_pump(self) -> Pump:
        if self._pump is None:
            raise BusError("hub is not running")
        return self._pump

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"ZmqHub({self.endpoint}, {state}, clients={len(self._clients)})"


_PONG = w.pack(w.PONG)


def _write_atomic(path: Path, blob: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)


async def serve_hub(
    host: str = "0.0.0.0",
    port: int = DEFAULT_PORT,
    *,
    settings: HubSettings | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    """Run a hub on ``host:port`` until cancelled (the ``mw-cli hub`` entry point).

    ``settings`` supplies everything else (high-water marks, persistence);
    ``ready`` is set once the socket is bound.
    """
    s = replace(settings or HubSettings(), host=host, port=port)
    async with ZmqHub(s) as hub:
        if ready is not None:
            ready.set()
        await hub.serve_forever()
