"""Simulated devices against verifiers over a real broker, with hooks for faults.

Each device is a real :class:`NodeService` on its own MQTT connection (through a
fault-injecting proxy or a fault-injecting bus where the test says so), so every
fault meets the production session loop, link and transport.  Usage::

    async with Fleet(host, port, prefix, devices, session=cfg, tokenizer=tok) as fleet:
        await fleet.start_verifier(InProcessVerifier(model, host, port, prefix))
        outcomes = await fleet.generate(jobs)          # faults run beside it

``fleet.chunks`` holds every text chunk each device's user saw (also while
offline), in order; :meth:`Fleet.progress` reads committed progress from them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from middleware.broker_bridge.bus import Will
from middleware.broker_bridge.mqtt import MqttBus, MqttSettings
from middleware.errors import ProtocolError
from middleware.nodes.drafters.base import Drafter
from middleware.nodes.service import NodeConfig, NodeService, Outcome
from middleware.nodes.service import offline_status_payload as device_will
from middleware.nodes.session import SessionConfig
from middleware.protocol import Result, SessionState, TextChunk, Topics, decode
from tests.faults.audit import COMMITTED_KINDS
from tests.faults.verifiers import TINY_FP, client_id


async def until(
    cond: Callable[[], bool], within: float, what: Callable[[], str] | str = ""
) -> None:
    """Poll ``cond`` until it holds; AssertionError after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {within} s: {what() if callable(what) else what}")
        await asyncio.sleep(0.02)


class Verifier(Protocol):
    verifier_id: str

    async def start(self, tg: asyncio.TaskGroup) -> Any: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    device_id: str
    drafter: Callable[[], Drafter]
    address: tuple[str, int] | None = None  # connect here (a proxy) instead of the broker
    bus: Callable[[MqttSettings], MqttBus] = MqttBus
    keepalive: int = 30
    connect_timeout: float = 30.0  # per attempt: TCP connect plus CONNACK
    max_concurrent: int = 8


@dataclass(frozen=True, slots=True)
class Job:
    device_id: str
    session_id: str
    prompt: tuple[int, ...]


@dataclass
class Watch:
    """What a bystander sees on the broker: text chunks (deduplicated by sequence number),
    retained results and session owners."""

    chunks: dict[str, dict[int, TextChunk]] = field(default_factory=lambda: defaultdict(dict))
    redelivered: int = 0  # QoS 1 duplicates of text chunks (same session and seq)
    results: dict[str, Result] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)


