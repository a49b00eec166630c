"""Small asyncio helpers shared by the transports."""

from __future__ import annotations

import asyncio
import random


async def backoff(delay: float, max_delay: float) -> float:
    """Sleep a jittered ``delay`` (50-100 %) and return the next, doubled, capped one."""
    await asyncio.sleep(delay * random.uniform(0.5, 1.0))
    return min(delay * 2, max_delay)


async def cancel_and_wait(task: asyncio.Task[None] | None) -> None:
    if task is None or task.done():
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # we are being cancelled ourselves, not just the task we stopped


class Wakeup:
    """Tasks waiting for a state change (e.g. "connected") until woken or a deadline passes."""

    def __init__(self) -> None:
        self._waiters: set[asyncio.Future[None]] = set()

    async def wait(self, deadline: float | None) -> None:
        """Return when :meth:`wake` is called or at ``deadline`` (loop time), whichever is first."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except TimeoutError:
            pass
        finally:
            self._waiters.discard(waiter)

    def wake(self) -> None:
        """Wake every waiter; they re-check the state they wait for."""
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()
