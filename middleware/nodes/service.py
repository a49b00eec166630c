"""The device node service: prompts in, sessions run, text and results out.

Tasks (one TaskGroup, named): ``link`` (verdict routing), ``inbox`` (prompts
from ``device/{id}/inbox`` in JSON or plain text), ``text`` (publishes text
chunks in order), ``status`` (retained presence with acceptance figures; the
MQTT last will marks the device offline), and one task per session.

A session that fails (the verifier refused it: its limits, a tokenizer mismatch; or it
became unreachable with offline mode off) ends with a retained failed result
(``verified: false``, ``fin: refused|failed``, ``error``: why) and a log line, and the
node keeps serving: one prompt must not take a device's other sessions down.  Anything
else escaping a task is a bug: it ends the TaskGroup, and ``mw-cli node`` exits non-zero
so systemd's ``Restart=on-failure`` restarts it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from middleware.broker_bridge.bus import CONTENT_JSON, Bus, Subscription
from middleware.errors import (
    MiddlewareError,
    ProtocolError,
    PublishUnconfirmed,
    SessionError,
    SessionRefused,
)
from middleware.nodes.drafters.base import Drafter
from middleware.nodes.journal import Journal, JournalEntry
from middleware.nodes.link import BusLink
from middleware.nodes.metrics import DeviceMetrics
from middleware.nodes.session import DeviceSession, SessionConfig
from middleware.nodes.text import TextStream
from middleware.protocol import (
    DeviceStatus,
    OpenSession,
    PromptRequest,
    Result,
    TextChunk,
    Topics,
)
from middleware.protocol.homeassistant import device_configs
from middleware.protocol.session import session_instance
from middleware.protocol.topics import DEFAULT_PREFIX

log = structlog.get_logger("middleware.node")

OUTCOMES_KEPT = 256  # NodeService.outcomes keeps the latest ones only

# What ends one session, not the node (ProtocolError: a prompt or setting the wire format
# refuses, e.g. a prompt beyond the context limit).
SESSION_FAILURES = (SessionError, ProtocolError)


# Text chunks at QoS 2: a chunk whose PUBACK was lost with the connection is re-sent by
# the client after the reconnect, and at QoS 1 the broker forwards that copy again (the
# same seq twice on the topic; a Node-RED flow showed the text twice).  At QoS 2 the broker
# forwards it once, so a dashboard subscribing at QoS 2 gets each chunk exactly once with
# no code of its own.  Cost: one more round trip per chunk, off the decode loop's path.
TEXT_QOS = 2
RETAINED_EXPIRY_S = 86_400.0  # MQTT 5 message expiry of retained results: the store stays bounded


@dataclass(frozen=True, slots=True)
class NodeConfig:
    device_id: str = "device-1"
    prefix: str = DEFAULT_PREFIX
    max_concurrent: int = 4
    status_interval: float = 5.0
    ha_discovery: bool = True  # retained Home Assistant discovery configs under homeassistant/
    session: SessionConfig = field(default_factory=SessionConfig)
    retained_expiry: float = RETAINED_EXPIRY_S  # seconds; 0: retained results never expire
    # Unfinished sessions older than this are ended with a failed result on start, not resumed.
    resume_max_age: float = 86_400.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one generation produced."""

    session_id: str
    tokens: tuple[int, ...]
    text: str
    finish_reason: str
    stats: dict[str, float]


