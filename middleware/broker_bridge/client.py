"""The reconnecting client base every network transport adapts.

A transport supplies four steps (open one connection, restore what the peer must
know after it, hold it until it drops, drop the socket); this base runs them under
one supervisor: the first ``connect()`` retries for ``connect_timeout`` and then
fails, later drops are retried forever with jittered exponential backoff
(``_aio.backoff``), and a connection that flaps (drops within ``reconnect_max`` of
coming up) keeps backing off instead of hammering the peer.  ``wait_connected``
and the ``connected`` event are the same for every transport.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, Protocol

import structlog

from middleware.broker_bridge._aio import Wakeup
from middleware.broker_bridge._aio import backoff as _backoff
from middleware.broker_bridge._aio import cancel_and_wait as _cancel
from middleware.broker_bridge.bus import Bus
from middleware.errors import BusClosedError, BusError
from middleware.protocol.topics import check_filter

log = structlog.get_logger("middleware.client")


class Refused(BusError):
    """The peer refused the connection for a reason retrying will not fix."""


class Lost(Exception):
    """Internal: the connection dropped while a request waited for its ack."""


class Timing(Protocol):
    """The settings every reconnecting transport has (seconds)."""

    @property
    def reconnect_min(self) -> float: ...
    @property
    def reconnect_max(self) -> float: ...
    @property
    def connect_timeout(self) -> float: ...
    @property
    def request_timeout(self) -> float: ...


class ReconnectingBus(Bus):
    """A :class:`Bus` kept connected by one supervisor task until ``close()``."""

    client_id: str
    settings: Timing
    _kind = "bus"  # log event prefix: "mqtt", "zmq"

    def __init__(self) -> None:
        super().__init__()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._first: asyncio.Future[None] | None = None  # resolved by the first connection
        self._connected = asyncio.Event()
        self._wakeup = Wakeup()
        self._reconnects = 0
        self._live: set[str] = set()  # filters the peer acknowledged on this connection

    # --- lifecycle (the same for every transport) ----------------------------------------
    async def connect(self) -> None:
        """Connect, retrying failed attempts for ``connect_timeout``; then keep the
        connection up (reconnecting with backoff) until ``close()``."""
        self._check_open()
        if self._task is not None:
            raise BusError(f"{self.client_id}: already connected")
        self._loop = loop = asyncio.get_running_loop()
        self._before_connect()
        self._first = first = loop.create_future()
        s = self.settings
        self._task = loop.create_task(
            self._supervise(first, s.reconnect_min, s.reconnect_max, s.connect_timeout),
            name=f"{self._kind}[{self.client_id}]",
        )
        try:
            await first
        except BaseException:
            task, self._task = self._task, None
            await _cancel(task)
            self._drop_socket()
            raise

    def crash(self) -> None:
        """Vanish without saying goodbye (fault injection): the peer delivers the will.
        The bus is closed afterwards."""
        if self._closed:
            return
        self._end_subscriptions()
        self._wake()
        if self._task is not None:
            self._task.cancel()  # finishes on the next loop turn; touches no socket
            self._task = None
        self._end_connection("crashed")

    async def _stop_supervisor(self) -> None:
        self._wake()
        task, self._task = self._task, None
        await _cancel(task)

    def _end_connection(self, how: str) -> None:
        """Drop the socket and fail whatever still waits: the end of close() and crash()."""
        self._connected.clear()
        self._drop_socket()
        self._fail_pending(BusClosedError(f"{self.client_id}: bus {how}"))

    def _fail_pending(self, exc: BusError) -> None:
        """Fail every waiting acknowledgement, and a ``connect()`` still waiting, with ``exc``."""
        for table in self._pending():
            for fut in table.values():
                if not fut.done():
                    fut.set_exception(exc)
        if self._first is not None and not self._first.done():
            self._first.set_exception(exc)

    # --- subscribing (the same for every transport) --------------------------------------
    async def _subscribe(self, filter_: str, qos: int) -> None:
        """Subscribe now, or leave it to the (re)connect, which subscribes every open filter."""
        check_filter(filter_)
        if self._task is None:
            return  # not connected yet: subscribed together with the others at connect
        deadline = self._require_loop().time() + self.settings.request_timeout
        waited = False
        while True:
            if waited or not self._connected.is_set():
                await self._wait_ready(deadline)
                if filter_ in self._live:
                    return  # the (re)connect subscribed it while we waited
            waited = True
            try:
                await self._request_subscribe(filter_, qos, deadline)
            except Lost:
                continue
            self._live.add(filter_)
            return

    async def _request_subscribe(self, filter_: str, qos: int, deadline: float) -> None:
        """Ask the peer for one filter and wait for its answer; Lost if the connection
        dropped first (retried), BusError/TopicError if refused."""
        raise NotImplementedError

    # --- what a transport supplies -----------------------------------------------------
    def _before_connect(self) -> None:
        """Prepare the client before the supervisor starts (the loop is known)."""

    def _pending(self) -> Iterable[dict[Any, asyncio.Future[Any]]]:
        """The tables of futures waiting for the peer's acknowledgements."""
        return ()

    async def _connect_once(self) -> None:
        raise NotImplementedError

    async def _after_connect(self) -> None:
        """Restore what the peer must know on a fresh connection (subscriptions)."""

    async def _hold(self) -> None:
        """Return when the connection drops."""
        raise NotImplementedError

    def _drop_socket(self) -> None:
        raise NotImplementedError

    def _where(self) -> str:
        """The peer, for messages."""
        raise NotImplementedError

    def _as_bus_error(self, exc: Exception) -> BusError:
        if isinstance(exc, BusError):
            return exc
        if isinstance(exc, Lost):
            return BusError(f"connection lost: {exc}")
        log.error(f"{self._kind}.unexpected_error", error=repr(exc))
        err = BusError(f"unexpected {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        return err

    # --- state ----------------------------------------------------------------
    @property
    def connected(self) -> asyncio.Event:
        """Set while connected (read it, wait on it; do not set or clear it)."""
        return self._connected

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    @property
    def reconnects(self) -> int:
        """Successful reconnections since the first connect."""
        return self._reconnects

    async def wait_connected(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until connected; BusError on timeout, BusClosedError if closed meanwhile."""
        loop = self._require_loop()
        await self._wait_ready(None if timeout is None else loop.time() + timeout)

    # --- supervisor -----------------------------------------------------------
    async def _supervise(
        self,
        first: asyncio.Future[None],
        reconnect_min: float,
        reconnect_max: float,
        connect_timeout: float,
    ) -> None:
        loop = self._require_loop()
        delay = reconnect_min
        give_up_at = loop.time() + connect_timeout
        while True:
            try:
                await self._connect_once()
                await self._after_connect()
            except Exception as exc:  # whatever failed, keep reconnecting
                err = self._as_bus_error(exc)
                self._connected.clear()
                self._drop_socket()
                if not first.done():
                    if isinstance(err, Refused) or loop.time() + delay >= give_up_at:
                        first.set_exception(err)
                        return
                log.warning(
                    f"{self._kind}.connect_failed",
                    client_id=self.client_id,
                    error=str(err),
                    retry_in=round(delay, 3),
                )
                delay = await _backoff(delay, reconnect_max)
                continue
            if first.done():
                self._reconnects += 1
                log.info(
                    f"{self._kind}.reconnected",
                    client_id=self.client_id,
                    reconnects=self._reconnects,
                    **self._reconnect_fields(),
                )
            self._connected.set()
            self._wake()
            if not first.done():
                first.set_result(None)
            up_since = loop.time()
            await self._hold()
            self._connected.clear()
            if loop.time() - up_since < reconnect_max:
                # Flapping (e.g. another client took over the session): keep backing off.
                delay = await _backoff(delay, reconnect_max)
            else:
                delay = reconnect_min  # a stable connection broke: retry at once

    def _reconnect_fields(self) -> dict[str, object]:
        return {}

    async def _wait_ready(self, deadline: float | None) -> None:
        loop = self._require_loop()
        while True:
            self._check_open()
            if self._connected.is_set():
                return
            if self._task is None:
                raise BusError(f"{self.client_id}: not connected (call connect() first)")
            if deadline is not None and loop.time() >= deadline:
                raise BusError(f"{self.client_id}: no connection to {self._where()} in time")
            await self._wakeup.wait(deadline)

    def _wake(self) -> None:
        self._wakeup.wake()

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            if self._closed:
                raise BusClosedError(f"{self.client_id}: bus is closed")
            raise BusError(f"{self.client_id}: not connected (call connect() first)")
        return self._loop
