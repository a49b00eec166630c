"""ZeroMQ transport: :class:`ZmqBus`, a :class:`Bus` talking to a :class:`ZmqHub`, no broker.

A verifier and devices on a LAN connect DEALER sockets to one hub (a ROUTER,
:mod:`middleware.broker_bridge.zmq_hub`) that plays the broker's role:
topic-filter routing with MQTT matching, ``$share`` round robin, retained
messages and last wills.  The middleware therefore runs unchanged on either
transport::

    async with ZmqHub(HubSettings(port=5555)):            # or `mw-cli hub`
        async with ZmqBus(ZmqSettings(port=5555, will=will)) as bus:
            async with bus.subscribe(topics.all_sessions("draft")) as sub: ...

Reliability, after the ZeroMQ guide's reliable patterns (Paranoid Pirate):

* **acks**: a QoS >= 1 publish returns once the hub has routed the message
  (its ``puback``), like an MQTT PUBACK.  If the connection drops first, the
  publish is sent again on the next connection, so delivery is at-least-once,
  also for a publish that raised :class:`BusError` on timeout.  QoS 2 is
  treated as QoS 1.  QoS 0 is fire-and-forget.
* **heartbeats both ways**: the client sends ``ping`` every ``heartbeat``
  seconds and the hub answers; each side counts any frame as a sign of life.
  A hub silent for ``heartbeat * liveness`` seconds is given up: the socket is
  closed and a new one says ``hello`` and re-subscribes every filter of every
  open subscription.  A restarted hub that does not know the client answers
  ``unknown``, which triggers the same at once.  The hub buries a client
  silent for that long and publishes its will.
* **bounded queues**: ``sndhwm``/``rcvhwm`` bound the socket queues.  A QoS 0
  publish that finds the send queue full is dropped and counted in
  :attr:`ZmqBus.send_drops`; QoS >= 1 waits for room (bounded by its
  timeout).  The hub counts what it drops per client; subscriptions count
  their own overflow (:attr:`Bus.dropped`).
* Messages keep topic, QoS, retain flag (as published), content type, expiry,
  user properties and correlation data (msgpack header, payload frame as is).

The hub keeps no sessions (like MQTT with a clean start): a client's
subscriptions exist while it is connected, and what is published while it
reconnects is not queued for it; the session protocol heals such losses by
retry.  After a hub restart retained messages are gone unless the hub
persists them (``HubSettings.persist_path``); the services republish their
retained state and status on their next round or status tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
import zmq

from middleware.broker_bridge import zmq_wire as w
from middleware.broker_bridge._aio import Wakeup
from middleware.broker_bridge._aio import backoff as _backoff
from middleware.broker_bridge._aio import cancel_and_wait as _cancel
from middleware.broker_bridge.bus import Bus, Will
from middleware.broker_bridge.zmq_hub import DEFAULT_PORT, HubSettings, HubStats, ZmqHub, serve_hub
from middleware.broker_bridge.zmq_pump import Pump
from middleware.errors import BusClosedError, BusError, ConfigError, ProtocolError, TopicError
from middleware.protocol.topics import check_filter, check_topic

__all__ = [
    "DEFAULT_PORT",
    "HubSettings",
    "HubStats",
    "ZmqBus",
    "ZmqHub",
    "ZmqSettings",
    "serve_hub",
]

log = structlog.get_logger("middleware.zmq")

_MAX_EXPIRY = float(0xFFFFFFFF)


@dataclass(frozen=True, slots=True)
class ZmqSettings:
    """How a :class:`ZmqBus` reaches its hub.  All durations in seconds."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    client_id: str = ""  # "" -> "mw-<random>"
    will: Will | None = None  # published by the hub when this client dies
    heartbeat: float = 1.0  # ping interval; the hub judges this client by it
    liveness: int = 5  # heartbeats missed (either way) before the peer counts as dead
    connect_timeout: float = 10.0  # first connect gives up after it; also per handshake
    request_timeout: float = 10.0  # publish/subscribe: waiting for a connection plus the ack
    reconnect_min: float = 0.05  # backoff after a lost connection ...
    reconnect_max: float = 2.0  # ... doubling (with jitter) up to this while it flaps
    sndhwm: int = 10_000  # messages queued towards the hub
    rcvhwm: int = 10_000  # messages queued from the hub before the hub starts dropping

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("zmq host is empty")
        if not 0 < self.port < 65536:
            raise ConfigError(f"zmq port {self.port} out of range")
        if self.heartbeat <= 0 or self.liveness < 1:
            raise ConfigError("heartbeat must be > 0 and liveness >= 1")
        if not 0 < self.reconnect_min <= self.reconnect_max:
            raise ConfigError("need 0 < reconnect_min <= reconnect_max")
        if self.connect_timeout <= 0 or self.request_timeout <= 0:
            raise ConfigError("timeouts must be positive")
        if self.sndhwm < 1 or self.rcvhwm < 1:
            raise ConfigError("high-water marks must be >= 1")
        if self.will is not None:
            check_topic(self.will.topic)

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.host}:{self.port}"