def encode_prompt(tokenizer: Any, prompt: str, chat: bool = True) -> list[int]:
    """Prompt text to token ids, through the chat template when the tokenizer has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if hasattr(out, "keys") and "input_ids" in out:
            out = out["input_ids"]
        return [int(t) for t in out]
    return [int(t) for t in tokenizer.encode(prompt)]


def stop_ids_of(tokenizer: Any) -> tuple[int, ...]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list | tuple) else (int(eos),)


class NodeService:
    """A device: one drafter kind, many sessions, one bus."""

    def __init__(
        self,
        bus: Bus,
        *,
        tokenizer: Any,
        tokenizer_fp: str,
        drafter_factory: Callable[[], Drafter],
        drafter_name: str,
        config: NodeConfig | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.bus = bus
        # Unfinished sessions and recent results, across node restarts when it has a path.
        self.journal = journal or Journal()
        self.tokenizer = tokenizer
        self.fingerprint = tokenizer_fp
        self.drafter_factory = drafter_factory
        self.drafter_name = drafter_name
        self.config = config or NodeConfig()
        self.topics = Topics(self.config.prefix)
        self.link = BusLink(bus, self.topics, self.config.device_id)
        self.ready = asyncio.Event()
        # The latest outcomes only: a node runs for months, one Outcome per session would pile up.
        self.outcomes: deque[Outcome] = deque(maxlen=OUTCOMES_KEPT)
        self.sessions_done = 0
        self.sessions_failed = 0
        self.active: set[str] = set()
        self.republished = 0  # results republished from the journal after (re)connects
        self._inbox_sub: Subscription | None = None
        self._text: asyncio.Queue[TextChunk | Result] = asyncio.Queue()
        self._slots = asyncio.Semaphore(self.config.max_concurrent)
        self._tg: asyncio.TaskGroup | None = None
        self._totals = {
            "proposed": 0.0,
            "accepted": 0.0,
            "rounds": 0.0,
            "tokens": 0.0,
            "elapsed_s": 0.0,
        }
        # Local delivery of every text chunk as it is produced (a local UI, a test), also
        # while the bus is down: provisional text reaches the user even offline.
        self.on_text: Callable[[TextChunk], None] | None = None
        self.metrics = DeviceMetrics()  # served only when [node] metrics_port is set

    async def subscribe_inbox(self) -> None:
        """Register the inbox subscription; call it *before* the bus connects.

        A persistent MQTT session gets the QoS 1 prompts queued while the node was
        down right after CONNACK; a subscription made after connecting would come too
        late and the bus would drop them (no subscription matched).  Idempotent;
        ``run`` calls it too (then it is registered after connecting)."""
        if self._inbox_sub is None:
            self._inbox_sub = await self.bus.subscribe(
                self.topics.device_inbox(self.config.device_id)
            )

    async def run(self) -> None:
        """Serve the inbox until cancelled."""
        link_ready = asyncio.Event()
        await self.subscribe_inbox()
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            tasks = [
                tg.create_task(self.link.run(link_ready), name="link"),
                tg.create_task(self._publish_text(), name="text"),
            ]
            await link_ready.wait()
            inbox = self._inbox_sub
            await self._publish_status("online")
            if self.config.ha_discovery:
                await self.publish_discovery()
            tasks.append(tg.create_task(self._inbox(inbox), name="inbox"))
            tasks.append(tg.create_task(self._status_loop(), name="status"))
            tasks.append(tg.create_task(self._republish_results(), name="republish"))
            self._resume_unfinished()
            self.ready.set()
            log.info("node_ready", device=self.config.device_id, drafter=self.drafter_name)
            # Wait here, not in the TaskGroup's __aexit__: on Python 3.11 a task failing
            # while the parent waits there leaves the caller's task with a stray
            # cancellation request (see middleware.cli.services.until_done).
            await asyncio.wait(tasks)

    def submit(
        self,
        prompt: str,
        *,
        session_id: str | None = None,
        max_new_tokens: int | None = None,
        chat: bool = True,
    ) -> asyncio.Future[Outcome]:
        """Start a generation in the service's task group (the service must be running).

        The future holds the Outcome, or the session's failure (a SESSION_FAILURES error,
        after its failed result was published); a failure never ends the service."""
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._start(prompt, session_id, max_new_tokens, chat, fut)
        return fut

    def _start(
        self,
        prompt: str,
        session_id: str | None,
        max_new_tokens: int | None,
        chat: bool,
        fut: asyncio.Future[Outcome] | None,
        request_id: str = "",
    ) -> None:
        if self._tg is None:
            raise RuntimeError("NodeService.run() is not running")
        sid = session_id or f"{self.config.device_id}-{uuid.uuid4().hex[:8]}"
        self._tg.create_task(
            self._guarded(
                self.generate(
                    prompt,
                    session_id=sid,
                    max_new_tokens=max_new_tokens,
                    chat=chat,
                    request_id=request_id,
                ),
                fut,
            ),
            name=f"session-{sid}",
        )

    @staticmethod
    async def _guarded(
        run: Coroutine[Any, Any, Outcome], fut: asyncio.Future[Outcome] | None
    ) -> None:
        """Run one session inside the TaskGroup: its failure goes to ``fut`` (already logged
        and published as a failed result), never into the group."""
        try:
            outcome = await run
        except SESSION_FAILURES as exc:
            if fut is not None and not fut.done():
                fut.set_exception(exc)
            return
        except BaseException:
            if fut is not None:
                fut.cancel()
            raise
        if fut is not None and not fut.done():
            fut.set_result(outcome)

    async def generate(
        self,
        prompt: str,
        *,
        session_id: str,
        max_new_tokens: int | None = None,
        chat: bool = True,
        request_id: str = "",
    ) -> Outcome:
        """Run one session to the end; text chunks and the result go to the bus."""
        ids = encode_prompt(self.tokenizer, prompt, chat)
        return await self.generate_ids(
            ids, session_id=session_id, max_new_tokens=max_new_tokens, request_id=request_id
        )

    async def generate_ids(
        self,
        prompt_ids: Sequence[int],
        *,
        session_id: str,
        max_new_tokens: int | None = None,
        request_id: str = "",
        resume: JournalEntry | None = None,
    ) -> Outcome:
        """One generation; ``resume`` continues an unfinished one from the journal (its
        nonce, so the same instance, and its committed tokens as the claim)."""
        cfg = self.config.session
        if resume is not None:
            cfg = replace(
                cfg,
                sampling=resume.sampling,
                max_new_tokens=resume.max_new_tokens,
                stop_ids=resume.stop_ids,
            )
            prompt_ids, request_id = resume.prompt, resume.request_id
        if not cfg.stop_ids:
            cfg = replace(cfg, stop_ids=stop_ids_of(self.tokenizer))
        if max_new_tokens and resume is None:
            cfg = replace(cfg, max_new_tokens=max_new_tokens)
        if session_id in self.active:
            # Two generations under one id on one device would share one verdict queue.
            exc = SessionRefused(
                "session id in use on this device",
                reason="session id in use",
                session_id=session_id,
            )
            self._fail_result(session_id, "", request_id, "", 0, {}, False, exc, journal=False)
            raise exc
        async with self._slots:
            committed = resume.committed if resume is not None else ()
            shown = min(resume.text_pos, len(committed)) if resume is not None else 0
            stream = TextStream(
                self.tokenizer,
                session_id,
                self.config.device_id,
                self._emit,
                committed=committed[:shown],
                seq=resume.text_seq if resume is not None else 0,
            )
            drafter = await asyncio.to_thread(self.drafter_factory)
            session = DeviceSession(
                session_id=session_id,
                device_id=self.config.device_id,
                prompt=prompt_ids,
                tokenizer_fp=self.fingerprint,
                drafter=drafter,
                link=self.link,
                sink=stream,
                config=cfg,
                nonce=resume.nonce if resume is not None else None,
                committed=committed,
                tag=resume.tag if resume is not None else "",
                epoch=resume.epoch if resume is not None else 0,
            )
            stream.instance = session.instance
            if shown < len(committed):
                # Committed before the restart, text not acknowledged by the broker: it may
                # or may not have reached it, so it goes again as a correction from there
                # (a consumer that saw it replaces it with the same text).
                stream.committed(shown, committed[shown:], "correction")
            session.request_id = request_id  # type: ignore[attr-defined]
            if resume is None:
                self.journal.begin(
                    JournalEntry(
                        session_id=session_id,
                        nonce=session.nonce,
                        prompt=tuple(prompt_ids),
                        sampling=cfg.sampling,
                        max_new_tokens=cfg.max_new_tokens,
                        stop_ids=cfg.stop_ids,
                        request_id=request_id,
                    )
                )
            session.on_progress = lambda s: self.journal.progress(
                s.session_id, s.committed, s.tag, s.epoch
            )
            session.stats.observe = self.metrics.observe
            self.active.add(session_id)
            self.metrics.active.set(len(self.active))
            await self.link.attach(session_id)
            try:
                tokens = await session.run()
            except SESSION_FAILURES as exc:
                self._failed(session, stream, exc, request_id)
                raise
            finally:
                self.active.discard(session_id)
                self.metrics.active.set(len(self.active))
                await self.link.detach(session_id)
            stats = session.stats.as_dict(len(tokens))
            for k in ("proposed", "accepted", "rounds"):
                self._totals[k] += stats[k]
            self._totals["tokens"] += len(tokens)
            self._totals["elapsed_s"] += stats["elapsed_s"]
            self.metrics.session_done(stats)
            outcome = Outcome(session_id, tuple(tokens), stream.text, session.finish_reason, stats)
            self.outcomes.append(outcome)
            self.sessions_done += 1
            self._result(
                Result(
                    session_id=session_id,
                    device_id=self.config.device_id,
                    text=outcome.text,
                    n_tokens=len(tokens),
                    finish_reason=outcome.finish_reason,
                    verified=True,
                    stats=stats,
                    lossy=stream.lossy,
                    instance=session.instance,
                    request=request_id,
                )
            )
            log.info(
                "session_done",
                session=session_id,
                tokens=len(tokens),
                acceptance=round(stats["acceptance_rate"], 3),
                tps=round(stats["tokens_per_s"], 1),
                resumed=resume is not None,
            )
            return outcome

    def _result(self, r: Result) -> None:
        """Journal the result (it replaces the session's resume state) and queue it."""
        self.journal.finish(r.session_id, r.encode())
        self._text.put_nowait(r)

    def _failed(
        self, session: DeviceSession, stream: TextStream, exc: Exception, request_id: str = ""
    ) -> None:
        """Log a failed session and queue its retained failed result (the outcome a waiting
        ``mw-cli generate`` or dashboard gets instead of only a timeout)."""
        committed = len(session.committed)
        self._fail_result(
            session.session_id,
            stream.text,
            request_id,
            session.instance,
            committed,
            session.stats.as_dict(committed),
            stream.lossy,
            exc,
        )

    def _fail_result(
        self,
        session_id: str,
        text: str,
        request_id: str,
        instance: str,
        committed: int,
        stats: dict[str, float],
        lossy: bool,
        exc: Exception,
        *,
        journal: bool = True,
    ) -> None:
        """``journal=False``: the session id belongs to another running session here, whose
        journal entry must stay (its own result replaces this one on the topic later)."""
        refused = isinstance(exc, SessionRefused)
        finish = "refused" if refused else "failed"
        self.sessions_failed += 1
        log.warning(
            "session_failed",
            session=session_id,
            finish_reason=finish,
            error=str(exc)[:500],
            tokens=committed,
        )
        (self._result if journal else self._text.put_nowait)(
            Result(
                session_id=session_id,
                device_id=self.config.device_id,
                text=text,
                n_tokens=committed,
                finish_reason=finish,
                verified=False,
                stats=stats,
                lossy=lossy,
                error=str(exc)[:4096] or type(exc).__name__,
                instance=instance,
                request=request_id,
            )
        )

    def _resume_unfinished(self) -> None:
        """On start: resume the journal's unfinished sessions (same nonce, their committed
        tokens as the claim the verifier proves), or end those too old with a failed result."""
        now = time.time()
        for e in self.journal.unfinished():
            if now - e.started_at > self.config.resume_max_age:
                instance = session_instance(
                    OpenSession(
                        e.session_id,
                        self.config.device_id,
                        0,
                        0,
                        self.fingerprint,
                        e.prompt,
                        sampling=e.sampling,
                        max_new_tokens=e.max_new_tokens,
                        stop_ids=e.stop_ids,
                        nonce=e.nonce,
                    )
                )
                self._fail_result(
                    e.session_id,
                    self.tokenizer.decode(list(e.committed), skip_special_tokens=True),
                    e.request_id,
                    instance,
                    len(e.committed),
                    {},
                    False,
                    SessionError("node restarted; session too old to resume"),
                )
                continue
            log.info("session_resuming", session=e.session_id, committed=len(e.committed))
            assert self._tg is not None
            self._tg.create_task(
                self._guarded(self.generate_ids(e.prompt, session_id=e.session_id, resume=e), None),
                name=f"session-{e.session_id}",
            )

    # --- tasks -------------------------------------------------------------------
    async def _inbox(self, sub: Any) -> None:
        async for msg in sub:
            try:
                req = PromptRequest.parse(msg.payload)
            except ProtocolError as exc:
                log.warning("prompt_rejected", error=str(exc)[:200])
                continue
            self._start(
                req.prompt, req.session_id, req.max_new_tokens, req.chat, None, req.request_id
            )

    async def _publish_text(self) -> None:
        """Publish text chunks and results in order; while the link is down, wait and retry
        (text released offline reaches the topic once the link is back, still in order)."""
        while True:
            item = await self._text.get()
            topic = self.topics.session(
                item.device_id, item.session_id, "result" if isinstance(item, Result) else "text"
            )
            delay = 0.1
            if isinstance(item, TextChunk):
                self.journal.sending(item.session_id, item.seq)
            while True:
                try:
                    is_result = isinstance(item, Result)
                    await self.bus.publish(
                        topic,
                        item.encode(),
                        qos=1 if is_result else TEXT_QOS,
                        retain=is_result,
                        content_type=CONTENT_JSON,
                        expiry=self._expiry() if is_result else None,
                    )
                    if isinstance(item, TextChunk) and item.kind != "provisional":
                        self.journal.published(item.session_id, item.pos + item.n_tokens)
                    break
                except PublishUnconfirmed as exc:
                    # The transport holds it and sends it after the reconnect: publishing it
                    # again put the same chunk (same seq) on the topic twice.
                    log.warning("text_publish_unconfirmed", topic=topic, error=str(exc))
                    break
                except MiddlewareError as exc:
                    log.warning("text_publish_retry", topic=topic, error=str(exc), retry_in=delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
            self._text.task_done()

    def _expiry(self, age: float = 0.0) -> float | None:
        """MQTT 5 message expiry of a retained result published ``age`` seconds after it was
        made (None: the configured expiry is 0, never)."""
        if not self.config.retained_expiry:
            return None
        return max(1.0, self.config.retained_expiry - age)

    async def _republish_results(self) -> None:
        """After each (re)connect, publish the journal's recent results again (retained).

        A broker killed before its autosave loses retained messages written in the last
        seconds (Mosquitto: 1 s in development, 5 s in production); the device's journal
        is the system of record.  Idempotent: a retained message replaces itself.  The
        bus counts its reconnects (a drop and reconnect can take 0.1 s, too short to be
        seen as a cleared ``connected`` event), checked every 0.5 s; a transport without
        them (in-memory) gets the results once."""
        connected = getattr(self.bus, "connected", None)
        done = -1  # the reconnect count whose connection got the results
        while True:
            if connected is not None:
                await connected.wait()
            count = int(getattr(self.bus, "reconnects", 0))
            if count != done and await self._republish_once():
                done = count
            if connected is None:
                return
            await asyncio.sleep(0.5)

    async def _republish_once(self) -> bool:
        now = time.time()
        for stored in self.journal.results(now):
            age = now - stored.finished_at
            if self.config.retained_expiry and age >= self.config.retained_expiry:
                continue
            try:
                await self.bus.publish(
                    self.topics.session(self.config.device_id, stored.session_id, "result"),
                    stored.payload,
                    qos=1,
                    retain=True,
                    content_type=CONTENT_JSON,
                    expiry=self._expiry(age),
                )
            except MiddlewareError as exc:
                log.warning("result_republish_failed", error=str(exc))
                return False
            self.republished += 1
        return True

    async def flush(self) -> None:
        """Wait until every queued text chunk and result is published: ``mw-cli node
        --prompt`` without ``--serve`` stops only after its results are out."""
        await self._text.join()

    def _emit(self, item: TextChunk) -> None:
        self._text.put_nowait(item)
        if self.on_text is not None:
            self.on_text(item)

    def status(self, state: str = "online") -> DeviceStatus:
        t = self._totals
        stats = {
            "acceptance_rate": t["accepted"] / t["proposed"] if t["proposed"] else 0.0,
            "mean_accepted": t["accepted"] / t["rounds"] if t["rounds"] else 0.0,
            "sessions_done": float(self.sessions_done),
            "sessions_failed": float(self.sessions_failed),
            "tokens": t["tokens"],
            "tokens_per_s": t["tokens"] / t["elapsed_s"] if t["elapsed_s"] else 0.0,
        }
        return DeviceStatus(
            device_id=self.config.device_id,
            state=state,  # type: ignore[arg-type]
            drafter=self.drafter_name,
            tokenizer=self.fingerprint,
            sessions=tuple(sorted(self.active))[:64],
            stats=stats,
            at=time.time(),
        )

    async def _publish_status(self, state: str) -> None:
        await self.bus.publish(
            self.topics.device_status(self.config.device_id),
            self.status(state).encode(),
            qos=1,
            retain=True,
            content_type=CONTENT_JSON,
        )

    async def publish_discovery(self) -> None:
        """Retained Home Assistant discovery configs (see middleware/protocol/homeassistant)."""
        for topic, payload in device_configs(self.topics, self.config.device_id, self.drafter_name):
            await self.bus.publish(topic, payload, qos=1, retain=True, content_type=CONTENT_JSON)

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.status_interval)
            try:
                await self._publish_status("online")
            except MiddlewareError as exc:
                log.warning("status_publish_failed", error=str(exc))


def offline_status_payload(device_id: str) -> bytes:
    """The last-will payload: this device is gone."""
    return DeviceStatus(device_id=device_id, state="offline").encode()
