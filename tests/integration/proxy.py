"""A fault-injecting TCP proxy for link tests: cut, restore, reset, black-hole, delay.

Runs on the test's event loop; listens on a free loopback port and forwards
to the broker.  Impairments, all switchable while connections are open:

- ``delay`` / ``jitter``: every chunk is held ``delay + U(0, jitter)`` seconds
  (a delay line per direction: chunks keep their order, as on a TCP stream,
  and a burst does not pay the delay once per chunk);
- :meth:`reset`: abort every open connection (both sides see a reset) but
  keep accepting new ones: a flapping link;
- :meth:`cut` / :meth:`restore`: abort every connection and refuse new ones
  until restored: a link that is down;
- ``blackholed``: keep connections open but drop every byte, both ways: a
  half-open link that only keepalives detect.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time


class TcpProxy:
    def __init__(
        self, target_host: str, target_port: int, host: str = "127.0.0.1", seed: int = 0
    ) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = 0
        self.delay = 0.0  # seconds added to every chunk, each way
        self.jitter = 0.0  # plus uniform [0, jitter) seconds
        self.blackholed = False  # keep connections open but drop every byte (a half-open link)
        self.cuts = 0
        self.resets = 0
        self.connections = 0  # accepted so far
        self.dropped_bytes = 0  # swallowed while black-holed
        self._rng = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def cut(self) -> None:
        """Drop every connection and refuse new ones until :meth:`restore`."""
        self.cuts += 1
        await self._shut()

    async def _shut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self._abort_all()

    async def restore(self) -> None:
        if self._server is None:
            await self.start()

    def reset(self) -> int:
        """Abort every open connection (a reset); new connections are accepted at once.
        Returns how many client connections were reset."""
        self.resets += 1
        return self._abort_all() // 2

    async def close(self) -> None:
        await self._shut()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _abort_all(self) -> int:
        n = len(self._conns)
        for w in list(self._conns):
            w.transport.abort()
        self._conns.clear()
        return n

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._conns.update((writer, uw))
        for src, dst in ((reader, uw), (ur, writer)):
            task = asyncio.get_running_loop().create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _hold(self) -> float:
        return self.delay + (self._rng.random() * self.jitter if self.jitter else 0.0)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Forward ``src`` to ``dst`` through a delay line (reader and writer run concurrently)."""
        line: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def read() -> None:
            last = 0.0
            try:
                while data := await src.read(65536):
                    if self.blackholed:
                        self.dropped_bytes += len(data)
                        continue
                    last = max(last, time.monotonic() + self._hold())  # FIFO, like TCP
                    line.put_nowait((last, data))
            except (ConnectionError, OSError):
                pass
            finally:
                line.put_nowait(None)

        async def write() -> None:
            while (item := await line.get()) is not None:
                at, data = item
                if (wait := at - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                if self.blackholed:  # black-holed while it waited on the line
                    self.dropped_bytes += len(data)
                    continue
                dst.write(data)
                await dst.drain()

        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(read())
                tg.create_task(write())
        except* (ConnectionError, OSError):
            pass
        finally:
            dst.transport.abort()
            self._conns.discard(dst)
