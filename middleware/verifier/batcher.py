"""Micro-batching of drafts by arrival window.

Policies:

- ``adaptive`` (default): take everything that is waiting; then wait for more
  only while sessions that are expected to send have not yet sent, and never
  longer than ``window``.  A lone draft on an idle model goes at once.
- ``fixed``: SLED's static batch: wait until ``max_batch`` drafts or ``window``.
- ``none``: one draft per forward pass.
- ``planned``: a controller decides (``decide``, supplied by the verifier from
  its latency model and planner, :mod:`middleware.verifier.planner`): verify a
  chosen subset of the waiting drafts now, or wait for predicted arrivals.
  ``window`` stays a hard bound on any draft's wait.

The batcher holds at most one draft per session per batch; later drafts of
the same session wait for the next batch (they are usually answered from the
committed tokens then).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from middleware.errors import ConfigError

Policy = Literal["adaptive", "fixed", "none", "planned"]
POLICIES: tuple[str, ...] = ("adaptive", "fixed", "none", "planned")
T = TypeVar("T")
# (waiting drafts, now) -> (session keys to verify now, or none and how long to wait at most)
Decide = Callable[[Sequence["Pending[T]"], float], tuple[Collection[str], float]]


@dataclass(frozen=True, slots=True)
class BatchConfig:
    policy: Policy = "adaptive"
    window: float = 0.005  # seconds
    max_batch: int = 16
    max_queue: int = 4096

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(
                f"batch policy must be one of {', '.join(POLICIES)}, not {self.policy!r}"
            )
        if not 0 <= self.window <= 10 or not 1 <= self.max_batch <= 1024:
            raise ConfigError(
                "batch window must be within [0, 10] s and max_batch within [1, 1024]"
            )


@dataclass(slots=True)
class Pending(Generic[T]):
    key: str  # session id
    item: T
    arrived: float = field(default_factory=time.monotonic)


class Batcher(Generic[T]):
    """An async queue that hands out batches according to a :class:`BatchConfig`.

    ``expected`` is a callable giving how many sessions are likely to send a
    draft soon (open sessions not already waiting); the adaptive policy stops
    waiting once that many drafts are in the batch.
    """

    def __init__(
        self, config: BatchConfig, expected: Callable[[], int], decide: Decide[T] | None = None
    ) -> None:
        if config.policy == "planned" and decide is None:
            raise ConfigError("the planned batch policy needs a decide callback")
        self.config = config
        self._expected = expected
        self._decide = decide
        self._queue: asyncio.Queue[Pending[T]] = asyncio.Queue()
        self._carry: list[Pending[T]] = []
        self.dropped = 0

    def qsize(self) -> int:
        return self._queue.qsize() + len(self._carry)

    def put(self, key: str, item: T) -> bool:
        """Enqueue; False (and counted) if the queue is full."""
        if self.qsize() >= self.config.max_queue:
            self.dropped += 1
            return False
        self._queue.put_nowait(Pending(key, item))
        return True

    async def next_batch(self) -> list[Pending[T]]:
        """Wait for at least one draft and return a batch."""
        cfg = self.config
        batch: list[Pending[T]] = []
        keys: set[str] = set()
        carry, self._carry = self._carry, []

        def add(p: Pending[T]) -> None:
            if p.key in keys:
                self._carry.append(p)
            else:
                batch.append(p)
                keys.add(p.key)

        for p in carry:
            add(p)
        if not batch:
            add(await self._queue.get())
        if cfg.policy == "planned":
            return await self._planned(batch, add)
        limit = 1 if cfg.policy == "none" else cfg.max_batch
        while len(batch) < limit and not self._queue.empty():
            add(self._queue.get_nowait())
        if cfg.policy == "none" or len(batch) >= limit:
            return self._trim(batch, limit)
        deadline = batch[0].arrived + cfg.window
        while len(batch) < limit:
            if cfg.policy == "adaptive" and len(batch) >= max(1, self._expected()):
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                add(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return self._trim(batch, limit)

    async def _planned(
        self, batch: list[Pending[T]], add: Callable[[Pending[T]], None]
    ) -> list[Pending[T]]:
        assert self._decide is not None
        cfg = self.config
        while True:
            while not self._queue.empty():
                add(self._queue.get_nowait())
            now = time.monotonic()
            overdue = now - min(p.arrived for p in batch) >= cfg.window
            # Always consult the controller, also when the bound decides: it updates every
            # session's draft-length hint (forwards can last far longer than the window).
            take, wait = self._decide(batch, now)
            if overdue or (not take and wait <= 0):
                take = {p.key for p in batch}  # the hard bound, or a planner with no opinion
            if take:
                chosen = [p for p in batch if p.key in take][: cfg.max_batch]
                picked = {id(p) for p in chosen}
                self._carry = [p for p in batch if id(p) not in picked] + self._carry
                return chosen
            oldest = min(p.arrived for p in batch)
            wait = min(wait, oldest + cfg.window - now)
            try:
                add(await asyncio.wait_for(self._queue.get(), max(wait, 0.0)))
            except TimeoutError:
                pass

    def _trim(self, batch: list[Pending[T]], limit: int) -> list[Pending[T]]:
        if len(batch) > limit:
            self._carry = batch[limit:] + self._carry
            batch = batch[:limit]
        return batch