class Fleet:
    """Devices, their buses and node services, and the verifiers started for them."""

    def __init__(
        self,
        host: str,
        port: int,
        prefix: str,
        devices: Sequence[DeviceSpec],
        *,
        session: SessionConfig,
        tokenizer: Any,
        fingerprint: str = TINY_FP,
        watch: bool = False,
    ) -> None:
        self.host, self.port, self.prefix = host, port, prefix
        self.topics = Topics(prefix)
        self.specs = {d.device_id: d for d in devices}
        self.session = session
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.nodes: dict[str, NodeService] = {}
        self.buses: dict[str, MqttBus] = {}
        self.verifiers: list[Verifier] = []
        self.chunks: dict[str, list[TextChunk]] = defaultdict(list)
        self.watch = Watch() if watch else None
        self.tg: asyncio.TaskGroup | None = None
        self._stack = contextlib.AsyncExitStack()
        self._services: list[asyncio.Task[None]] = []

    # --- lifecycle ------------------------------------------------------------------
    async def __aenter__(self) -> Fleet:
        stack = self._stack
        if self.watch is not None:
            wbus = MqttBus(
                MqttSettings(
                    host=self.host,
                    port=self.port,
                    client_id=client_id(self.prefix, "watch"),
                    clean_start=False,
                    session_expiry=300,
                    reconnect_max=0.5,
                )
            )
            texts = await wbus.subscribe(self.topics.all_sessions("text"))
            states = await wbus.subscribe(self.topics.all_sessions("state"))
            results = await wbus.subscribe(self.topics.all_sessions("result"))
            await stack.enter_async_context(wbus)
        for d in self.specs.values():
            host, port = d.address or (self.host, self.port)
            bus = d.bus(
                MqttSettings(
                    host=host,
                    port=port,
                    client_id=client_id(self.prefix, d.device_id),
                    clean_start=False,
                    session_expiry=60,
                    keepalive=d.keepalive,
                    request_timeout=3.0,
                    reconnect_min=0.1,
                    reconnect_max=0.5,
                    connect_timeout=d.connect_timeout,
                    will=Will(
                        self.topics.device_status(d.device_id), device_will(d.device_id), delay=5.0
                    ),
                )
            )
            self.buses[d.device_id] = await stack.enter_async_context(bus)
            node = NodeService(
                bus,
                tokenizer=self.tokenizer,
                tokenizer_fp=self.fingerprint,
                drafter_factory=d.drafter,
                drafter_name=d.device_id,
                config=NodeConfig(
                    device_id=d.device_id,
                    prefix=self.prefix,
                    max_concurrent=d.max_concurrent,
                    session=self.session,
                ),
            )
            node.on_text = self._on_text
            self.nodes[d.device_id] = node
        self.tg = await stack.enter_async_context(asyncio.TaskGroup())
        stack.push_async_callback(self._stop_all)
        if self.watch is not None:
            self._services.append(self.tg.create_task(self._watch_text(texts), name="watch-text"))
            self._services.append(
                self.tg.create_task(self._watch_state(states), name="watch-state")
            )
            self._services.append(
                self.tg.create_task(self._watch_results(results), name="watch-results")
            )
        for did, node in self.nodes.items():
            self._services.append(self.tg.create_task(node.run(), name=f"node-{did}"))
        for node in self.nodes.values():
            await asyncio.wait_for(node.ready.wait(), 30)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.__aexit__(*exc)  # type: ignore[arg-type]

    async def _stop_all(self) -> None:
        for t in self._services:
            t.cancel()
        for v in self.verifiers:
            with contextlib.suppress(Exception):
                await v.stop()

    async def start_verifier(self, v: Verifier) -> Any:
        assert self.tg is not None, "use the fleet as an async context manager"
        self.verifiers.append(v)
        return await v.start(self.tg)

    # --- generation -----------------------------------------------------------------
    async def generate(self, jobs: Sequence[Job], within: float = 240.0) -> list[Outcome]:
        """Run jobs concurrently; if they take longer than ``within`` s, say which got how far."""
        runs = [
            self.nodes[j.device_id].generate_ids(j.prompt, session_id=j.session_id) for j in jobs
        ]
        try:
            return list(await asyncio.wait_for(asyncio.gather(*runs), within))
        except TimeoutError:
            state = {j.session_id: self.progress(j.session_id) for j in jobs}
            raise AssertionError(
                f"sessions did not finish in {within} s; progress {state}"
            ) from None

    def _on_text(self, chunk: TextChunk) -> None:
        self.chunks[chunk.session_id].append(chunk)

    def progress(self, session_id: str) -> int:
        """Committed tokens the session's user has seen so far."""
        return max(
            (
                c.pos + c.n_tokens
                for c in self.chunks.get(session_id, ())
                if c.kind in COMMITTED_KINDS
            ),
            default=0,
        )

    def finished(self, session_id: str) -> bool:
        return any(c.final for c in self.chunks.get(session_id, ()))

    async def wait_progress(
        self,
        tokens: int,
        sessions: Sequence[str],
        within: float = 120.0,
        *,
        any_session: bool = False,
    ) -> None:
        """Until every listed session (or, with ``any_session``, one of them) has ``tokens``
        committed tokens or has finished."""
        done = any if any_session else all
        await until(
            lambda: done(self.progress(s) >= tokens or self.finished(s) for s in sessions),
            within,
            lambda: f"progress to {tokens} tokens: { {s: self.progress(s) for s in sessions} }",
        )

    # --- bystander ------------------------------------------------------------------
    async def _watch_text(self, sub: Any) -> None:
        assert self.watch is not None
        async for msg in sub:
            try:
                c = decode(msg.payload, expect=TextChunk)
            except ProtocolError:
                continue
            seen = self.watch.chunks[c.session_id]
            if c.seq in seen:
                self.watch.redelivered += 1
            seen[c.seq] = c

    async def _watch_state(self, sub: Any) -> None:
        assert self.watch is not None
        async for msg in sub:
            with contextlib.suppress(ProtocolError):
                st = decode(msg.payload, expect=SessionState)
                self.watch.owners[st.session_id] = st.owner

    async def _watch_results(self, sub: Any) -> None:
        assert self.watch is not None
        async for msg in sub:
            with contextlib.suppress(ProtocolError):
                r = decode(msg.payload, expect=Result)
                self.watch.results[r.session_id] = r

    async def bus_caught_up(self, sessions: Sequence[str], within: float = 30.0) -> bool:
        """Wait until the bystander has every chunk each session's user saw."""
        assert self.watch is not None
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if all(
                len(self.watch.chunks.get(s, {})) >= len(self.chunks.get(s, ())) for s in sessions
            ):
                return True
            await asyncio.sleep(0.05)
        return False

    def bus_chunks(self, session_id: str) -> list[TextChunk]:
        assert self.watch is not None
        seen = self.watch.chunks.get(session_id, {})
        return [seen[k] for k in sorted(seen)]
