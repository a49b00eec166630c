"""Three ways to wire verifiers and devices behind one interface, for the conformance suite.

``mqtt``    verifier and devices on Mosquitto
``zmq``     devices connect DEALERs straight to the verifiers' ROUTERs (no broker)
``bridge``  devices on Mosquitto, verifiers on ZeroMQ, joined by a :class:`Bridge`

On the ZeroMQ paths every verifier binds its own port (the n-th verifier bus of a
rig gets the n-th of ``VERIFIER_SLOTS`` ports picked up front), and every device
bus lists all of them: it talks to one and fails over to the next.

A :class:`Rig` hands out not-yet-connected buses for the verifier side and the
device side; :class:`Fleet` runs services on them and offers a
:class:`HandDevice` that speaks the session protocol message by message.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from middleware.broker_bridge.bridge import Bridge
from middleware.broker_bridge.bus import CONTENT_MSGPACK, Bus, Subscription, Will
from middleware.broker_bridge.mqtt import MqttBus, MqttSettings
from middleware.broker_bridge.zmq import ZmqBus, ZmqServerBus, ZmqServerSettings, ZmqSettings
from middleware.nodes.drafters.base import Drafter
from middleware.nodes.service import NodeConfig, NodeService
from middleware.nodes.service import offline_status_payload as device_will
from middleware.nodes.session import SessionConfig
from middleware.protocol import Draft, OpenSession, Topics, Verdict, decode
from middleware.verifier.engine import TargetEngine
from middleware.verifier.service import VerifierConfig, VerifierService
from middleware.verifier.service import offline_status_payload as verifier_will

PATHS = ("mqtt", "zmq", "bridge")
VERIFIER_SLOTS = 2
HEARTBEAT = 0.2  # ZMTP heartbeat of the test rigs: a silent peer is dropped after 0.6 s

BusFactory = Callable[[str, Will | None], Bus]


@dataclass
class Rig:
    """Bus factories for one transport path (client id, will -> unconnected bus)."""

    path: str
    topics: Topics
    verifier_bus: BusFactory
    device_bus: BusFactory
    bridge: Bridge | None = None
    # bridge path: the bridge's ZeroMQ side needs a verifier to connect to, so the
    # fleet starts it with the first verifier
    start_bridge: Callable[[], Awaitable[Bridge]] | None = None


def _mqtt(broker: Any, prefix: str) -> BusFactory:
    def make(client_id: str, will: Will | None) -> Bus:
        cid = f"{prefix}-{client_id}".replace("/", "-")
        return MqttBus(
            MqttSettings(
                host=broker.host,
                port=broker.port,
                client_id=cid,
                will=will,
                reconnect_min=0.05,
                reconnect_max=0.5,
            )
        )

    return make


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _ZmqSlots:
    """Ports for the rig's verifiers; device buses list them all (failover order)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.ports = [_free_port() for _ in range(VERIFIER_SLOTS)]
        self._next = 0

    def endpoints(self) -> tuple[str, ...]:
        return tuple(f"tcp://127.0.0.1:{p}" for p in self.ports)

    def verifier(self, client_id: str, will: Will | None) -> Bus:
        if self._next >= len(self.ports):
            raise RuntimeError(f"the rig has {len(self.ports)} verifier slots")
        port, self._next = self.ports[self._next], self._next + 1
        return ZmqServerBus(
            ZmqServerSettings(
                bind=f"tcp://127.0.0.1:{port}",
                server_id=f"{self.prefix}-{client_id}".replace("/", "-"),
                will=will,
                heartbeat=HEARTBEAT,
            )
        )

    def device(self, client_id: str, will: Will | None) -> Bus:
        return ZmqBus(
            ZmqSettings(
                endpoints=self.endpoints(),
                client_id=f"{self.prefix}-{client_id}".replace("/", "-"),
                will=will,
                heartbeat=HEARTBEAT,
                handshake_timeout=0.5,
                connect_timeout=30.0,
                reconnect_min=0.02,
                reconnect_max=0.5,
            )
        )


@contextlib.asynccontextmanager
async def open_rig(path: str, prefix: str, broker: Any | None) -> AsyncIterator[Rig]:
    """The rig of ``path``; ``broker`` (a running Mosquitto) is needed for mqtt and bridge."""
    topics = Topics(prefix)
    if path == "mqtt":
        yield Rig(path, topics, _mqtt(broker, prefix), _mqtt(broker, prefix))
        return
    slots = _ZmqSlots(prefix)
    if path == "zmq":
        yield Rig(path, topics, slots.verifier, slots.device)
        return
    if path != "bridge":
        raise ValueError(f"unknown path {path!r}")
    rig = Rig(path, topics, slots.verifier, _mqtt(broker, prefix))
    async with contextlib.AsyncExitStack() as stack:

        async def start_bridge() -> Bridge:
            m = await stack.enter_async_context(_mqtt(broker, prefix)("bridge", None))
            z = await stack.enter_async_context(slots.device("bridge", None))
            return await stack.enter_async_context(
                Bridge(m, z, prefix=prefix, bridge_id="conformance")
            )

        rig.start_bridge = start_bridge
        yield rig


