"""The device's decode loop for one session: draft, verify, commit, repeat.

It knows nothing of MQTT or ZeroMQ: it talks to the verifier through a
:class:`Link` (send open/draft/close, receive verdicts) and reports output
to a :class:`Sink`.  What it guarantees:

- Committed tokens are only ever those a verdict carried (verified), so the
  committed text equals what the target model alone would produce.
- Asynchronous drafting: while a verdict is outstanding it keeps drafting
  ahead as if all were accepted; a confirming verdict turns those tokens into
  the next draft at once.
- Timeouts adapt to the measured round-trip time (RFC 6298 style).  A timed-out
  draft is sent again, extended with what was drafted meanwhile (a new seq on
  the same base: the verifier answers a repeat of a verified base with
  ``catchup``, so nothing is committed twice).
- After ``max_failures`` consecutive timeouts the session goes offline: it
  releases its drafts as *provisional* tokens (marked unverified), keeps
  drafting locally, and probes the verifier.  Once one answers, the
  provisional tokens are verified like any draft: each is then *confirmed* or
  replaced by a *correction*.  No token is ever silently wrong.

Identity and trust (the device side of docs/threat-model.md):

- A generation draws a random ``nonce`` once; every (re-)open of it, also after a
  node restart (the journal keeps the nonce), reuses it, so its ``instance``
  (:func:`session_instance`) stays the same.  Verdicts of another instance (a
  reused session id, a forger) are ignored and counted (``ignored``).
- A re-open sends the committed tokens as a *claim* with the latest ``tag`` a
  verdict carried.  Retained state is a hint: only state of this instance that
  extends the claim adds to it, and nothing of it is shown until the
  verifier's ``opened`` confirms it.
- ``opened`` is authoritative: committed tokens it does not confirm are rolled
  back (the drafter with them) and text already shown past the first changed
  position is replaced by a ``correction`` chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from middleware.errors import BusError, SessionError, SessionRefused
from middleware.nodes.drafters.base import Drafter, Proposal, common_prefix
from middleware.nodes.link import OwnerLost
from middleware.protocol import (
    CloseSession,
    Draft,
    OpenSession,
    SamplingParams,
    SessionState,
    Verdict,
)
from middleware.protocol.session import MAX_EPOCH, MAX_MS, session_instance

log = structlog.get_logger("middleware.node")


class Link(Protocol):
    """What a session needs from the transport."""

    async def send(self, msg: OpenSession | Draft | CloseSession) -> None:
        """Publish (QoS 1).  Raises BusError when the transport is down."""

    async def next_verdict(self, session_id: str, timeout: float) -> Verdict | OwnerLost | None:
        """The next verdict for this session, ``OwnerLost`` when its verifier's last will
        arrives, or None on timeout."""

    async def reconcile(self, session_id: str, timeout: float) -> SessionState | None:
        """The retained state (a hint, anyone may have written it), if any arrives in time."""


class Sink(Protocol):
    """Receives the session's output as token events (text decoding is the sink's job)."""

    def committed(self, pos: int, tokens: Sequence[int], kind: str) -> None:
        """Tokens at committed position ``pos``; kind: verified | confirmed | correction."""

    def provisional(self, pos: int, tokens: Sequence[int]) -> None:
        """Unverified tokens released while offline, starting at position ``pos``."""

    def finished(self, reason: str, committed: Sequence[int]) -> None:
        """The session is over."""

    lossy: bool
    """Set by the session when the verifier accepts lossily (opt-in relaxed mode)."""


@dataclass(frozen=True, slots=True)
class SessionConfig:
    max_new_tokens: int = 128
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: tuple[int, ...] = ()
    max_draft: int = 32  # tokens per draft message
    max_ahead: int = 8  # tokens drafted ahead while a verdict is outstanding
    rto_initial: float = 10.0  # seconds; the first round includes the verifier's prefill
    rto_min: float = 1.0  # like TCP: a shorter floor resends on every scheduling hiccup
    rto_max: float = 30.0
    max_failures: int = 3  # consecutive timeouts before going offline
    offline_max_tokens: int = 64  # provisional tokens generated while offline, at most
    probe_interval: float = 1.0
    probe_interval_max: float = 10.0
    offline_enabled: bool = True


class Rto:
    """Retransmission timeout from measured RTTs (RFC 6298: srtt + 4 rttvar)."""

    def __init__(self, initial: float, lo: float, hi: float) -> None:
        self.value, self.lo, self.hi = initial, lo, hi
        self.srtt: float | None = None
        self.rttvar = 0.0

    def observe(self, rtt: float) -> None:
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.value = min(self.hi, max(self.lo, self.srtt + 4 * self.rttvar))

    def backoff(self) -> None:
        self.value = min(self.hi, self.value * 2)


@dataclass(slots=True)
class SessionStats:
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    timeouts: int = 0
    resends: int = 0
    reopens: int = 0
    offline_periods: int = 0
    provisional: int = 0
    corrections: int = 0
    ignored: int = 0  # verdicts of another session instance (reused id, forged), dropped
    started: float = field(default_factory=time.monotonic)
    finished: float = 0.0
    drafted: int = 0  # tokens the drafter produced (drafts ahead included)
    draft_s: float = 0.0  # time spent in the drafter: drafted / draft_s is its speed
    # Optional observer for the device's Prometheus endpoint: called with ("draft_s" |
    # "round_trip_s" | "offline_s", seconds).  None (the default) costs nothing.
    observe: Callable[[str, float], None] | None = field(default=None, repr=False, compare=False)

    def note(self, what: str, seconds: float) -> None:
        if what == "draft_s":
            self.draft_s += seconds
        if self.observe is not None:
            self.observe(what, seconds)

    def as_dict(self, n_tokens: int) -> dict[str, float]:
        elapsed = (self.finished or time.monotonic()) - self.started
        return {
            "rounds": self.rounds,
            "proposed": self.proposed,
            "accepted": self.accepted,
            "acceptance_rate": self.accepted / self.proposed if self.proposed else 0.0,
            "mean_accepted": self.accepted / self.rounds if self.rounds else 0.0,
            "tokens": n_tokens,
            "tokens_per_s": n_tokens / elapsed if elapsed > 0 else 0.0,
            "timeouts": self.timeouts,
            "resends": self.resends,
            "reopens": self.reopens,
            "offline_periods": self.offline_periods,
            "provisional": self.provisional,
            "corrections": self.corrections,
            "ignored": self.ignored,
            "elapsed_s": elapsed,
            "drafted": self.drafted,
            "draft_s": self.draft_s,
            "draft_tokens_per_s": self.drafted / self.draft_s if self.draft_s > 0 else 0.0,
        }


class LinkDown(Exception):
    """Internal: too many consecutive failures; switch to offline mode."""


class Reopen(Exception):
    """Internal: the owning verifier is gone; open the session again (any verifier)."""


class DeviceSession:
    """One generation, from prompt tokens to committed tokens."""

    def __init__(
        self,
        *,
        session_id: str,
        device_id: str,
        prompt: Sequence[int],
        tokenizer_fp: str,
        drafter: Drafter,
        link: Link,
        sink: Sink,
        config: SessionConfig | None = None,
        nonce: str | None = None,
        committed: Sequence[int] = (),
        tag: str = "",
        epoch: int = 0,
        on_progress: Callable[[DeviceSession], None] | None = None,
    ) -> None:
        """``nonce``, ``committed``, ``tag`` and ``epoch`` resume a generation (the node's
        journal after a restart): the same instance, the committed tokens as the claim of
        the first open.  ``on_progress`` is called after every change of the committed
        tokens or the tag (the journal writes them)."""
        self.session_id = session_id
        self.device_id = device_id
        self.prompt = tuple(prompt)
        self.fingerprint = tokenizer_fp
        self.drafter = drafter
        self.link = link
        self.sink = sink
        self.config = config or SessionConfig()
        self.committed: list[int] = list(committed)
        self.speculative: list[int] = []  # drafted, unverified, continuing `committed`
        self.shown: list[int] = []  # provisional tokens already released to the user
        self.epoch = epoch
        self.seq = 0
        self.finish_reason = ""
        self.verifier_id = ""
        self.nonce = nonce if nonce is not None else secrets.token_hex(8)
        self.tag = tag  # the latest MAC of the committed tokens a verdict carried
        self.instance = session_instance(self._open_message(0, 0, (), ""))
        self.on_progress = on_progress
        self.stats = SessionStats()
        self._rto = Rto(self.config.rto_initial, self.config.rto_min, self.config.rto_max)
        self._failures = 0
        # Reported in each draft for the verifier's latency model.
        self._verdict_at: float | None = None  # when the last awaited verdict arrived
        self._token_s = 0.0  # drafting time per token (EWMA)
        self._log = log.bind(session=session_id, device=device_id)

    # --- public ------------------------------------------------------------------
    async def run(self) -> list[int]:
        """Generate until a stop token or the length limit; returns the committed tokens."""
        self.drafter.start(self.prompt, self.config.sampling)
        opened = False
        while not self.finish_reason:
            try:
                if not opened:
                    await self._open()
                    opened = True
                if not self.finish_reason:  # an `opened` may say the session is already done
                    await self._round()
            except LinkDown:
                if not self.config.offline_enabled:
                    raise SessionError(
                        "verifier unreachable", session_id=self.session_id, device_id=self.device_id
                    ) from None
                await self._offline()
                opened = True  # _offline returns only after a successful re-open
        self.stats.finished = time.monotonic()
        with contextlib.suppress(BusError):
            await self.link.send(
                CloseSession(self.session_id, self.epoch, self._next_seq(), "done")
            )
        self.sink.finished(self.finish_reason, self.committed)
        return self.committed

    # --- protocol steps ------------------------------------------------------------
    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    async def _send(self, msg: OpenSession | Draft | CloseSession) -> None:
        """Publish; a transport that cannot take it within the RTO counts as a failure.

        A message that the transport still delivers later is harmless: every
        message is idempotent (duplicates and stale bases are answered as such)."""
        try:
            await asyncio.wait_for(self.link.send(msg), self._rto.value)
        except (BusError, TimeoutError) as exc:
            self._log.warning("send_failed", error=str(exc) or type(exc).__name__)
            self._fail()

    def _fail(self) -> None:
        self._failures += 1
        self.stats.timeouts += 1
        self._rto.backoff()
        if self._failures >= self.config.max_failures:
            raise LinkDown

    def _open_message(self, epoch: int, seq: int, claim: Sequence[int], tag: str) -> OpenSession:
        return OpenSession(
            session_id=self.session_id,
            device_id=self.device_id,
            epoch=epoch,
            seq=seq,
            tokenizer=self.fingerprint,
            prompt=self.prompt,
            committed=tuple(claim),
            sampling=self.config.sampling,
            max_new_tokens=self.config.max_new_tokens,
            stop_ids=self.config.stop_ids,
            drafter=self.drafter.name,
            sent_at=time.time() * 1000,
            nonce=self.nonce,
            tag=tag,
        )

    async def _open(self, *, probe: bool = False) -> None:
        """Open (or re-open with a new epoch and the committed tokens as a claim) and wait
        for ``opened``, which says what of the claim holds."""
        claim, claim_tag = tuple(self.committed), self.tag
        state = await self.link.reconcile(self.session_id, timeout=0.2 if self.epoch else 0.0)
        if state is not None:
            claim, claim_tag = self._hint(state, claim, claim_tag)
        while True:
            if self.epoch >= MAX_EPOCH:
                raise SessionError("epoch exhausted", session_id=self.session_id)
            self.epoch += 1
            seq = self._next_seq()
            sent = time.monotonic()
            await self._send(self._open_message(self.epoch, seq, claim, claim_tag))
            v = await self._await(lambda v, s=seq: v.seq == s, sent, measure=False)
            if v is None:
                if probe:
                    raise LinkDown
                continue
            if v.kind == "refused":
                raise SessionRefused(
                    f"verifier refused the session: {v.reason}",
                    reason=v.reason,
                    session_id=self.session_id,
                    device_id=self.device_id,
                )
            if v.kind == "opened":
                if not self._opened(v, claim):
                    continue  # an answer that cannot describe our claim: open again
                self.verifier_id = v.verifier_id
                self._log.info(
                    "session_open",
                    epoch=self.epoch,
                    verifier=v.verifier_id,
                    claimed=len(claim),
                    committed=len(self.committed),
                )
                return
            # resync: a newer epoch exists somewhere; go round with epoch + 1

    def _hint(
        self, state: SessionState, claim: tuple[int, ...], tag: str
    ) -> tuple[tuple[int, ...], str]:
        """Retained state is a hint: of this instance and extending the claim, it extends
        the claim (never the committed tokens: ``opened`` decides); otherwise it is
        ignored.  Anyone allowed to write the topic could have written it."""
        if state.instance != self.instance:
            if state.instance or state.committed:
                self.stats.ignored += 1
                self._log.info("retained_state_ignored", instance=state.instance or "-")
            return claim, tag
        self.epoch = max(self.epoch, min(state.epoch, MAX_EPOCH - 1))
        if len(state.committed) > len(claim) and state.committed[: len(claim)] == claim:
            return tuple(state.committed), state.tag
        return claim, tag

    def _opened(self, v: Verdict, claim: tuple[int, ...]) -> bool:
        """Make the committed tokens what the ``opened`` verdict proved; False if it does not
        fit the claim it answers (logged; the device opens again)."""
        if v.tokens:
            if v.base > len(claim):
                self._log.warning("opened_inconsistent", base=v.base, claimed=len(claim))
                return False
            truth = list(claim[: v.base]) + list(v.tokens)
        else:
            if v.committed_len > len(claim):
                self._log.warning("opened_inconsistent", clen=v.committed_len, claimed=len(claim))
                return False
            truth = list(claim[: v.committed_len])
        if v.tag:
            self.tag = v.tag
        elif len(truth) != len(claim) or truth != list(claim):
            self.tag = ""  # the old tag vouched for tokens that are gone
        self._set_committed(truth)
        if v.done:
            self.finish_reason = v.finish_reason or "stop"
        return True

    def _set_committed(self, truth: Sequence[int]) -> None:
        """Roll back to the first position where the committed tokens differ from ``truth``
        (the drafter's context with them), then commit the rest of ``truth``."""
        truth = list(truth)
        same = common_prefix(self.committed, truth)
        if same < len(self.committed):
            self.stats.corrections += 1
            self._log.warning(
                "committed_rolled_back", kept=same, dropped=len(self.committed) - same
            )
            del self.committed[same:]
            self.speculative = []
            self.shown = []
            new = truth[same:]
            self.sink.committed(same, new, "correction")
            self.committed.extend(new)
            self._progress()
        elif len(truth) > len(self.committed):
            self._commit(len(self.committed), truth[len(self.committed) :], accepted=None)
        else:
            self._progress()  # the tag may have changed

    def _progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self)

    async def _await(
        self, want: object, sent: float, *, measure: bool = True, reopen_on_loss: bool = False
    ) -> Verdict | None:
        """Wait for a verdict of this epoch satisfying ``want``; None after the RTO.

        ``measure=False`` keeps the RTT out of the RTO estimate (opens are cheap,
        the first draft after one pays for the verifier's prefill)."""
        deadline = sent + self._rto.value
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail()
                return None
            v = await self.link.next_verdict(self.session_id, remaining)
            if v is None:
                continue
            if isinstance(v, OwnerLost):
                if v.verifier_id == self.verifier_id and reopen_on_loss:
                    raise Reopen
                continue
            if v.instance and v.instance != self.instance and v.kind != "refused":
                # Another generation under this session id (a reused id, an old verifier's
                # straggler) or a forger: never ours to apply.  A refusal carries no tokens
                # (at worst a forged one ends the session: no wrong text), and the verifier
                # may name the instance that holds the id ("session id in use").
                self.stats.ignored += 1
                self._log.info("verdict_of_other_instance", instance=v.instance, kind=v.kind)
                continue
            if v.epoch != self.epoch:
                continue  # a straggler from an earlier epoch
            self._failures = 0  # the link works, whatever this verdict answers
            if v.lossy and not self.sink.lossy:
                self._log.warning("verifier_is_lossy", verifier=v.verifier_id)
                self.sink.lossy = True
            if want(v):  # type: ignore[operator]
                self._verdict_at = time.monotonic()
                if measure:
                    self._rto.observe(self._verdict_at - sent)
                return v
            if v.kind in ("accept", "catchup"):
                self._apply(v, ())  # an older seq's verdict still carries truth

    async def _propose(self, after: Sequence[int], max_tokens: int) -> Proposal:
        """Draft in a worker thread so the event loop keeps serving verdicts."""
        if max_tokens <= 0:
            return Proposal()
        position = len(self.committed) + len(after)
        t0 = time.monotonic()
        p = await asyncio.to_thread(
            self.drafter.propose, list(self.committed), list(after), max_tokens, position
        )
        self.stats.note("draft_s", time.monotonic() - t0)
        self.stats.drafted += len(p.tokens)
        if p.tokens:
            per_token = (time.monotonic() - t0) / len(p.tokens)
            self._token_s = (
                per_token if not self._token_s else 0.8 * self._token_s + 0.2 * per_token
            )
        return p

    async def _round(self) -> None:
        """One draft/verdict exchange, drafting ahead while waiting."""
        cfg = self.config
        room = cfg.max_new_tokens - len(self.committed)
        want = min(cfg.max_draft, self.drafter.policy.limit(room))
        draft = list(self.speculative[:want])
        q: tuple = ()
        if len(draft) < self.drafter.policy.config.min_len or not draft:
            p = await self._propose(draft, want - len(draft))
            draft += p.tokens
            q = p.q
        if self.config.sampling.mode == "rejection":
            # q must describe every token; drafted-ahead tokens lost theirs, so re-propose.
            if len(q) != len(draft):
                p = await self._propose([], want)
                draft, q = list(p.tokens), p.q
        base = len(self.committed)
        seq = self._next_seq()
        sent = time.monotonic()
        think = sent - self._verdict_at if self._verdict_at is not None else 0.0
        await self._send(
            Draft(
                self.session_id,
                self.epoch,
                seq,
                base,
                tuple(draft),
                q,
                time.time() * 1000,
                think_ms=min(think * 1000, MAX_MS),
                token_ms=min(self._token_s * 1000, MAX_MS),
            )
        )
        if len(draft) > len(self.speculative):
            self.speculative = list(draft)
        # Draft ahead while the verdict is outstanding.
        waiter = asyncio.ensure_future(
            self._await(lambda v: v.seq == seq, sent, reopen_on_loss=True)
        )
        try:
            while (
                not waiter.done()
                and len(self.speculative) - len(draft) < cfg.max_ahead
                and cfg.sampling.mode != "rejection"
            ):
                before, clen = list(self.speculative), len(self.committed)
                p = await self._propose(before, 2)
                if not p.tokens:
                    break
                if self.speculative == before and len(self.committed) == clen:
                    self.speculative += p.tokens  # else a verdict moved the context meanwhile
            try:
                v = await waiter
            except Reopen:
                self._log.warning("owner_lost_reopening", verifier=self.verifier_id)
                self.stats.reopens += 1
                await self._open()
                return
        finally:
            if not waiter.done():
                waiter.cancel()
        if v is None:
            # Timed out: resend on the same base with what was drafted meanwhile.
            self.stats.resends += 1
            return
        self.stats.rounds += 1
        self.stats.note("round_trip_s", time.monotonic() - sent)
        if v.kind == "resync":
            self.stats.reopens += 1
            self.speculative = []
            await self._open()
            return
        if v.kind == "refused":
            raise SessionRefused(
                f"draft refused: {v.reason}", reason=v.reason, session_id=self.session_id
            )
        if v.next_len:
            self.drafter.hint(v.next_len)
        self._apply(v, draft)

    def _apply(self, v: Verdict, draft: Sequence[int]) -> None:
        """Apply an accept/catchup verdict: commit its tokens, keep what still continues them."""
        if v.kind == "accept" and draft and v.base == len(self.committed) and v.seq == self.seq:
            self.stats.proposed += len(draft)
            self.stats.accepted += v.accepted
            self.drafter.observe(len(draft), v.accepted)
        end = v.base + len(v.tokens)
        if v.tag and v.base <= len(self.committed) <= end:
            self.tag = v.tag  # the MAC of the committed tokens once this verdict is applied
        if end > len(self.committed) and v.base <= len(self.committed):
            new = v.tokens[len(self.committed) - v.base :]
            self._commit(len(self.committed), new, accepted=v.accepted)
        if v.done:
            self.finish_reason = v.finish_reason or "stop"

    def _commit(self, pos: int, tokens: Sequence[int], accepted: int | None) -> None:
        """Append verified tokens; settle provisional ones; trim the speculative tail."""
        tokens = list(tokens)
        spec = self.speculative
        self.speculative = spec[len(tokens) :] if spec[: len(tokens)] == tokens else []
        if self.shown:
            same = 0
            while same < min(len(tokens), len(self.shown)) and tokens[same] == self.shown[same]:
                same += 1
            if same:
                self.sink.committed(pos, tokens[:same], "confirmed")
            if same < len(tokens):
                if same < len(self.shown):
                    self.stats.corrections += 1
                    self.sink.committed(pos + same, tokens[same:], "correction")
                    self.shown = []
                else:
                    self.shown = []
                    self.sink.committed(pos + same, tokens[same:], "verified")
            else:
                self.shown = self.shown[same:]
        else:
            self.sink.committed(pos, tokens, "verified")
        self.committed.extend(tokens)
        self._progress()

    # --- offline mode -------------------------------------------------------------
    async def _offline(self) -> None:
        """Release drafts as provisional text, keep drafting, probe until a verifier answers."""
        cfg = self.config
        self.stats.offline_periods += 1
        went_offline = time.monotonic()
        self._log.warning(
            "offline", committed=len(self.committed), speculative=len(self.speculative)
        )
        self._release(self.speculative)
        interval = cfg.probe_interval
        while True:
            budget = min(cfg.offline_max_tokens, cfg.max_new_tokens - len(self.committed))
            if len(self.speculative) < budget and not self._ends_with_stop(self.speculative):
                p = await self._propose(self.speculative, min(4, budget - len(self.speculative)))
                self.speculative += p.tokens
                self._release(self.speculative)
            try:
                self._failures = cfg.max_failures - 1  # one failed probe keeps us offline
                await asyncio.wait_for(self._open(probe=True), timeout=interval + self._rto.value)
            except (LinkDown, TimeoutError):
                await asyncio.sleep(interval)
                interval = min(cfg.probe_interval_max, interval * 2)
                continue
            self._failures = 0
            self.stats.note("offline_s", time.monotonic() - went_offline)
            self._log.info("online_again", provisional=len(self.shown))
            return

    def _release(self, tokens: Sequence[int]) -> None:
        """Show speculative tokens the user has not seen yet, marked provisional."""
        new = list(tokens[len(self.shown) :])
        if new and list(tokens[: len(self.shown)]) == self.shown:
            self.sink.provisional(len(self.committed) + len(self.shown), new)
            self.shown += new
            self.stats.provisional += len(new)

    def _ends_with_stop(self, tokens: Sequence[int]) -> bool:
        return bool(tokens) and tokens[-1] in self.config.stop_ids