class _Lost(Exception):
    """Internal: the connection ended while a request waited."""


class _Refused(BusError):
    """The hub refused the session for a reason retrying will not fix."""


class _Conn:
    """One DEALER socket and what depends on it; replaced on every reconnect.

    Futures made with :meth:`future` fail with :class:`_Lost` when the
    connection drops, so a waiter never outlives its connection.
    """

    def __init__(
        self,
        sock: zmq.Socket[bytes],
        loop: asyncio.AbstractEventLoop,
        on_frames: Callable[[_Conn, list[bytes]], None],
        on_lost: Callable[[_Conn], None],
    ) -> None:
        self.loop = loop
        self._on_lost = on_lost
        self.lost: asyncio.Future[str] = loop.create_future()
        self.last_heard = loop.time()
        self.linger_ms = 0
        self._bound: set[asyncio.Future[Any]] = set()
        self.welcome: asyncio.Future[dict[str, Any]] = self.future()
        self.pump = Pump(sock, lambda frames: on_frames(self, frames), loop)

    def future(self) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self.loop.create_future()
        if self.lost.done():
            fut.set_exception(_Lost(self.lost.result()))
            fut.exception()  # retrieved: the caller sees it when awaiting
        else:
            self._bound.add(fut)
            fut.add_done_callback(self._bound.discard)
        return fut

    async def push(self, frames: list[bytes]) -> None:
        """Queue frames, waiting for room (high-water mark, or not yet connected)."""
        while True:
            try:
                if self.pump.send(frames):
                    return
            except zmq.ZMQError as exc:
                self.drop(f"send failed: {exc}")
            if self.lost.done():
                raise _Lost(self.lost.result())
            await self._room()

    async def _room(self) -> None:
        """Wait until the socket takes messages again; _Lost if the connection ends first."""
        room = self.pump.writable()
        bound = self.future()

        def wake(_: asyncio.Future[None]) -> None:
            if not bound.done():
                bound.set_result(None)

        room.add_done_callback(wake)
        try:
            await bound
        finally:
            room.cancel()

    def drop(self, reason: str) -> None:
        if self.lost.done():
            return
        self.lost.set_result(reason)
        self._on_lost(self)  # no one may pick this connection for a send from now on
        for fut in list(self._bound):
            if not fut.done():
                fut.set_exception(_Lost(reason))
                fut.exception()  # retrieved: nobody may be waiting on it any more
        self._bound.clear()

    def close(self) -> None:
        self.drop("closed")
        self.pump.close(self.linger_ms)