class HandDevice:
    """One session driven message by message on the device side (duplicates, losses by hand)."""

    def __init__(
        self,
        bus: Bus,
        topics: Topics,
        session_id: str,
        prompt: Sequence[int],
        fingerprint: str,
        max_new_tokens: int = 16,
    ) -> None:
        self.bus, self.topics, self.session_id = bus, topics, session_id
        self.prompt, self.fingerprint, self.max_new = tuple(prompt), fingerprint, max_new_tokens
        self._sub: Subscription | None = None

    async def __aenter__(self) -> HandDevice:
        self._sub = await self.bus.subscribe(
            self.topics.session("hand", self.session_id, "verdict")
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._sub is not None:
            await self._sub.close()

    async def open(self, epoch: int, seq: int, committed: Sequence[int] = ()) -> Verdict:
        await self.bus.publish(
            self.topics.session("hand", self.session_id, "open"),
            OpenSession(
                session_id=self.session_id,
                device_id="hand",
                epoch=epoch,
                seq=seq,
                tokenizer=self.fingerprint,
                prompt=self.prompt,
                committed=tuple(committed),
                max_new_tokens=self.max_new,
            ).encode(),
            qos=1,
            content_type=CONTENT_MSGPACK,
        )
        return await self.verdict(seq)

    async def draft(self, epoch: int, seq: int, base: int, tokens: Sequence[int]) -> None:
        await self.bus.publish(
            self.topics.session("hand", self.session_id, "draft"),
            Draft(self.session_id, epoch, seq, base, tuple(tokens)).encode(),
            qos=1,
            content_type=CONTENT_MSGPACK,
        )

    async def verdict(self, seq: int, limit: float = 30.0) -> Verdict:
        """The next verdict answering ``seq`` (others are skipped)."""
        assert self._sub is not None
        async with asyncio.timeout(limit):
            while True:
                v = decode((await self._sub.get()).payload, expect=Verdict)
                if v.seq == seq:
                    return v

    async def verdicts(self, seq: int, settle: float = 0.5) -> list[Verdict]:
        """Every verdict answering ``seq`` until none arrives for ``settle`` seconds."""
        assert self._sub is not None
        out: list[Verdict] = []
        while True:
            try:
                v = decode((await self._sub.get(settle)).payload, expect=Verdict)
            except TimeoutError:
                return out
            if v.seq == seq:
                out.append(v)


class Fleet:
    """Verifiers, nodes and hand devices on one rig; every task and bus is stopped on exit."""

    def __init__(self, rig: Rig, stack: contextlib.AsyncExitStack) -> None:
        self.rig = rig
        self._stack = stack
        self._tasks: list[asyncio.Task[None]] = []
        self._verifier_tasks: dict[str, asyncio.Task[None]] = {}
        self._verifier_buses: dict[str, Bus] = {}

    async def bus(self, side: str, client_id: str, will: Will | None = None) -> Bus:
        make = self.rig.verifier_bus if side == "verifier" else self.rig.device_bus
        return await self._stack.enter_async_context(make(client_id, will))

    async def start_verifier(
        self, model: Any, fingerprint: str, verifier_id: str = "v1"
    ) -> VerifierService:
        t = self.rig.topics
        bus = await self.bus(
            "verifier",
            verifier_id,
            Will(t.verifier_status(verifier_id), verifier_will(verifier_id)),
        )
        verifier = VerifierService(
            bus,
            TargetEngine(model),
            tokenizer_fingerprint=fingerprint,
            config=VerifierConfig(verifier_id=verifier_id, prefix=t.prefix),
        )
        task = asyncio.create_task(verifier.run(), name=f"verifier-{verifier_id}")
        self._tasks.append(task)
        self._verifier_tasks[verifier_id] = task
        self._verifier_buses[verifier_id] = bus
        await asyncio.wait_for(verifier.ready.wait(), 30)
        if self.rig.start_bridge is not None and self.rig.bridge is None:
            self.rig.bridge = await self.rig.start_bridge()
        return verifier

    async def start_node(
        self,
        device_id: str,
        tokenizer: Any,
        fingerprint: str,
        factory: Callable[[], Drafter],
        session: SessionConfig,
    ) -> NodeService:
        t = self.rig.topics
        bus = await self.bus(
            "device", device_id, Will(t.device_status(device_id), device_will(device_id))
        )
        node = NodeService(
            bus,
            tokenizer=tokenizer,
            tokenizer_fp=fingerprint,
            drafter_factory=factory,
            drafter_name=device_id,
            config=NodeConfig(
                device_id=device_id, prefix=t.prefix, max_concurrent=8, session=session
            ),
        )
        self._tasks.append(asyncio.create_task(node.run(), name=f"node-{device_id}"))
        await asyncio.wait_for(node.ready.wait(), 30)
        return node

    async def hand(self, session_id: str, prompt: Sequence[int], fingerprint: str) -> HandDevice:
        bus = await self.bus("device", f"hand-{session_id}")
        return await self._stack.enter_async_context(
            HandDevice(bus, self.rig.topics, session_id, prompt, fingerprint)
        )

    async def kill_verifier(self, verifier_id: str) -> None:
        """End a verifier as a crash would: no status, no bye; its bus vanishes."""
        task = self._verifier_tasks.pop(verifier_id)
        self._tasks.remove(task)
        crash = getattr(self._verifier_buses.pop(verifier_id), "crash")  # noqa: B009
        crash()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        failed = [
            r
            for r in results
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)
        ]
        if failed:
            raise failed[0]


@contextlib.asynccontextmanager
async def fleet(rig: Rig) -> AsyncIterator[Fleet]:
    """A :class:`Fleet` whose services are cancelled and buses closed on exit."""
    async with contextlib.AsyncExitStack() as stack:
        f = Fleet(rig, stack)
        try:
            yield f
        finally:
            await f.stop()
