"""Speculation control: the verifier's live latency model driving the planner.

Glue between the verifier service and two pure pieces,
:class:`~middleware.verifier.latency.LatencyModel` and a
:class:`~middleware.verifier.planner.Planner`.  It keeps, per session, when
its last verdict left and the draft-length hint it was given, feeds the model
from what the protocol carries (a draft's ``think`` and ``tms`` fields, the
accepted length of each round, the duration of each forward pass) and turns
the batcher's waiting drafts plus the sessions expected to send into a plan.

:class:`Scheduler` is the interface the service talks to whatever the batch
policy: for ``window`` and ``adaptive`` (the batcher alone decides) it observes
nothing, hints nothing and caps nothing; :class:`Controller`, the ``planned``
policy, implements it with the model and the planner.  So the service has no
branch per policy.

Keys are session ids; :meth:`Controller.bind` ties a session to its device,
whose estimates (link, drafting speed, acceptance) its sessions share, one
after another or at once, so a device's next session starts from what its
last one taught.  No I/O and no clock of its own: every method takes ``now``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import ClassVar

from middleware.protocol import Draft
from middleware.verifier.batcher import Pending
from middleware.verifier.latency import ForwardCoefficients, LatencyModel
from middleware.verifier.planner import ExpectedArrival, Planner, WaitingDraft


class Scheduler:
    """Speculation control as the service sees it; this base is "none" (``window`` and
    ``adaptive`` policies): no observations kept, no hints, every draft verified whole."""

    plans_batches: ClassVar[bool] = False  # True: the batcher asks :meth:`decide`

    def bind(self, session_id: str, device_id: str) -> None:
        """``session_id`` belongs to ``device_id``."""

    def forget(self, session_id: str) -> None:
        """The session ended."""

    def on_draft(self, session_id: str, draft: Draft, now: float) -> None:
        """A draft of the session's current epoch arrived."""

    def on_answer(self, session_id: str, now: float) -> None:
        """A verdict the device answers with a draft (opened, catchup) was sent."""

    def on_forward(self, rows: int, tokens_per_row: int, seconds: float) -> None:
        """A round's forward took ``seconds``."""

    def on_round(self, session_id: str, proposed: int, accepted: int, now: float) -> None:
        """A verdict for a verified draft is being published."""

    def hint(self, session_id: str) -> int:
        """The draft length to ask of this session in its next verdict (0: none)."""
        return 0

    def first_hint(self, device_id: str) -> int:
        """The draft length for a new session's first round (0: none)."""
        return 0

    def verify_cap(self, rows: Sequence[tuple[str, int]]) -> int:
        """The longest draft prefix to verify in a batch of ``(session, draft length)``."""
        return max((n for _, n in rows), default=0)

    def overhead_tokens(self) -> int | None:
        """One forward's fixed cost in token slots, or None when unknown."""
        return None

    def calibrate(
        self, measure: Callable[[int, int], float], *, repeats: int = 1
    ) -> ForwardCoefficients | None:
        """Time the target's forward before serving (None: nothing to calibrate)."""
        return None

    def decide(
        self, waiting: Sequence[Pending[Draft]], now: float, idle: Iterable[str]
    ) -> tuple[Collection[str], float]:
        """(sessions to verify now, or none and how long to wait); only if ``plans_batches``."""
        return [p.key for p in waiting], 0.0


