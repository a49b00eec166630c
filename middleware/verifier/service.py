"""The verifier service: bus in, batches through the target engine, verdicts out.

Tasks (one TaskGroup, named): ``receive`` (decode, validate, triage, enqueue),
``batch`` (micro-batch, verify in a worker thread, publish verdicts and the
retained state) and ``status`` (retained heartbeat; the MQTT last will marks
the verifier offline when it dies).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field

import structlog

from middleware.broker_bridge.bus import (
    CONTENT_JSON,
    CONTENT_MSGPACK,
    Bus,
    BusMessage,
    Subscription,
)
from middleware.errors import BusError, ProtocolError, TopicError
from middleware.metrics import (
    BATCH_BUCKETS,
    LATENCY_BUCKETS,
    SECONDS_BUCKETS,
    TOKEN_BUCKETS,
    Registry,
)
from middleware.protocol import (
    DEFAULT_LIMITS,
    CloseSession,
    Draft,
    Limits,
    OpenSession,
    Topics,
    Verdict,
    VerifierStatus,
    decode,
)
from middleware.protocol.session import VERDICT_KINDS, trace_id
from middleware.protocol.topics import DEFAULT_SHARE_GROUP
from middleware.verifier.acceptance import RelaxedAcceptance
from middleware.verifier.batcher import BatchConfig, Batcher, Pending
from middleware.verifier.control import Controller
from middleware.verifier.engine import TargetEngine, VerifyItem
from middleware.verifier.planner import JointPlanner, PlannerConfig
from middleware.verifier.rounds import RoundInput, RoundResult, run_round
from middleware.verifier.sessions import VerifierSession, triage

log = structlog.get_logger("middleware.verifier")

DRAFT_EXPIRY_S = 30.0
ACTIVE_WINDOW_S = 2.0


@dataclass(frozen=True, slots=True)
class VerifierConfig:
    verifier_id: str = "verifier-1"
    prefix: str = "mw/v1"
    share_group: str = DEFAULT_SHARE_GROUP
    batch: BatchConfig = field(default_factory=BatchConfig)
    max_draft: int = 64
    max_sessions: int = 1024
    max_sessions_per_device: int = 64  # one device cannot take the whole verifier
    # Sessions with no message for this long are dropped (their device, if it comes back,
    # is answered ``resync`` and re-opens with its committed tokens: nothing is lost).
    # 0 disables.  Without it, abandoned sessions would pile up to ``max_sessions``.
    session_idle_timeout: float = 900.0
    # exclusive: the only verifier on this prefix.  It subscribes to every session's drafts
    # and answers drafts of sessions it does not know with ``resync``, so devices recover at
    # once after a verifier restart.  Several verifiers (scale-out) set it False: each then
    # subscribes only to the sessions it claimed through the shared open subscription and
    # stays silent about the others; devices recover through timeouts and last wills.
    exclusive: bool = True
    status_interval: float = 5.0
    # The retained session state is published when a session opens or finishes and, while
    # it runs, at most every ``state_interval`` seconds (0: after every round).  It is the
    # recovery point, not the verdict: a device holds every committed token it was told,
    # and a lagging state only means a re-opening device is answered with ``catchup``.
    state_interval: float = 0.05
    # Opt-in, LOSSY: relaxed acceptance for greedy sessions (None = off, the default).  Output
    # then differs from the target model alone; every verdict, text chunk and result of such
    # a session says ``lossy: true`` and mw_verifier_relaxed_tokens_total counts the tokens.
    relaxed: RelaxedAcceptance | None = None
    limits: Limits = DEFAULT_LIMITS


# Known refusal reasons, pre-initialised so alert rules see a 0 series from the start.
REJECT_REASONS = (
    "malformed",
    "bad_topic",
    "foreign_session",
    "tokenizer_mismatch",
    "token_out_of_range",
    "session_taken",
    "stale_epoch",
    "too_many_sessions",
    "device_session_limit",
    "queue_full",
    "verify_failed",
)


class VerifierMetrics:
    """The verifier's Prometheus metrics, named in one place."""

    def __init__(self, registry: Registry) -> None:
        r = registry
        self.registry = r
        self.rounds = r.counter(
            "mw_verifier_rounds_total", "Verify rounds (one per draft verified)"
        )
        self.forwards = r.counter("mw_verifier_forward_passes_total", "Target forward passes")
        self.proposed = r.counter(
            "mw_verifier_draft_tokens_total", "Draft tokens received for verification"
        )
        self.accepted = r.counter("mw_verifier_accepted_tokens_total", "Draft tokens accepted")
        self.committed = r.counter("mw_verifier_committed_tokens_total", "Tokens committed")
        self.rejected = r.counter(
            "mw_verifier_rejected_messages_total",
            "Messages refused, by reason",
            ("reason",),
            ({"reason": k} for k in REJECT_REASONS),
        )
        self.answers = r.counter(
            "mw_verifier_answers_total",
            "Verdicts by kind",
            ("kind",),
            ({"kind": k} for k in VERDICT_KINDS),
        )
        self.batch_size = r.histogram(
            "mw_verifier_batch_size", "Drafts per forward pass", BATCH_BUCKETS
        )
        self.accepted_len = r.histogram(
            "mw_verifier_accepted_length", "Accepted draft tokens per round", TOKEN_BUCKETS
        )
        self.tokens_per_round = r.histogram(
            "mw_verifier_tokens_per_round", "Committed tokens per round", TOKEN_BUCKETS
        )
        self.queue_wait = r.histogram(
            "mw_verifier_queue_wait_seconds", "Arrival to forward start", LATENCY_BUCKETS
        )
        self.forward_time = r.histogram(
            "mw_verifier_forward_seconds", "Forward pass duration", SECONDS_BUCKETS
        )
        self.sessions = r.gauge("mw_verifier_live_sessions", "Sessions owned by this verifier")
        # A counter (it only grows); exported as mw_verifier_kv_evictions_total.
        self.evictions = r.counter(
            "mw_verifier_kv_evictions", "KV caches evicted under the memory budget"
        )
        self._evictions_seen = 0
        self.relaxed = r.counter(
            "mw_verifier_relaxed_tokens_total",
            "LOSSY relaxed mode: accepted tokens the target would not have chosen",
        )
        self.lossy = r.gauge("mw_verifier_lossy_mode", "1 when relaxed (lossy) acceptance is on")
        self.expired = r.counter("mw_verifier_sessions_expired_total", "Sessions dropped as idle")
        self.capped = r.counter(
            "mw_verifier_capped_draft_tokens_total",
            "Draft tokens past the planned policy's verify cap (not verified)",
        )


