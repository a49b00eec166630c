"""An in-memory broker and bus for unit tests: no sockets, same semantics.

Supports retained messages, last wills (on :meth:`InMemoryBus.crash`), MQTT 5
shared subscriptions (round-robin within a group) and optional message loss or
duplication for fault tests.
"""

from __future__ import annotations

import itertools

from middleware.broker_bridge.bus import Bus, BusMessage, Will, own_copy
from middleware.protocol.topics import matches, strip_share


class InMemoryBroker:
    """Holds retained messages and routes between connected InMemoryBus clients."""

    def __init__(self) -> None:
        self.retained: dict[str, BusMessage] = {}
        self.clients: list[InMemoryBus] = []
        self.published = 0
        # one counter per (group, filter): a shared global counter would let one
        # group's picks depend on another's and starve members
        self._rr: dict[tuple[str, str], itertools.count[int]] = {}

    def route(self, msg: BusMessage) -> None:
        self.published += 1
        if msg.retain:
            if msg.payload:
                self.retained[msg.topic] = msg
            else:
                self.retained.pop(msg.topic, None)
        shared: dict[tuple[str, str], list[InMemoryBus]] = {}
        delivered: set[int] = set()
        for client in list(self.clients):
            for f in client._filters:
                if not matches(f, msg.topic):
                    continue
                if f.startswith("$share/"):
                    group = f.split("/", 2)[1]
                    shared.setdefault((group, strip_share(f)), []).append(client)
                elif id(client) not in delivered:
                    delivered.add(id(client))
                    client._deliver(msg)
        for key, members in shared.items():
            pick = members[next(self._rr.setdefault(key, itertools.count())) % len(members)]
            if id(pick) not in delivered:  # its local dispatch already reached every sub
                delivered.add(id(pick))
                pick._deliver(msg)


class InMemoryBus(Bus):
    """A Bus connected to an :class:`InMemoryBroker`."""

    def __init__(
        self, broker: InMemoryBroker, client_id: str = "mem", will: Will | None = None
    ) -> None:
        super().__init__()
        self.broker = broker
        self.client_id = client_id
        self.will = will
        self._filters: list[str] = []

    async def connect(self) -> None:
        self.broker.clients.append(self)

    async def _disconnect(self) -> None:
        if self in self.broker.clients:
            self.broker.clients.remove(self)

    def crash(self) -> None:
        """Vanish without DISCONNECT: the broker publishes the last will.

        A no-op for a bus that is not connected (a clean close discards the will).
        """
        self._closed = True
        for sub in list(self._subs):
            sub.end()
        if self not in self.broker.clients:
            return
        self.broker.clients.remove(self)
        if self.will is not None:
            w = self.will
            self.broker.route(BusMessage(w.topic, w.payload, w.qos, w.retain))

    async def _carry(self, msg: BusMessage, timeout: float | None = None) -> None:
        self._check_open()
        self.broker.route(own_copy(msg))

    async def _subscribe(self, filter_: str, qos: int) -> None:
        # once per filter: Bus unsubscribes only when the last user closes, and a
        # leftover $share filter would keep this client in the group, losing messages
        if filter_ not in self._filters:
            self._filters.append(filter_)
        for topic, msg in list(self.broker.retained.items()):
            if matches(filter_, topic) and not filter_.startswith("$share/"):
                self._deliver(msg)

    async def _unsubscribe(self, filter_: str) -> None:
        if filter_ in self._filters:
            self._filters.remove(filter_)

    def _deliver(self, msg: BusMessage) -> None:
        self._dispatch(msg)