class ZmqBus(Bus):
    """A :class:`Bus` over one DEALER connection to a :class:`ZmqHub`, surviving hub restarts.

    ``connected`` is set while a hub session is established; ``reconnects``
    counts sessions after the first; ``hub_restarts`` counts reconnects that
    found a different hub instance.
    """

    def __init__(self, settings: ZmqSettings | None = None) -> None:
        super().__init__()
        self.settings = settings or ZmqSettings()
        self.client_id = self.settings.client_id or f"mw-{uuid.uuid4().hex[:12]}"
        self.hub_id = ""
        self.reconnects = 0
        self.hub_restarts = 0
        self.send_drops = 0  # QoS 0 publishes dropped: send queue at its high-water mark
        self.malformed = 0  # frames from the hub that were not valid protocol
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._first: asyncio.Future[None] | None = None
        self._conn: _Conn | None = None
        self._connected = asyncio.Event()
        self._wakeup = Wakeup()
        self._mids = itertools.count(1)
        self._rids = itertools.count(1)
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._requests: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._live: set[str] = set()  # filters the hub acknowledged on this connection

    # --- state ------------------------------------------------------------------
    @property
    def connected(self) -> asyncio.Event:
        """Set while connected (read it, wait on it; do not set or clear it)."""
        return self._connected

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    @property
    def stats(self) -> dict[str, int]:
        """Counters: reconnects, hub restarts, drops (send and subscription queues), malformed."""
        return {
            "reconnects": self.reconnects,
            "hub_restarts": self.hub_restarts,
            "send_drops": self.send_drops,
            "dropped": self.dropped,
            "malformed": self.malformed,
            "inflight": len(self._acks),
        }

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until connected; BusError on timeout, BusClosedError if closed meanwhile."""
        loop = self._require_loop()
        await self._ready(None if timeout is None else loop.time() + timeout)

    # --- lifecycle --------------------------------------------------------------
    async def connect(self) -> None:
        """Say hello to the hub (retrying for ``connect_timeout``), then keep the session up."""
        self._check_open()
        if self._task is not None:
            raise BusError(f"{self.client_id}: already connected")
        self._loop = loop = asyncio.get_running_loop()
        self._first = first = loop.create_future()
        self._task = loop.create_task(self._supervise(first), name=f"zmq[{self.client_id}]")
        try:
            await first
        except BaseException:
            task, self._task = self._task, None
            await _cancel(task)
            raise

    async def _disconnect(self) -> None:
        """Called by ``close()``: say ``bye`` (the hub discards the will) and close."""
        self._wake()
        conn = self._conn
        if conn is not None and self._connected.is_set():
            with contextlib.suppress(zmq.ZMQError):
                conn.pump.send([_BYE])
            conn.linger_ms = 500  # let the bye leave before the socket goes
        task, self._task = self._task, None
        await _cancel(task)
        if conn is not None:
            conn.close()
        self._fail_pending(BusClosedError(f"{self.client_id}: bus closed"))

    def crash(self) -> None:
        """Vanish without ``bye`` (fault injection): the hub publishes the will once
        the heartbeats stop.  The bus is closed afterwards."""
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subs):
            sub.end()
        self._subs.clear()
        self._routes.clear()
        self._wake()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._connected.clear()
        self._fail_pending(BusClosedError(f"{self.client_id}: bus crashed"))

    # --- data path --------------------------------------------------------------
    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        content_type: str | None = None,
        expiry: float | None = None,
        user_properties: Mapping[str, str] | None = None,
        correlation: bytes | None = None,
        timeout: float | None = None,
    ) -> None:
        """Publish; QoS >= 1 returns after the hub's ack.  While disconnected it waits
        for the reconnect; the whole call is bounded by ``timeout`` (default
        ``settings.request_timeout``) and raises BusError when that passes."""
        self._check_open()
        loop = self._require_loop()
        check_topic(topic)
        if qos not in (0, 1, 2):
            raise BusError(f"invalid QoS {qos!r}")
        if expiry is not None and not 0 < expiry <= _MAX_EXPIRY:
            raise BusError(f"message expiry {expiry!r}s out of range (0, 2^32-1]")
        body = bytes(payload)
        fields = w.message_fields(
            topic, qos, retain, content_type, expiry, user_properties, correlation
        )
        deadline = loop.time() + (self.settings.request_timeout if timeout is None else timeout)
        if qos == 0:
            conn = await self._ready(deadline)
            try:
                sent = conn.pump.send([w.pack(w.PUB, **fields), body])
            except zmq.ZMQError:
                sent = False
            if not sent:
                self.send_drops += 1
            return
        mid = next(self._mids)
        frames = [w.pack(w.PUB, m=mid, **fields), body]
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    conn = await self._ready(None)
                    self._acks[mid] = ack = conn.future()
                    try:
                        await conn.push(frames)
                        await ack
                        return
                    except _Lost:
                        continue  # send it again on the next connection
        except TimeoutError as exc:
            raise BusError(
                f"{self.client_id}: no ack from the hub for {topic!r} in time "
                f"(connected={self.is_connected})"
            ) from exc
        finally:
            self._acks.pop(mid, None)

    async def _subscribe(self, filter_: str, qos: int) -> None:
        check_filter(filter_)
        if self._task is None:
            return  # not connected yet: subscribed together with the others at connect
        loop = self._require_loop()
        deadline = loop.time() + self.settings.request_timeout
        waited = not self._connected.is_set()
        while True:
            conn = await self._ready(deadline)
            if waited and filter_ in self._live:
                return  # the (re)connect subscribed it while we waited
            waited = True
            try:
                head = await self._request(conn, deadline, w.SUB, f=filter_, q=qos)
            except _Lost:
                continue
            if "err" in head:
                raise TopicError(f"hub refused subscription {filter_!r}: {head['err']}")
            self._live.add(filter_)
            return

    async def _unsubscribe(self, filter_: str) -> None:
        self._live.discard(filter_)
        conn = self._conn
        if conn is None or not self._connected.is_set():
            return  # a reconnect only re-subscribes filters of open subscriptions
        deadline = self._require_loop().time() + self.settings.request_timeout
        with contextlib.suppress(_Lost, BusError):
            await self._request(conn, deadline, w.UNSUB, f=filter_)

    async def _request(
        self, conn: _Conn, deadline: float, cmd: str, **fields: Any
    ) -> dict[str, Any]:
        """Send a sub/unsub and wait for its answer; _Lost if the connection ends first."""
        rid = next(self._rids)
        self._requests[rid] = fut = conn.future()
        try:
            async with asyncio.timeout_at(deadline):
                await conn.push([w.pack(cmd, rid=rid, **fields)])
                return await fut
        except TimeoutError as exc:
            raise BusError(
                f"{self.client_id}: no answer from the hub to {cmd} {fields.get('f')!r} in time"
            ) from exc
        finally:
            self._requests.pop(rid, None)

    # --- connection supervisor (the one owned task) ---------------------------------
    async def _supervise(self, first: asyncio.Future[None]) -> None:
        s = self.settings
        loop = self._require_loop()
        delay = s.reconnect_min
        give_up_at = loop.time() + s.connect_timeout
        while True:
            conn = _Conn(self._new_socket(), loop, self._on_frames, self._on_lost)
            up_since: float | None = None
            try:
                up_since = await self._session(conn, first, give_up_at)
            except Exception as exc:  # whatever failed, keep reconnecting
                err = _as_bus_error(exc)
                if not first.done():
                    if isinstance(err, _Refused) or loop.time() + delay >= give_up_at:
                        first.set_exception(err)
                        return
                log.warning(
                    "zmq.connect_failed",
                    client_id=self.client_id,
                    error=str(err),
                    retry_in=round(delay, 3),
                )
            finally:
                self._end_session(conn)
            if up_since is not None and loop.time() - up_since >= s.reconnect_max:
                delay = s.reconnect_min  # a stable connection broke: retry at once
            delay = await _backoff(delay, s.reconnect_max)

    async def _session(self, conn: _Conn, first: asyncio.Future[None], give_up_at: float) -> float:
        """Run one connection: handshake, re-subscribe, serve until lost; returns when it
        came up."""
        loop = conn.loop
        timeout = self.settings.connect_timeout
        deadline = loop.time() + timeout
        if not first.done():
            deadline = min(deadline, give_up_at)
        await self._handshake(conn, deadline)
        await self._resubscribe(conn, deadline)
        beat = loop.create_task(self._beat(conn), name=f"zmq[{self.client_id}].heartbeat")
        try:
            up_since = loop.time()
            self._conn = conn
            self._connected.set()
            self._wake()
            if first.done():
                self.reconnects += 1
                log.info(
                    "zmq.reconnected",
                    client_id=self.client_id,
                    hub=self.hub_id,
                    reconnects=self.reconnects,
                )
            else:
                first.set_result(None)
            reason = await conn.lost
            if not self._closed:
                log.warning("zmq.connection_lost", client_id=self.client_id, reason=reason)
            return up_since
        finally:
            await _cancel(beat)

    async def _handshake(self, conn: _Conn, deadline: float) -> None:
        s = self.settings
        hello = w.pack(
            w.HELLO,
            id=self.client_id,
            v=w.VERSION,
            hb=s.heartbeat,
            live=s.liveness,
            will=w.will_to_wire(s.will),
        )
        try:
            async with asyncio.timeout_at(deadline):
                await conn.push([hello])
                head = await conn.welcome
        except TimeoutError as exc:
            raise BusError(f"{self.client_id}: no answer from a hub at {s.endpoint}") from exc
        except _Lost as exc:
            raise BusError(
                f"{self.client_id}: connection to {s.endpoint} lost in handshake"
            ) from exc
        if "err" in head:
            raise _Refused(f"{self.client_id}: hub at {s.endpoint} refused: {head['err']}")
        hub = str(head.get("hub", ""))
        if self.hub_id and hub != self.hub_id:
            self.hub_restarts += 1
        self.hub_id = hub

    async def _resubscribe(self, conn: _Conn, deadline: float) -> None:
        filters: dict[str, int] = {}
        for sub in self._subs:
            for f in sub.filters:
                filters[f] = max(filters.get(f, 0), sub.qos)
        if not filters:
            return
        try:
            heads = await asyncio.gather(
                *(self._request(conn, deadline, w.SUB, f=f, q=q) for f, q in filters.items())
            )
        except _Lost as exc:
            raise BusError(f"{self.client_id}: connection lost while re-subscribing") from exc
        for f, head in zip(filters, heads, strict=True):
            if "err" in head:
                log.error(
                    "zmq.resubscribe_refused",
                    client_id=self.client_id,
                    filter=f,
                    reason=head["err"],
                )
            else:
                self._live.add(f)

    def _on_lost(self, conn: _Conn) -> None:
        if self._conn is conn:
            self._conn = None
            self._connected.clear()
            self._live.clear()

    def _end_session(self, conn: _Conn) -> None:
        self._on_lost(conn)
        conn.close()

    def _on_frames(self, conn: _Conn, frames: list[bytes]) -> None:
        """The pump's callback: one message from the hub."""
        conn.last_heard = conn.loop.time()
        try:
            self._handle(conn, frames)
        except ProtocolError as exc:
            self.malformed += 1
            log.warning("zmq.malformed", client_id=self.client_id, error=str(exc)[:200])

    def _handle(self, conn: _Conn, frames: list[bytes]) -> None:
        head = w.unpack(frames[0])
        cmd = head["c"]
        if cmd == w.MSG:
            msg = w.message_from(head, frames[1] if len(frames) > 1 else b"")
            try:
                self._dispatch(msg)
            except Exception:  # a subscriber bug must not kill the connection
                log.exception("zmq.dispatch_failed", client_id=self.client_id)
        elif cmd == w.PUBACK:
            ack = self._acks.get(head.get("m", -1))
            if ack is not None and not ack.done():
                if "err" in head:
                    ack.set_exception(BusError(f"hub rejected publish: {head['err']}"))
                else:
                    ack.set_result(None)
        elif cmd in (w.SUBACK, w.UNSUBACK):
            fut = self._requests.get(head.get("rid", -1))
            if fut is not None and not fut.done():
                fut.set_result(head)
        elif cmd == w.WELCOME:
            if not conn.welcome.done():
                conn.welcome.set_result(head)
        elif cmd == w.UNKNOWN:
            conn.drop("the hub has no session for us (restarted, or declared us dead)")
        elif cmd != w.PONG:
            raise ProtocolError(f"unknown command {cmd!r:.40}")

    async def _beat(self, conn: _Conn) -> None:
        hb = self.settings.heartbeat
        silence = hb * self.settings.liveness
        while True:
            await asyncio.sleep(hb)
            if conn.loop.time() - conn.last_heard > silence:
                conn.drop(f"hub silent for {silence:.3g}s")
                return
            with contextlib.suppress(zmq.ZMQError):
                conn.pump.send([_PING])  # a full queue carries data: that is life enough

    def _new_socket(self) -> zmq.Socket[bytes]:
        s = self.settings
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on a live connection, never for a dead one
        sock.setsockopt(zmq.SNDHWM, s.sndhwm)
        sock.setsockopt(zmq.RCVHWM, s.rcvhwm)
        sock.setsockopt(zmq.RECONNECT_IVL, max(1, int(s.reconnect_min * 1000)))
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, max(1, int(s.reconnect_max * 1000)))
        sock.connect(s.endpoint)
        return sock

    # --- waiting ---------------------------------------------------------------------
    async def _ready(self, deadline: float | None) -> _Conn:
        loop = self._require_loop()
        while True:
            self._check_open()
            conn = self._conn
            if self._connected.is_set() and conn is not None and not conn.lost.done():
                return conn
            if self._task is None:
                raise BusError(f"{self.client_id}: not connected (call connect() first)")
            if deadline is not None and loop.time() >= deadline:
                raise BusError(
                    f"{self.client_id}: no connection to {self.settings.endpoint} in time"
                )
            await self._wakeup.wait(deadline)

    def _wake(self) -> None:
        self._wakeup.wake()

    def _fail_pending(self, exc: BusError) -> None:
        for table in (self._acks, self._requests):
            for fut in table.values():
                if not fut.done():
                    fut.set_exception(exc)
        if self._first is not None and not self._first.done():
            self._first.set_exception(exc)

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            if self._closed:
                raise BusClosedError(f"{self.client_id}: bus is closed")
            raise BusError(f"{self.client_id}: not connected (call connect() first)")
        return self._loop

    def __repr__(self) -> str:
        state = "closed" if self._closed else "connected" if self.is_connected else "disconnected"
        return f"ZmqBus({self.client_id}@{self.settings.endpoint}, {state})"


_PING = w.pack(w.PING)
_BYE = w.pack(w.BYE)


def _as_bus_error(exc: BaseException) -> BusError:
    if isinstance(exc, BusError):
        return exc
    log.error("zmq.unexpected_error", error=repr(exc))
    err = BusError(f"unexpected {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err