class VerifierService:
    """Owns sessions, feeds the engine, answers devices.  Run with :meth:`run`."""

    def __init__(
        self,
        bus: Bus,
        engine: TargetEngine,
        *,
        tokenizer_fingerprint: str,
        model_name: str = "",
        config: VerifierConfig | None = None,
        registry: Registry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bus = bus
        self.engine = engine
        self.fingerprint = tokenizer_fingerprint
        self.model_name = model_name
        self.config = config or VerifierConfig()
        self.topics = Topics(self.config.prefix)
        self.metrics = VerifierMetrics(registry or Registry())
        self.metrics.lossy.set(1.0 if self.config.relaxed is not None else 0.0)
        if self.config.relaxed is not None:
            log.warning(
                "relaxed_acceptance_on_output_is_lossy",
                ratio=self.config.relaxed.ratio,
                confidence=self.config.relaxed.confidence,
            )
        self.sessions: dict[str, VerifierSession] = {}
        self.ready = asyncio.Event()
        self._clock = clock
        self._drafts: Subscription | None = None
        # Speculation control (batch policy "planned"): latency model + joint planner.
        self.control: Controller | None = None
        if self.config.batch.policy == "planned":
            self.control = Controller(
                JointPlanner(
                    PlannerConfig(
                        max_batch=self.config.batch.max_batch,
                        max_wait_s=self.config.batch.window,
                        k_max=min(16, self.config.max_draft),
                    )
                )
            )
        self._batcher: Batcher[Draft] = Batcher(
            self.config.batch,
            self._expected_senders,
            self._decide if self.control is not None else None,
        )
        self._closing: list[str] = []
        self._newer: dict[str, Draft] = {}  # resends that arrived while the first copy was queued
        self._dirty: dict[str, VerifierSession] = {}  # sessions whose state is not yet published

    # --- lifecycle -------------------------------------------------------------
    async def run(self) -> None:
        """Serve until cancelled."""
        t = self.topics
        async with (
            self.bus.subscribe(t.shared_open(self.config.share_group)) as opens,
            self.bus.subscribe(t.all_sessions("draft") if self.config.exclusive else "") as drafts,
        ):
            self._drafts = drafts
            if self.control is not None:
                await self._calibrate()
            await self._publish_status("online")
            self.ready.set()
            log.info("verifier_ready", verifier=self.config.verifier_id, model=self.model_name)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._receive(opens), name="receive-open")
                tg.create_task(self._receive(drafts), name="receive-draft")
                tg.create_task(self._batch_loop(), name="batch")
                tg.create_task(self._status_loop(), name="status")
                if self.config.state_interval > 0:
                    tg.create_task(self._state_loop(), name="state")
                if self.config.session_idle_timeout > 0:
                    tg.create_task(self._expire_loop(), name="expire")

    def _decide(
        self, waiting: Sequence[Pending[Draft]], now: float
    ) -> tuple[Collection[str], float]:
        assert self.control is not None
        idle = (sid for sid, s in self.sessions.items() if not s.pending and not s.done)
        return self.control.decide(waiting, now, idle)

    async def _calibrate(self) -> None:
        """Time the target's forward for a few batch shapes before serving (planned policy)."""
        assert self.control is not None
        try:
            coef = await asyncio.to_thread(self.control.calibrate, self._measure_forward)
        except Exception as exc:  # the online fit takes over; never fatal
            log.warning("forward_calibration_failed", error=repr(exc)[:200])
            return
        log.info(
            "forward_calibrated",
            a_ms=round(coef.a * 1e3, 3),
            b_ms=round(coef.b * 1e3, 3),
            c_ms=round(coef.c * 1e3, 3),
        )

    def _measure_forward(self, rows: int, tokens: int) -> float:
        """Seconds of one verify forward of ``rows`` rows of ``tokens`` tokens (warm caches)."""
        items = [
            VerifyItem(("__calibrate__", i), [1] * 8, [1] * max(tokens - 1, 0)) for i in range(rows)
        ]
        try:
            self.engine.verify_batch(items)  # prefill, so the timed pass is a verify pass
            t0 = time.perf_counter()
            self.engine.verify_batch(items)
            return time.perf_counter() - t0
        finally:
            for it in items:
                self.engine.close(it.session_key)

    def _expected_senders(self) -> int:
        now = self._clock()
        return sum(
            1
            for s in self.sessions.values()
            if not s.done and now - s.last_active < ACTIVE_WINDOW_S
        )

    # --- receive ---------------------------------------------------------------
    async def _receive(self, sub: Subscription) -> None:
        async for msg in sub:
            try:
                await self._handle(msg)
            except ProtocolError as exc:
                self._reject("malformed", msg.topic, str(exc))
            except TopicError as exc:
                self._reject("bad_topic", msg.topic, str(exc))

    def _reject(self, reason: str, topic: str, detail: str) -> None:
        self.metrics.rejected.inc(reason=reason)
        log.warning("message_rejected", reason=reason, topic=topic, detail=detail[:200])

    async def _handle(self, msg: BusMessage) -> None:
        ref = self.topics.parse(msg.topic)
        value = decode(msg.payload, self.config.limits, expect=(OpenSession, Draft, CloseSession))
        if value.session_id != ref.ident:
            raise ProtocolError(
                f"session id {value.session_id!r} does not match topic {msg.topic!r}"
            )
        if isinstance(value, OpenSession) and ref.leaf == "open":
            if value.device_id != ref.device:
                raise ProtocolError(
                    f"device id {value.device_id!r} does not match topic {msg.topic!r}"
                )
            await self._open(value)
            return
        if ref.leaf == "draft" and isinstance(value, Draft | CloseSession):
            s = self.sessions.get(value.session_id)
            if s is not None and s.device_id != ref.device:
                # Session ids are bound to the device that opened them: a draft or close
                # from another device's topic is refused without an answer.
                self._reject("foreign_session", msg.topic, f"session owned by {s.device_id!r}")
            elif isinstance(value, Draft):
                await self._draft(value, ref.device)
            else:
                await self._close(value)
        else:
            raise ProtocolError(f"{type(value).__name__} not allowed on {ref.leaf}")

    async def _open(self, m: OpenSession) -> None:
        vid = self.config.verifier_id

        # The first round's length: what the device's sessions were last told (or the default).
        first = self.control.first_hint(m.device_id) if self.control is not None else 0

        def answer(kind: str, reason: str = "", clen: int = 0) -> Verdict:
            return Verdict(
                session_id=m.session_id,
                epoch=m.epoch,
                seq=m.seq,
                kind=kind,  # type: ignore[arg-type]
                reason=reason,
                committed_len=clen,
                verifier_id=vid,
                echo_ts=m.sent_at,
                next_len=first if kind == "opened" else 0,
            )

        def send(v: Verdict) -> Awaitable[None]:
            return self._send_verdict(v, m.device_id)

        if m.tokenizer != self.fingerprint:
            self._reject("tokenizer_mismatch", m.session_id, m.tokenizer)
            await send(
                answer("refused", f"tokenizer {m.tokenizer!r} != verifier's {self.fingerprint!r}")
            )
            return
        bad = next((t for t in (*m.prompt, *m.committed) if t >= self.engine.vocab_size), None)
        if bad is not None:
            self._reject("token_out_of_range", m.session_id, str(bad))
            await send(answer("refused", f"token id {bad} outside vocabulary"))
            return
        old = self.sessions.get(m.session_id)
        if old is not None and old.device_id != m.device_id:
            self._reject("session_taken", m.session_id, f"{m.device_id} vs {old.device_id}")
            await send(answer("refused", "session id in use by another device"))
            return
        if old is not None and m.epoch < old.epoch:
            self._reject("stale_epoch", m.session_id, f"open epoch {m.epoch} < {old.epoch}")
            await send(answer("resync", f"stale epoch {m.epoch} < {old.epoch}", len(old.committed)))
            return
        if old is not None and m.epoch == old.epoch:  # duplicate open
            await send(answer("opened", clen=len(old.committed)))
            return
        if old is None and len(self.sessions) >= self.config.max_sessions:
            self._reject("too_many_sessions", m.session_id, str(len(self.sessions)))
            await send(answer("refused", "verifier at its session limit"))
            return
        if (
            old is None
            and sum(1 for x in self.sessions.values() if x.device_id == m.device_id)
            >= self.config.max_sessions_per_device
        ):
            self._reject("device_session_limit", m.session_id, m.device_id)
            await send(answer("refused", "device at its session limit on this verifier"))
            return
        s = VerifierSession.from_open(m)
        s.last_active = self._clock()
        self.sessions[m.session_id] = s
        if self.control is not None:
            self.control.bind(m.session_id, m.device_id)
        if old is None and not self.config.exclusive:
            assert self._drafts is not None
            await self._drafts.add(self.topics.session(m.device_id, m.session_id, "draft"))
        else:
            self._closing.append(m.session_id)  # drop the old epoch's KV cache before reuse
        self.metrics.sessions.set(len(self.sessions))
        log.info(
            "session_opened",
            session=m.session_id,
            device=m.device_id,
            epoch=m.epoch,
            mode=m.sampling.mode,
            committed=len(m.committed),
            drafter=m.drafter,
        )
        await self._publish_state(s)
        await send(answer("opened", clen=len(s.committed)))

    async def _draft(self, d: Draft, device_id: str) -> None:
        s = self.sessions.get(d.session_id)
        if self.control is not None and s is not None and d.epoch == s.epoch:
            self.control.on_draft(d.session_id, d, time.monotonic())
        tri = triage(
            s,
            d,
            vocab_size=self.engine.vocab_size,
            verifier_id=self.config.verifier_id,
            max_draft=self.config.max_draft,
        )
        if s is not None:
            s.last_active = self._clock()
        if tri.action == "verify":
            assert s is not None
            if s.pending:
                # A resend (extended, new seq) while its first copy still waits: verify the newer one.
                self._newer[d.session_id] = d
                return
            if not self._batcher.put(d.session_id, d):
                self.metrics.rejected.inc(reason="queue_full")
                return
            s.pending = True
            return
        if tri.action == "ignore":
            return
        if tri.action in ("refuse", "resync"):
            self._reject(tri.reason, d.session_id, tri.verdict.reason if tri.verdict else "")
        assert tri.verdict is not None
        await self._send_verdict(tri.verdict, device_id)

    async def _close(self, c: CloseSession) -> None:
        s = self.sessions.get(c.session_id)
        if s is None or c.epoch != s.epoch:
            return
        await self._drop(s, c.reason)

    async def _drop(self, s: VerifierSession, reason: str) -> None:
        """Forget a session: its state, its KV cache (at the next batch), its subscription."""
        if self.sessions.get(s.session_id) is not s:
            return
        del self.sessions[s.session_id]
        self._dirty.pop(s.session_id, None)
        if self.control is not None:
            self.control.forget(s.session_id)
        self._closing.append(s.session_id)
        if self._drafts is not None and not self.config.exclusive:
            await self._drafts.remove(self.topics.session(s.device_id, s.session_id, "draft"))
        self.metrics.sessions.set(len(self.sessions))
        log.info("session_closed", session=s.session_id, reason=reason)

    async def _expire_loop(self) -> None:
        """Drop sessions idle for longer than ``session_idle_timeout``."""
        timeout = self.config.session_idle_timeout
        while True:
            await asyncio.sleep(min(60.0, timeout / 4))
            now = self._clock()
            for s in [
                s for s in self.sessions.values() if not s.pending and now - s.last_active > timeout
            ]:
                self.metrics.expired.inc()
                await self._drop(s, "idle")

    # --- batches ---------------------------------------------------------------
    async def _batch_loop(self) -> None:
        while True:
            batch = await self._batcher.next_batch()
            for key in self._closing:
                self.engine.close(key)
            self._closing.clear()
            inputs: list[RoundInput] = []
            now = time.monotonic()
            for p in batch:
                s = self.sessions.get(p.key)
                d = self._newer.pop(p.key, p.item)
                if s is None or s.epoch != d.epoch:
                    continue
                s.pending = False
                if d.base != len(s.committed) or s.done:  # state moved while it waited
                    await self._draft(d, s.device_id)
                    continue
                self.metrics.queue_wait.observe(now - p.arrived)
                inputs.append(
                    RoundInput(
                        s.session_id,
                        s.prompt,
                        tuple(s.committed),
                        d,
                        s.sampling,
                        s.max_new_tokens,
                        s.stop_ids,
                        self.config.relaxed if self._lossy(s) else None,
                    )
                )
            if not inputs:
                continue
            if self.control is not None:
                inputs = self._capped(inputs)
            await self._verify(inputs)

    def _capped(self, inputs: list[RoundInput]) -> list[RoundInput]:
        """Verify at most the controller's cap of every draft (a prefix: still exact)."""
        assert self.control is not None
        cap = self.control.verify_cap([(i.session_id, len(i.draft.tokens)) for i in inputs])
        out = []
        for inp in inputs:
            d = inp.draft
            if len(d.tokens) > cap:
                self.metrics.capped.inc(len(d.tokens) - cap)
                d = dataclasses.replace(d, tokens=d.tokens[:cap], q=d.q[:cap])
                inp = dataclasses.replace(inp, draft=d)
            out.append(inp)
        return out

    async def _verify(self, inputs: list[RoundInput]) -> None:
        """Run a round; if it fails, isolate the failing draft so the others still get answers."""
        try:
            result = await asyncio.to_thread(run_round, self.engine, inputs)
        except Exception as exc:  # a model/engine failure must not take the service down
            if len(inputs) > 1:
                log.warning("batch_failed_isolating", size=len(inputs), error=repr(exc)[:200])
                for inp in inputs:
                    await self._verify([inp])
                return
            inp = inputs[0]
            self.engine.close(inp.session_id)
            self._reject("verify_failed", inp.session_id, repr(exc))
            s = self.sessions.get(inp.session_id)
            if s is not None:
                await self._send_verdict(
                    Verdict(
                        session_id=inp.session_id,
                        epoch=inp.draft.epoch,
                        seq=inp.draft.seq,
                        kind="refused",
                        reason=f"verification failed: {type(exc).__name__}",
                        committed_len=len(s.committed),
                        verifier_id=self.config.verifier_id,
                    ),
                    s.device_id,
                )
            return
        await self._apply(result, inputs)

    async def _apply(self, result: RoundResult, inputs: list[RoundInput]) -> None:
        m = self.metrics
        now = time.monotonic()
        if self.control is not None and result.batch_size:
            self.control.on_forward(
                result.batch_size, -(-result.tokens_in // result.batch_size), result.forward_s
            )
            # Split batches by draft length only where that saves more than a forward costs,
            # as the fitted forward-time model says (fixed cost over per-token cost).
            overhead = self.control.overhead_tokens()
            if overhead is not None and hasattr(self.engine, "forward_overhead_tokens"):
                self.engine.forward_overhead_tokens = overhead
        m.forwards.inc()
        m.batch_size.observe(result.batch_size)
        m.forward_time.observe(result.forward_s)
        seen = int(getattr(self.engine, "evictions", 0))
        if seen > m._evictions_seen:
            m.evictions.inc(seen - m._evictions_seen)
            m._evictions_seen = seen
        sends = []
        for inp, out in zip(inputs, result.outputs, strict=True):
            s = self.sessions.get(out.session_id)
            if s is None or s.epoch != inp.draft.epoch or len(s.committed) != len(inp.committed):
                # Closed or re-opened while the forward ran: these tokens continue a context
                # the session no longer has.  The device resends on its new epoch.
                continue
            base = len(s.committed)
            s.commit(list(out.tokens), out.finish_reason)
            s.rounds += 1
            s.proposed += out.proposed
            s.accepted += out.accepted
            m.rounds.inc()
            m.proposed.inc(out.proposed)
            m.accepted.inc(out.accepted)
            if out.relaxed:
                m.relaxed.inc(out.relaxed)
            m.accepted_len.observe(out.accepted)
            m.committed.inc(len(out.tokens))
            m.tokens_per_round.observe(len(out.tokens))
            hint = 0
            if self.control is not None:
                self.control.on_round(s.session_id, out.proposed, out.accepted, now)
                hint = self.control.hint(s.session_id)
            v = Verdict(
                session_id=s.session_id,
                epoch=s.epoch,
                seq=out.seq,
                kind="accept",
                base=base,
                accepted=out.accepted,
                tokens=out.tokens,
                committed_len=len(s.committed),
                done=s.done,
                finish_reason=s.finish_reason,
                next_len=hint,
                verifier_id=self.config.verifier_id,
            )
            s.remember(v)
            sends.append(self._send_verdict(v, s.device_id))
            if s.done or self.config.state_interval <= 0:
                self._dirty.pop(s.session_id, None)
                sends.append(self._publish_state(s))
            else:
                self._dirty[s.session_id] = s
        await asyncio.gather(*sends)

    # --- publishing --------------------------------------------------------------
    def _lossy(self, s: VerifierSession | None) -> bool:
        return self.config.relaxed is not None and s is not None and s.sampling.mode == "greedy"

    async def _send_verdict(self, v: Verdict, device_id: str) -> None:
        self.metrics.answers.inc(kind=v.kind)
        if not v.lossy and self._lossy(self.sessions.get(v.session_id)):
            v = dataclasses.replace(v, lossy=True)
        if self.control is not None and v.kind in ("opened", "catchup"):
            self.control.on_answer(v.session_id, time.monotonic())  # a draft follows
        await self.bus.publish(
            self.topics.session(device_id, v.session_id, "verdict"),
            v.encode(),
            qos=1,
            content_type=CONTENT_MSGPACK,
            user_properties={"trace": trace_id(v.session_id, v.epoch, v.seq)},
        )

    async def _publish_state(self, s: VerifierSession) -> None:
        await self.bus.publish(
            self.topics.session(s.device_id, s.session_id, "state"),
            s.state(self.config.verifier_id).encode(),
            qos=1,
            retain=True,
            content_type=CONTENT_MSGPACK,
        )

    def status(self, state: str = "online") -> VerifierStatus:
        snap = self.metrics.registry.snapshot()
        proposed = snap.get("mw_verifier_draft_tokens_total", 0.0)
        stats = {
            "rounds": snap.get("mw_verifier_rounds_total", 0.0),
            "forward_passes": snap.get("mw_verifier_forward_passes_total", 0.0),
            "committed_tokens": snap.get("mw_verifier_committed_tokens_total", 0.0),
            "acceptance_rate": (
                snap.get("mw_verifier_accepted_tokens_total", 0.0) / proposed if proposed else 0.0
            ),
            "mean_batch_size": snap.get("mw_verifier_batch_size_mean", 0.0),
            "rejected_messages": snap.get("mw_verifier_rejected_messages_total", 0.0),
            "lossy_mode": 1.0 if self.config.relaxed is not None else 0.0,
            "relaxed_tokens": snap.get("mw_verifier_relaxed_tokens_total", 0.0),
        }
        return VerifierStatus(
            verifier_id=self.config.verifier_id,
            state=state,  # type: ignore[arg-type]
            model=self.model_name,
            tokenizer=self.fingerprint,
            sessions=len(self.sessions),
            stats=stats,
            at=time.time(),
        )

    async def _publish_status(self, state: str) -> None:
        await self.bus.publish(
            self.topics.verifier_status(self.config.verifier_id),
            self.status(state).encode(),
            qos=1,
            retain=True,
            content_type=CONTENT_JSON,
        )

    async def _state_loop(self) -> None:
        """Publish the state of sessions that committed tokens since their last publish."""
        while True:
            await asyncio.sleep(self.config.state_interval)
            dirty, self._dirty = self._dirty, {}
            live = [s for sid, s in dirty.items() if self.sessions.get(sid) is s]
            results = await asyncio.gather(
                *(self._publish_state(s) for s in live), return_exceptions=True
            )
            for s, r in zip(live, results, strict=True):
                if isinstance(r, BusError):  # the broker is away: try again next time
                    self._dirty.setdefault(s.session_id, s)
                elif isinstance(r, BaseException):
                    raise r

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.status_interval)
            await self._publish_status("online")


def offline_status_payload(verifier_id: str) -> bytes:
    """The last-will payload: this verifier is gone."""
    return VerifierStatus(verifier_id=verifier_id, state="offline").encode()
