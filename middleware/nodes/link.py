"""The device's side of the bus: sends session messages, routes verdicts to sessions.

One subscription carries the verdicts of all of this device's sessions (a
filter is added per session); a receive task decodes and validates each
verdict and puts it on its session's queue.  Malformed verdicts are counted
and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import structlog

from middleware.broker_bridge.bus import CONTENT_MSGPACK, Bus, Subscription
from middleware.errors import BusClosedError, BusError, ProtocolError, TopicError
from middleware.protocol import (
    CloseSession,
    Draft,
    OpenSession,
    SessionState,
    Topics,
    Verdict,
    VerifierStatus,
    decode,
)
from middleware.protocol.session import trace_id
from middleware.protocol.topics import SessionLeaf

log = structlog.get_logger("middleware.node.link")

DRAFT_EXPIRY_S = 30.0
QUEUE_MAX = 256


@dataclass(frozen=True, slots=True)
class OwnerLost:
    """Delivered in place of a verdict: the verifier owning the session went offline (last will)."""

    verifier_id: str


class BusLink:
    """Implements :class:`middleware.nodes.session.Link` over any :class:`Bus`."""

    def __init__(self, bus: Bus, topics: Topics, device_id: str) -> None:
        self.bus = bus
        self.topics = topics
        self.device_id = device_id
        self.malformed = 0
        self._queues: dict[str, asyncio.Queue[Verdict | OwnerLost]] = {}
        self._owners: dict[str, str] = {}  # session -> verifier that opened it
        self._sub: Subscription | None = None

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Receive verdicts until the bus closes (run it in the owner's TaskGroup)."""
        async with self.bus.subscribe() as sub:  # session filters are added on attach
            self._sub = sub
            for sid in self._queues:
                await sub.add(self._topic(sid, "verdict"))
            if ready is not None:
                ready.set()
            await sub.add(self.topics.all_verifier_status())
            async for msg in sub:
                try:
                    ref = self.topics.parse(msg.topic)
                    if ref.root == "verifier":
                        self._verifier_status(decode(msg.payload, expect=VerifierStatus))
                        continue
                    v = decode(msg.payload, expect=Verdict)
                    if v.session_id != ref.ident or ref.device != self.device_id:
                        raise ProtocolError("verdict session id does not match its topic")
                except (ProtocolError, TopicError) as exc:
                    self.malformed += 1
                    log.warning("verdict_dropped", topic=msg.topic, error=str(exc)[:200])
                    continue
                if v.kind == "opened":
                    self._owners[v.session_id] = v.verifier_id
                self._deliver(v.session_id, v)

    def _topic(self, session_id: str, leaf: SessionLeaf) -> str:
        return self.topics.session(self.device_id, session_id, leaf)

    def _deliver(self, session_id: str, item: Verdict | OwnerLost) -> None:
        q = self._queues.get(session_id)
        if q is None:
            return
        if q.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                q.get_nowait()
        q.put_nowait(item)

    def _verifier_status(self, st: VerifierStatus) -> None:
        if st.online:
            return
        for sid, owner in list(self._owners.items()):
            if owner == st.verifier_id:
                log.warning("verifier_offline", verifier=owner, session=sid)
                self._deliver(sid, OwnerLost(owner))

    async def attach(self, session_id: str) -> None:
        """Start receiving this session's verdicts (before its open is sent)."""
        self._queues.setdefault(session_id, asyncio.Queue(QUEUE_MAX))
        if self._sub is not None:
            await self._sub.add(self._topic(session_id, "verdict"))

    async def detach(self, session_id: str) -> None:
        self._queues.pop(session_id, None)
        self._owners.pop(session_id, None)
        if self._sub is not None:
            with contextlib.suppress(BusClosedError):
                await self._sub.remove(self._topic(session_id, "verdict"))

    async def send(self, msg: OpenSession | Draft | CloseSession) -> None:
        trace = {"trace": trace_id(msg.session_id, msg.epoch, msg.seq)}
        if isinstance(msg, OpenSession):
            await self.bus.publish(
                self._topic(msg.session_id, "open"),
                msg.encode(),
                qos=1,
                content_type=CONTENT_MSGPACK,
                user_properties=trace,
            )
        else:
            await self.bus.publish(
                self._topic(msg.session_id, "draft"),
                msg.encode(),
                qos=1,
                content_type=CONTENT_MSGPACK,
                expiry=DRAFT_EXPIRY_S,
                user_properties=trace,
            )

    async def next_verdict(self, session_id: str, timeout: float) -> Verdict | OwnerLost | None:
        q = self._queues.get(session_id)
        if q is None:
            raise KeyError(f"session {session_id!r} is not attached")
        try:
            return await asyncio.wait_for(q.get(), max(0.0, timeout))
        except TimeoutError:
            return None

    async def reconcile(self, session_id: str, timeout: float) -> SessionState | None:
        """Read the retained state if the broker has one: a hint (see DeviceSession._hint),
        whoever may write the topic could have written it."""
        if timeout <= 0:
            return None
        try:
            async with self.bus.subscribe(self._topic(session_id, "state"), maxsize=4) as sub:
                msg = await sub.get(timeout)
        except (TimeoutError, BusError):
            return None
        try:
            st = decode(msg.payload, expect=SessionState)
            if st.session_id != session_id or st.device_id != self.device_id:
                raise ProtocolError("state session or device does not match its topic")
        except ProtocolError:
            self.malformed += 1
            return None
        return st
