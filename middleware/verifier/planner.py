"""Which drafts to verify now, and how long each device should draft next.

A controller in the spirit of Zhu et al. 2025, "Efficient LLM Inference over
Heterogeneous Edge Networks with Speculative Decoding" (arXiv:2510.11331):
batching and speculation length are chosen jointly from a latency model, the
batch by dynamic programming over arrivals sorted in time.  Pure and
synchronous: no clock, no I/O; times are seconds relative to the call.

Inputs: the drafts waiting now (:class:`WaitingDraft`), the devices not yet
in with their predicted arrival (:class:`ExpectedArrival`) and a
:class:`~middleware.verifier.latency.LatencyModel`.  Output: a :class:`Plan`.

Cost model
----------
Device ``i`` has round-trip time ``r_i``, drafting time ``d_i`` per token and
acceptance rate ``alpha_i``.  A round with a ``k``-token draft commits on
average ``T_i(k) = 1 + sum_{j=1..k} alpha_i^j`` tokens.  The target's forward
over ``B`` rows padded to the longest draft ``K`` costs (the engine feeds
``[last, d_1..d_K]``, so ``K + 1`` tokens a row)::

    V(B, K) = a + b*B + c*B*(K + 1)

**Batch selection** (the DP).  The items, in order: the waiting drafts
(release time 0, oldest first; one group, or chunks of ``max_batch``), then
the expected arrivals sorted by ``eta`` (release ``eta``), those within
``min(group_s, max_wait_s)`` of each other grouped (batched together or not
at all).  Member
``m`` brings a draft of ``L_m`` tokens and weighs ``w_m = 1 / T_m(L_m)``
(seconds of waiting -> seconds per committed token).  Batches are contiguous
runs of groups; batch ``(i, j]`` starts at ``s = max(release_j, F_i)`` (its
last member is in and the previous batch, done at ``F_i``, is out) and ends
at ``e = s + V(rows, max L)``.  Its cost:

- ``latency``: ``sum_m w_m (e - release_m) + lambda (e - F_i)``: the
  per-token latency it adds to its members' current round, plus the
  verifier's occupancy (busy or idle-waiting) priced at
  ``lambda = sum_m w_m * min(1, rho)``, where ``rho`` is the verifier's
  load were all devices served in one batch,
  ``rho = sum_i (V(n, max L) / n) / (r_i + L_i d_i + V(n, max L))``: free
  when the verifier idles anyway, and when saturated every second of it
  delays everyone's next round (summed over the path it is ``lambda * F_n``,
  a terminal cost for the horizon);
- ``throughput``: ``V(rows, max L)`` (verifier seconds: fewer, fuller
  forwards) plus ``100 * max(0, e - min_m due_m)`` where ``due_m`` is the
  latest completion that keeps member ``m`` within ``latency_target_s`` per
  token this round, plus ``1e-3`` x the latency term as a tie-break.

No batch makes a member wait voluntarily longer than ``max_wait_s`` after
its arrival (a waiting draft: ``max_wait_s - waited_s`` from now) nor holds
more than ``max_batch`` rows.  ``dp[j] = min_i dp[i] + cost(i, j)``: O(g^2)
for g groups, with early exit at the wait bound.  The plan is the first
batch of the best path: verify it now if all its members are in, else wait
until its last member's ``eta``.

**Speculation length** (per device, for its next round).  Device ``i``
sits in batch ``S`` of the DP path, of ``B_S`` rows, and queues ``q_i`` in
this plan.  A cap ``K`` on the draft lengths of batch ``S`` gives::

    cycle_i(k, K) = r_i + q_i + k*d_i + V(B_S, K)
    lat_i(k, K)   = cycle_i(k, K) / T_i(k)          (seconds per committed token)
    k_i(K)        = argmin_{1 <= k <= K} lat_i(k, K)
    u(K)          = sum_i (V(B_S, K) / B_S) / cycle_i(k_i(K), K)    (verifier load)
    L_i(K)        = lat_i(k_i(K), K) * max(1, u(K))   (saturated: all cycles stretch)

Each batch keeps the ``K`` in ``1..k_max`` with the best score over its
members: the least ``sum L_i`` (``latency``), or the largest
``sum 1 / L_i`` (committed tokens/s) among the ``K`` whose worst ``L_i``
meets ``latency_target_s`` (``throughput``; if none does, the ``latency``
choice); its members get the hints ``k_i(K)``.  A search over devices x k,
O(k_max^2 n), vectorised: the padding couples the members of a batch (one
long draft lengthens every row) and the ``K`` enumeration prices that.

What is approximated:

- the steady state: next round's batches, queueing and load are this
  round's (``B_S``, ``q_i``, ``u``, and ``u`` as if every batch took the same
  ``K``); arrivals come at their predicted ``eta``; acceptance is i.i.d. per
  token;
- the DP keeps one ``(cost, finish)`` per prefix (the cheapest), not the
  Pareto set, so a costlier prefix that finishes earlier is not explored;
  waiting drafts are not split to save padding; arrivals within
  ``group_s`` are not split;
- drafts are verified whole; an overdue expected arrival counts as arriving
  in ``min_eta_s``, so a batch "now" holds only drafts that are in.  The
  caller re-plans on every arrival, on every batch completion and when a
  plan's ``wait_s`` elapses.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol

import numpy as np

from middleware.errors import ConfigError
from middleware.verifier.latency import DeviceEstimate, ForwardCoefficients, LatencyModel

Objective = Literal["latency", "throughput"]

_PENALTY = 100.0  # per second of SLO violation, against verifier seconds
_TIE = 1e-3  # weight of the latency cost in the throughput objective
_MIN_WAIT_S = 1e-4  # shorter waits are not worth a wake-up


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    """The planner's settings; ``objective`` picks the cost (see the module docstring)."""

    objective: Objective = "latency"
    k_max: int = 16
    max_wait_s: float = 0.02
    max_batch: int = 64
    latency_target_s: float | None = None  # per committed token; required by "throughput"
    min_eta_s: float = 1e-4
    group_s: float = 0.002  # arrivals predicted this close are batched together or not at all

    def __post_init__(self) -> None:
        if self.objective not in ("latency", "throughput"):
            raise ConfigError(
                f"planner objective must be latency or throughput, not {self.objective!r}"
            )
        if self.objective == "throughput" and not (self.latency_target_s or 0) > 0:
            raise ConfigError("the throughput objective needs a positive latency_target_s")
        if not 1 <= self.k_max <= 256 or not 1 <= self.max_batch <= 4096:
            raise ConfigError("k_max must be within [1, 256] and max_batch within [1, 4096]")
        if self.max_wait_s < 0 or self.min_eta_s <= 0 or self.group_s < 0:
            raise ConfigError("max_wait_s and group_s must be >= 0 and min_eta_s > 0")


