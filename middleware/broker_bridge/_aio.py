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
