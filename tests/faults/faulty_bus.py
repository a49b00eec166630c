"""A device's real :class:`MqttBus` that also duplicates, delays and reorders session traffic.

Outgoing (what the broker receives from the device):

- each open and draft is published twice with probability ``duplicate``;
- a draft is held back with probability ``delay`` for 20-150 ms (later drafts of
  other sessions overtake it), and with probability ``late`` for 1.2-2 s, past the
  session's retransmission timeout, so the session's own resend overtakes it and
  the original arrives after it, stale.

Incoming (what the device's subscriptions receive): each verdict is delivered
twice with probability ``duplicate`` and held back for 20-150 ms with probability
``delay`` (later verdicts overtake it).

Counts of everything injected are in :attr:`injected`.  Held messages are sent
by tasks this bus owns and cancels on close.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from middleware.broker_bridge.bus import BusMessage
from middleware.broker_bridge.mqtt import MqttBus, MqttSettings
from middleware.errors import BusError


class ReorderingBus(MqttBus):
    def __init__(
        self,
        settings: MqttSettings,
        *,
        seed: int = 0,
        duplicate: float = 0.4,
        delay: float = 0.25,
        late: float = 0.05,
    ) -> None:
        super().__init__(settings)
        self.rng = random.Random(seed)
        self.p_duplicate, self.p_delay, self.p_late = duplicate, delay, late
        self.injected: Counter[str] = Counter()
        self._held: set[asyncio.Task[None]] = set()

    async def publish(self, topic: str, payload: bytes, **kw: Any) -> None:
        leaf = topic.rsplit("/", 1)[-1]
        if leaf not in ("open", "draft"):
            await super().publish(topic, payload, **kw)
            return
        r = self.rng.random()
        if leaf == "draft" and r < self.p_late + self.p_delay:
            late = r < self.p_late
            wait = self.rng.uniform(1.2, 2.0) if late else self.rng.uniform(0.02, 0.15)
            self.injected["draft_late" if late else "draft_delayed"] += 1
            self._hold(wait, lambda: MqttBus.publish(self, topic, payload, **kw))
            return
        await super().publish(topic, payload, **kw)
        if self.rng.random() < self.p_duplicate:
            self.injected[f"{leaf}_duplicated"] += 1
            await super().publish(topic, payload, **kw)

    def _dispatch(self, msg: BusMessage) -> None:
        if not msg.topic.endswith("/verdict"):
            super()._dispatch(msg)
            return
        if self.rng.random() < self.p_delay:
            self.injected["verdict_delayed"] += 1
            asyncio.get_running_loop().call_later(self.rng.uniform(0.02, 0.15), self._deliver, msg)
            return
        super()._dispatch(msg)
        if self.rng.random() < self.p_duplicate:
            self.injected["verdict_duplicated"] += 1
            super()._dispatch(msg)

    def _deliver(self, msg: BusMessage) -> None:
        if not self._closed:
            super()._dispatch(msg)

    def _hold(self, wait: float, publish: Callable[[], Awaitable[None]]) -> None:
        async def later() -> None:
            await asyncio.sleep(wait)
            with contextlib.suppress(BusError):
                await publish()

        task = asyncio.get_running_loop().create_task(later(), name=f"held[{self.client_id}]")
        self._held.add(task)
        task.add_done_callback(self._held.discard)

    async def close(self) -> None:
        for t in list(self._held):
            t.cancel()
        for t in list(self._held):
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await super().close()