@dataclass(frozen=True, slots=True)
class WaitingDraft:
    """A draft in the verifier's queue.

    ``device_id`` is the key the latency model tracks: a device id, or a
    session id where one device runs several sessions at once.
    """

    device_id: str
    draft_len: int  # draft tokens it carries
    waited_s: float = 0.0  # since it arrived


@dataclass(frozen=True, slots=True)
class ExpectedArrival:
    """A device whose next draft is not in yet."""

    device_id: str
    eta_s: float  # predicted seconds from now until its draft arrives
    draft_len: int  # tokens it is expected to bring (its last hint)


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do now.

    ``batch``: device ids to verify now, oldest first (empty: verify nothing
    yet).  ``wait_s``: 0 when ``batch`` is not empty, else how long to wait
    before planning again unless something arrives first (``math.inf``:
    nothing is waiting).  ``k``: the speculation-length hint, within
    ``[1, k_max]``, for the next round of every device that was passed in.
    """

    batch: tuple[str, ...]
    wait_s: float
    k: Mapping[str, int] = field(default_factory=dict)
    predicted_latency_s: float = math.nan  # mean seconds per token with these hints
    predicted_tokens_per_s: float = math.nan


class Planner(Protocol):
    """The interface every planner offers."""

    def plan(
        self,
        waiting: Sequence[WaitingDraft],
        expected: Sequence[ExpectedArrival],
        model: LatencyModel,
    ) -> Plan: ...


class _Member(NamedTuple):  # NamedTuples inside: built per member per plan, and cheaper
    device_id: str
    release: float  # when it is (or is predicted to be) in
    tokens: int  # tokens per row it needs: draft_len + 1
    weight: float  # 1 / expected committed tokens of this draft
    deadline: float  # latest voluntary start of a batch holding it
    due: float  # latest completion within the latency target
    waited: float


class _Group(NamedTuple):
    """Members the DP never separates: all waiting drafts, or arrivals close in time."""

    members: tuple[_Member, ...]
    release: float  # the last member's
    rows: int
    tokens: int  # longest row
    weight: float
    weighted_release: float  # sum of weight * release
    deadline: float
    due: float

    @staticmethod
    def of(members: Sequence[_Member]) -> _Group:
        return _Group(
            tuple(members),
            max(m.release for m in members),
            len(members),
            max(m.tokens for m in members),
            sum(m.weight for m in members),
            sum(m.weight * m.release for m in members),
            min(m.deadline for m in members),
            min(m.due for m in members),
        )


class _Batches(NamedTuple):
    segments: list[tuple[int, int]]  # [start, end) into the groups, in order
    starts: list[float]


def _member(
    est: DeviceEstimate,
    release: float,
    draft_len: int,
    waited: float,
    deadline: float,
    target: float,
) -> _Member:
    n = max(0, draft_len)
    committed = est.expected_committed(n)
    spent = est.rtt_s + n * est.draft_s + waited  # this round, outside the verifier
    return _Member(
        est.device_id,
        release,
        n + 1,
        1.0 / committed,
        deadline,
        release + target * committed - spent,
        waited,
    )


def _groups(
    waiting: Sequence[WaitingDraft],
    expected: Sequence[ExpectedArrival],
    ests: Mapping[str, DeviceEstimate],
    cfg: PlannerConfig,
) -> list[_Group]:
    target = cfg.latency_target_s or math.inf
    present = [
        _member(
            ests[w.device_id],
            0.0,
            w.draft_len,
            max(0.0, w.waited_s),
            max(0.0, cfg.max_wait_s - max(0.0, w.waited_s)),
            target,
        )
        for w in sorted(waiting, key=lambda w: -w.waited_s)
    ]
    groups = [
        _Group.of(present[i : i + cfg.max_batch]) for i in range(0, len(present), cfg.max_batch)
    ]
    span = min(cfg.group_s, cfg.max_wait_s)  # a group never outwaits max_wait on its own
    run: list[_Member] = []
    for e in sorted(expected, key=lambda e: e.eta_s):
        eta = max(cfg.min_eta_s, e.eta_s)
        m = _member(ests[e.device_id], eta, e.draft_len, 0.0, eta + cfg.max_wait_s, target)
        if run and (eta - run[0].release > span or len(run) >= cfg.max_batch):
            groups.append(_Group.of(run))
            run = []
        run.append(m)
    if run:
        groups.append(_Group.of(run))
    return groups


def _occupancy_price(
    groups: Sequence[_Group], ests: Mapping[str, DeviceEstimate], co: ForwardCoefficients
) -> float:
    """What a second of verifier time costs the fleet's next rounds: ``W * min(1, rho)``.

    ``rho`` is the verifier's load were every device served in one batch (a
    lower bound); ``W`` the total weight.  Idle: free; saturated: every
    device's next round waits for it.
    """
    n = sum(g.rows for g in groups)
    v = co.predict(n, max(g.tokens for g in groups))
    rho = 0.0
    for g in groups:
        for m in g.members:
            est = ests[m.device_id]
            rho += v / n / max(1e-9, est.rtt_s + (m.tokens - 1) * est.draft_s + v)
    return sum(g.weight for g in groups) * min(1.0, rho)


def _batch_dp(
    groups: Sequence[_Group], a: float, b: float, c: float, cfg: PlannerConfig, price: float
) -> _Batches:
    n = len(groups)
    latency = cfg.objective == "latency"
    # Plain lists and inline comparisons: this loop is the planner's hot spot.
    rel = [g.release for g in groups]
    rows = [g.rows for g in groups]
    tokens = [g.tokens for g in groups]
    deadlines = [g.deadline for g in groups]
    dues = [g.due for g in groups]
    cum_w = [0.0] * (n + 1)
    cum_wr = [0.0] * (n + 1)
    for m, g in enumerate(groups):
        cum_w[m + 1] = cum_w[m] + g.weight
        cum_wr[m + 1] = cum_wr[m] + g.weighted_release
    best = [0.0] + [math.inf] * n
    finish = [0.0] * (n + 1)
    parent = [0] * (n + 1)
    start = [0.0] * (n + 1)
    for j in range(1, n + 1):
        last = rel[j - 1]
        w_j, wr_j = cum_w[j], cum_wr[j]
        longest, deadline, due, size = 0, math.inf, math.inf, 0
        best_j, finish_j, parent_j, start_j = math.inf, math.inf, 0, 0.0
        for i in range(j - 1, -1, -1):
            size += rows[i]
            if size > cfg.max_batch:
                break
            if deadlines[i] < deadline:
                deadline = deadlines[i]
                if last > deadline and i < j - 1:
                    break  # someone would wait too long; longer batches only worse
            if tokens[i] > longest:
                longest = tokens[i]
            f = finish[i]
            s = f if f > last else last
            v = a + size * (b + c * longest)
            end = s + v
            lat = (w_j - cum_w[i]) * end - (wr_j - cum_wr[i])
            if latency:
                cost = best[i] + lat + price * (end - f)
            else:
                if dues[i] < due:
                    due = dues[i]
                late = end - due
                cost = best[i] + v + _TIE * lat + (_PENALTY * late if late > 0 else 0.0)
            if cost < best_j or (cost == best_j and end < finish_j):
                best_j, finish_j, parent_j, start_j = cost, end, i, s
        best[j], finish[j], parent[j], start[j] = best_j, finish_j, parent_j, start_j
    segments: list[tuple[int, int]] = []
    starts: list[float] = []
    j = n
    while j > 0:
        segments.append((parent[j], j))
        starts.append(start[j])
        j = parent[j]
    return _Batches(segments[::-1], starts[::-1])


@functools.lru_cache(maxsize=8)
def _cap_mask(k_max: int) -> np.ndarray:
    """[K, 1, k]: 0 where k <= K, inf elsewhere."""
    ks = np.arange(1, k_max + 1)
    return np.where(ks[None, :] > ks[:, None], np.inf, 0.0)[:, None, :]


def _choose_k(
    ests: Sequence[DeviceEstimate],
    queue: Sequence[float],
    segment: Sequence[int],
    a: float,
    b: float,
    c: float,
    cfg: PlannerConfig,
) -> tuple[list[int], float, float]:
    """Per-device hints (k_i), their mean seconds per token and committed tokens/s.

    ``segment[i]``: the index of the DP batch device ``i`` is in; each batch
    gets its own cap ``K``.
    """
    km = cfg.k_max
    ks = np.arange(1, km + 1, dtype=np.float64)  # [k]
    alpha = np.array([e.alpha for e in ests])[:, None]  # [n, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        geo = np.where(alpha >= 1.0, ks, alpha * (1.0 - alpha**ks) / (1.0 - alpha))
    committed = 1.0 + geo  # [n, k]
    fixed = np.array([e.rtt_s + q for e, q in zip(ests, queue, strict=True)])  # [n]
    draft = np.array([e.draft_s for e in ests])  # [n]
    seg = np.asarray(segment)
    onehot = (seg[:, None] == np.arange(seg.max() + 1)[None, :]).astype(np.float64)  # [n, s]
    rows = onehot.sum(axis=0)[seg]  # [n]: rows of the device's batch
    v = a + rows[None, :] * (b + c * (ks[:, None] + 1.0))  # [K, n]: its forward with cap K
    base = fixed[:, None] + draft[:, None] * ks  # [n, k]: the cycle less the forward
    lat = v[:, :, None] + base[None, :, :]  # [K, n, k]: cycle_i(k, K) ...
    lat /= committed[None, :, :]  # ... per committed token
    lat += _cap_mask(km)  # k <= K
    pick = lat.argmin(axis=2)  # [K, n]
    best = np.take_along_axis(lat, pick[:, :, None], axis=2)[:, :, 0]  # [K, n]
    own = fixed[None, :] + v + draft[None, :] * (pick + 1)  # [K, n]: cycle_i(k_i(K), K)
    load = ((v / rows[None, :]) / np.maximum(own, 1e-9)).sum(axis=1)  # [K]: verifier load
    best = best * np.maximum(1.0, load)[:, None]  # saturated: all cycles stretch
    score = best @ onehot  # [K, s]: summed seconds per token of each batch's members
    if cfg.objective == "throughput":
        worst = np.where(onehot[None, :, :] > 0, best[:, :, None], 0.0).max(axis=1)  # [K, s]
        rate = (1.0 / np.maximum(best, 1e-12)) @ onehot  # [K, s]: committed tokens/s
        ok = worst <= (cfg.latency_target_s or math.inf)
        score = np.where(ok.any(axis=0)[None, :], np.where(ok, -rate, np.inf), score)
    cap = score.argmin(axis=0)  # [s]
    chosen = cap[seg]  # [n]
    idx = np.arange(len(ests))
    hints = (pick[chosen, idx] + 1).tolist()
    lat_i = best[chosen, idx]
    return hints, float(lat_i.mean()), float((1.0 / np.maximum(lat_i, 1e-12)).sum())


class JointPlanner:
    """Batch selection by dynamic programming and per-device speculation lengths, jointly."""

    def __init__(self, config: PlannerConfig | None = None) -> None:
        self.config = config or PlannerConfig()

    def plan(
        self,
        waiting: Sequence[WaitingDraft],
        expected: Sequence[ExpectedArrival],
        model: LatencyModel,
    ) -> Plan:
        cfg = self.config
        present = {w.device_id for w in waiting}
        if len(present) < len(waiting):
            raise ValueError("one waiting draft per device id")
        expected = list({e.device_id: e for e in expected if e.device_id not in present}.values())
        if not waiting and not expected:
            return Plan((), math.inf)
        ids = [w.device_id for w in waiting] + [e.device_id for e in expected]
        ests = {d: model.device(d) for d in ids}
        co = model.forward.coefficients()
        groups = _groups(waiting, expected, ests, cfg)
        price = _occupancy_price(groups, ests, co)
        batches = _batch_dp(groups, co.a, co.b, co.c, cfg, price)
        queue: dict[str, float] = {}
        segment: dict[str, int] = {}
        for n, ((lo, hi), s) in enumerate(zip(batches.segments, batches.starts, strict=True)):
            for g in groups[lo:hi]:
                for m in g.members:
                    queue[m.device_id] = m.waited + max(0.0, s - m.release)
                    segment[m.device_id] = n
        order = list(ests)
        hints, mean_lat, rate = _choose_k(
            [ests[d] for d in order],
            [queue[d] for d in order],
            [segment[d] for d in order],
            co.a,
            co.b,
            co.c,
            cfg,
        )
        k = dict(zip(order, hints, strict=True))
        lo, hi = batches.segments[0]
        if not waiting:
            return Plan((), math.inf, k, mean_lat, rate)
        if groups[hi - 1].release > 0:  # wait for a predicted arrival
            return Plan((), groups[hi - 1].release, k, mean_lat, rate)
        batch = tuple(m.device_id for g in groups[lo:hi] for m in g.members)
        return Plan(batch, 0.0, k, mean_lat, rate)


def _uniform_hints(
    waiting: Sequence[WaitingDraft], expected: Sequence[ExpectedArrival], k: int
) -> dict[str, int]:
    ids = [w.device_id for w in waiting] + [e.device_id for e in expected]
    return dict.fromkeys(ids, k)


class UniformPlanner:
    """Baseline: the same ``k`` for everyone; verify everything waiting at once."""

    def __init__(self, k: int, *, max_batch: int = 64) -> None:
        if k < 1 or max_batch < 1:
            raise ConfigError("UniformPlanner needs k >= 1 and max_batch >= 1")
        self.k, self.max_batch = k, max_batch

    def plan(
        self,
        waiting: Sequence[WaitingDraft],
        expected: Sequence[ExpectedArrival],
        model: LatencyModel,
    ) -> Plan:
        hints = _uniform_hints(waiting, expected, self.k)
        if not waiting:
            return Plan((), math.inf, hints)
        oldest = sorted(waiting, key=lambda w: -w.waited_s)[: self.max_batch]
        return Plan(tuple(w.device_id for w in oldest), 0.0, hints)


class MaxBatchPlanner:
    """Baseline: the same ``k`` for everyone; wait until every expected device is in.

    Verifies once nothing more is expected, the batch is full, or the oldest
    draft has waited ``max_wait_s``.
    """

    def __init__(self, k: int = 4, *, max_wait_s: float = 0.02, max_batch: int = 64) -> None:
        if k < 1 or max_batch < 1 or max_wait_s < 0:
            raise ConfigError("MaxBatchPlanner needs k >= 1, max_batch >= 1, max_wait_s >= 0")
        self.k, self.max_wait_s, self.max_batch = k, max_wait_s, max_batch

    def plan(
        self,
        waiting: Sequence[WaitingDraft],
        expected: Sequence[ExpectedArrival],
        model: LatencyModel,
    ) -> Plan:
        hints = _uniform_hints(waiting, expected, self.k)
        if not waiting:
            return Plan((), math.inf, hints)
        oldest = sorted(waiting, key=lambda w: -w.waited_s)
        present = {w.device_id for w in waiting}
        pending = [e for e in expected if e.device_id not in present]
        left = self.max_wait_s - oldest[0].waited_s
        if pending and len(oldest) < self.max_batch and left > _MIN_WAIT_S:
            return Plan((), min(left, max(max(e.eta_s for e in pending), _MIN_WAIT_S)), hints)
        return Plan(tuple(w.device_id for w in oldest[: self.max_batch]), 0.0, hints)
