"""Drive a plain ZeroMQ socket from the asyncio loop with callbacks instead of futures.

Why not ``zmq.asyncio``: it wraps every receive and send in a Future and
reschedules itself through the loop for each one; on the hub's and clients'
hot path that cost more than the network hop (a ping-pong through the hub took
~1.4 ms instead of ~0.5 ms).  Here the socket's notification descriptor is
watched with ``loop.add_reader`` and every wake-up drains all waiting messages
into a callback, synchronously.

The descriptor is edge-like: it only says "look at the socket's EVENTS", and
any operation on the socket may consume that signal.  So a drain runs until
EVENTS shows no more input (or ``batch`` messages, then it yields to the loop
and continues on the next turn), and every send made outside a drain reads
EVENTS at once and schedules a drain if input (or room a sender waits for) is
there; otherwise the descriptor signals again when something changes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

import zmq

# plain ints: zmq's flag enums cost a Python call per "&" on the hot path
_EVENTS, _POLLIN, _POLLOUT = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.POLLOUT)
_NOBLOCK = int(zmq.NOBLOCK)


class Pump:
    """A sync zmq socket served by ``loop.add_reader``: ``on_frames`` gets each message.

    Not thread-safe: use it only from the loop's thread.
    """

    def __init__(
        self,
        sock: zmq.Socket[bytes],
        on_frames: Callable[[list[bytes]], None],
        loop: asyncio.AbstractEventLoop,
        batch: int = 512,
    ) -> None:
        self.sock = sock
        self.closed = False
        self._on_frames = on_frames
        self._loop = loop
        self._batch = batch
        self._writers: list[asyncio.Future[None]] = []
        self._scheduled = False
        self._fd = int(sock.getsockopt(zmq.FD))
        loop.add_reader(self._fd, self.drain)
        self._kick()  # messages that arrived before the reader was registered

    def drain(self) -> None:
        """Receive everything waiting (up to ``batch``), then wake senders waiting for room."""
        self._scheduled = False
        sock = self.sock
        for _ in range(self._batch):
            if self.closed:
                return
            try:
                events = int(sock.getsockopt(_EVENTS))
                if not events & _POLLIN:
                    break
                frames = sock.recv_multipart(_NOBLOCK)
            except zmq.Again:
                break
            except zmq.ZMQError:  # closed under us
                return
            self._on_frames(frames)
        else:
            self._kick()  # more may wait: continue after other callbacks had their turn
            return
        if self._writers and not self.closed and events & _POLLOUT:
            writers, self._writers = self._writers, []
            for w in writers:
                if not w.done():
                    w.set_result(None)

    def send(self, frames: Sequence[bytes]) -> bool:
        """Queue a message without blocking; False when there is no room (high-water mark,
        or no live peer with ``IMMEDIATE``).  Other ZMQErrors (EHOSTUNREACH) propagate."""
        if self.closed:
            return False
        try:
            self.sock.send_multipart(frames, _NOBLOCK)
            ok = True
        except zmq.Again:
            ok = False
        except zmq.ZMQError:
            self._kick()
            raise
        # the send may have consumed the descriptor's signal: look at EVENTS now
        if not self._scheduled:
            events = int(self.sock.getsockopt(_EVENTS))
            if events & _POLLIN or (self._writers and events & _POLLOUT):
                self._kick()
        return ok

    def writable(self) -> asyncio.Future[None]:
        """A future resolved once the socket may take a message again."""
        fut: asyncio.Future[None] = self._loop.create_future()
        self._writers.append(fut)
        self._kick()
        return fut

    def close(self, linger_ms: int = 0) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._fd)
        for w in self._writers:
            if not w.done():
                w.cancel()
        self._writers.clear()
        self.sock.close(linger=linger_ms)

    def _kick(self) -> None:
        if not self._scheduled and not self.closed:
            self._scheduled = True
            self._loop.call_soon(self.drain)