class Controller(Scheduler):
    """Decides batches and draft-length hints for the ``planned`` batch policy."""

    plans_batches: ClassVar[bool] = True

    def __init__(
        self, planner: Planner, model: LatencyModel | None = None, *, default_k: int = 4
    ) -> None:
        self.planner = planner
        self.model = model or LatencyModel()
        self.default_k = default_k
        self.plans = 0
        self._sent: dict[str, float] = {}  # session -> when its last verdict was published
        self._hints: dict[str, int] = {}  # session -> the draft length it was told
        self._device_of: dict[str, str] = {}  # session -> its device (see bind)
        self._device_hint: dict[str, int] = {}  # device -> the last hint any session of it got
        self._told: dict[str, int] = {}  # session -> the hint its last verdict carried
        self._verified: set[str] = set()  # sessions past their first verified round
        # The last round's forward, observed once its sessions are known (see on_forward).
        self._forward: tuple[int, int, float] | None = None
        self._forward_prefilled = False

    # --- observations ----------------------------------------------------------------
    def bind(self, session_id: str, device_id: str) -> None:
        """``session_id`` belongs to ``device_id``: it reads and feeds that device's estimates."""
        self._device_of[session_id] = device_id
        self.model.alias(session_id, device_id)

    def on_draft(self, session_id: str, draft: Draft, now: float) -> None:
        """A draft arrived: its gap since our last verdict is round trip + think time."""
        n = len(draft.tokens)
        if draft.token_ms > 0 and n:
            self.model.observe_draft(session_id, draft.token_ms / 1000.0 * n, n)
        told = self._told.pop(session_id, 0)
        if told > 0:  # how much of a hint the device's own confidence stop leaves
            self.model.observe_fill(session_id, n, told)
        sent = self._sent.get(session_id)
        if sent is not None and now >= sent:
            self.model.observe_rtt(session_id, max(0.0, now - sent - draft.think_ms / 1000.0))

    def on_round(self, session_id: str, proposed: int, accepted: int, now: float) -> None:
        """A verdict for a verified draft is being published."""
        if session_id not in self._verified:  # its round also prefilled its prompt
            self._verified.add(session_id)
            self._forward_prefilled = True
        self.model.observe_round(session_id, proposed, accepted)
        self._sent[session_id] = now
        # Its verdict carries hint(): the next draft is measured against it (see on_draft).
        self._told[session_id] = self._hints.get(session_id, 0)

    def on_answer(self, session_id: str, now: float) -> None:
        """Any other verdict (opened, catchup) that the device will answer with a draft."""
        self._sent[session_id] = now

    def on_forward(self, rows: int, tokens_per_row: int, seconds: float) -> None:
        """A round's forward took ``seconds``; called before that round's :meth:`on_round`s.

        The observation is held until the next round or plan: a round holding a
        session's first draft also timed the prefill of its prompt, which is no
        verify cost of that shape, and is left out of the fit.
        """
        self._observe_forward()
        self._forward = (rows, tokens_per_row, seconds)
        self._forward_prefilled = False

    def _observe_forward(self) -> None:
        if self._forward is not None and not self._forward_prefilled:
            self.model.forward.observe(*self._forward)
        self._forward = None

    def forget(self, session_id: str) -> None:
        """The session ended; what was learnt about its device stays."""
        self._sent.pop(session_id, None)
        self._hints.pop(session_id, None)
        self._verified.discard(session_id)
        self._device_of.pop(session_id, None)
        self._told.pop(session_id, None)
        self.model.forget(session_id)

    def calibrate(
        self, measure: Callable[[int, int], float], *, repeats: int = 1
    ) -> ForwardCoefficients:
        """Time the target's forward for a few shapes (at start-up, so kept short: one
        timing a shape; the online fit refines it from every forward)."""
        return self.model.forward.calibrate(measure, repeats=repeats)

    def overhead_tokens(self) -> int | None:
        """One forward's fixed cost in token slots (fitted ``a / c``), or None before a fit."""
        if len(self.model.forward) == 0:
            return None
        coef = self.model.forward.coefficients()
        if coef.c <= 0:
            return None
        return max(1, min(4096, round(coef.a / coef.c)))

    # --- decisions ----------------------------------------------------------------------
    def verify_cap(self, rows: Sequence[tuple[str, int]]) -> int:
        """The longest draft prefix worth verifying in a batch of ``(session, draft length)``.

        Rows are padded to the longest draft, so one long draft makes every row
        dearer.  The cap ``L`` minimises ``sum_i (V(rows, L + 1) + rtt_i) / T_i(min(L, n_i))``
        (this round's seconds per committed token, summed over its sessions), the
        longest ``L`` on ties.  Verifying a prefix is exact, so the cap is lossless: the
        tokens past it count as not accepted and the device drafts on from the verdict.
        """
        longest = max((n for _, n in rows), default=0)
        if longest <= 1 or len(self.model.forward) == 0:
            return longest
        ests = [(self.model.device(sid), n) for sid, n in rows]
        best, best_cost = longest, math.inf
        for cap in range(longest, 0, -1):
            v = self.model.forward.predict(len(rows), cap + 1)
            cost = sum((v + e.rtt_s) / e.expected_committed(min(cap, n)) for e, n in ests)
            if cost < best_cost - 1e-12:
                best, best_cost = cap, cost
        return best

    def hint(self, session_id: str) -> int:
        """The draft length to ask of this session in its next verdict (0: none yet)."""
        return self._hints.get(session_id, 0)

    def first_hint(self, device_id: str) -> int:
        """The draft length for a new session's first round: its device's last, or the default."""
        return self._device_hint.get(device_id, self.default_k)

    def decide(
        self, waiting: Sequence[Pending[Draft]], now: float, idle: Iterable[str]
    ) -> tuple[Collection[str], float]:
        """(sessions to verify now, or none and how long to wait at most)."""
        self.plans += 1
        self._observe_forward()
        keys = {p.key for p in waiting}
        drafts = [
            WaitingDraft(p.key, max(1, len(p.item.tokens)), max(0.0, now - p.arrived))
            for p in waiting
        ]
        expected = []
        for sid in idle:
            sent = self._sent.get(sid)
            if sid in keys or sent is None:
                continue
            k = self._hints.get(sid) or self.first_hint(self._device_of.get(sid, sid))
            est = self.model.device(sid)  # the device may draft less than told: its fill
            eta = sent + est.turnaround_s(k) - now
            expected.append(ExpectedArrival(sid, max(eta, 0.0), max(1, round(est.drafted(k)))))
        plan = self.planner.plan(drafts, expected, self.model)
        self._hints.update(plan.k)
        for sid, k in plan.k.items():
            did = self._device_of.get(sid)
            if did is not None:
                self._device_hint.pop(did, None)  # re-insert: dict order is recency
                self._device_hint[did] = k
        while len(self._device_hint) > self.model.max_devices:
            del self._device_hint[next(iter(self._device_hint))]
        if plan.batch:
            return plan.batch, 0.0
        return (), (plan.wait_s if math.isfinite(plan.wait_s) else 0.0)
