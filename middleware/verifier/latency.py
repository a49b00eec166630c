"""A live latency model of the fleet: links, drafters, acceptance and the target's forward pass.

Pure bookkeeping and arithmetic: every observation carries its own durations
or timestamps (the caller reads the clock), so the model is deterministic and
tested with injected times.  The planner (:mod:`middleware.verifier.planner`)
reads it through :meth:`LatencyModel.device` and :attr:`LatencyModel.forward`.

Per device (keyed by device id):

- **round-trip time** ``rtt``: an EWMA with a mean-deviation spread in the
  manner of TCP's SRTT/RTTVAR (RFC 6298).  For robustness a sample moves the
  mean by at most ``gain * clip`` spreads (one GC pause or radio hiccup does
  not double the estimate) while the spread takes the full deviation, so a
  lasting change widens the spread first and is then followed by the mean.
- **drafting time per token** ``draft_s``: an EWMA of what devices report
  (:meth:`LatencyModel.observe_draft`) or of what the verifier infers from the
  gap between sending a verdict and receiving the next draft, less one RTT,
  clamped at 0 (:meth:`LatencyModel.observe_turnaround`).
- **acceptance** ``alpha``: the per-token acceptance probability under the
  usual i.i.d. model of speculative decoding (Leviathan et al. 2023).  A round
  that proposed ``k`` tokens and accepted ``a`` is ``a`` successes followed by
  one failure if ``a < k`` (acceptance stops at the first reject) and is
  censored after ``a`` successes if ``a == k``.  The estimate is the mean of
  a Beta posterior whose counts decay by ``alpha_decay`` per round, so it
  tracks drift with an effective memory of ``1 / (1 - alpha_decay)`` rounds::

      alpha = (prior_a + S) / (prior_a + prior_b + S + F)
      S <- decay * S + a,   F <- decay * F + [a < k]

  Expected accepted draft tokens of a ``k``-token draft:
  ``E[acc](k) = sum_{i=1..k} alpha^i``; a round commits ``E[acc](k) + 1``
  tokens (the target's correction or bonus token).

Target forward time (:class:`ForwardModel`)::

    t(rows, tokens_per_row) = a + b * rows + c * rows * tokens_per_row

fitted by non-negative least squares over the last ``window`` observations
(exact: the best feasible solution of the normal equations over the 7
non-empty sets of free coefficients; pure Python, O(1) an observation),
plus the start-up calibration's shapes, which stay in the fit for good as
anchors weighing ``anchor_weight`` observations each.
While the observed shapes do not identify all three coefficients (fewer than
three shapes that span them, e.g. a lone session always drafting 4 tokens),
prior pseudo-observations at three shapes that do are added with a small
weight (``prior_weight``, 1e-3 of a real one): the data are matched and the
prior fills in only the directions they leave open.
Without observations the fit is the prior.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from middleware.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ForwardCoefficients:
    """``t(rows, tokens) = a + b * rows + c * rows * tokens`` in seconds."""

    a: float  # fixed cost of a forward pass (weights streamed once, launch overheads)
    b: float  # per row (per-session work: cache gather, sampling)
    c: float  # per (padded) token

    def predict(self, rows: int, tokens_per_row: int) -> float:
        """Predicted seconds for a forward of ``rows`` rows of ``tokens_per_row`` tokens."""
        return self.a + self.b * rows + self.c * rows * tokens_per_row


@dataclass(frozen=True, slots=True)
class LatencyPriors:
    """What the model assumes before it has observed anything."""

    rtt_s: float = 0.05
    draft_s: float = 0.02  # drafting seconds per token
    alpha: float = 0.6
    alpha_strength: float = 4.0  # pseudo-tokens behind the alpha prior
    forward: ForwardCoefficients = ForwardCoefficients(a=0.02, b=0.001, c=0.0005)

    def __post_init__(self) -> None:
        f = self.forward
        if min(self.rtt_s, self.draft_s, f.a, f.b, f.c) < 0:
            raise ConfigError("latency priors must be non-negative")
        if not 0.0 < self.alpha < 1.0 or self.alpha_strength <= 0:
            raise ConfigError("prior alpha must be within (0, 1) and its strength positive")


class Ewma:
    """An exponentially weighted mean with a robust mean-deviation spread (RFC 6298 style).

    ``gain`` weighs a new sample into the mean, ``spread_gain`` into the spread;
    before the first sample ``value`` is ``prior`` and ``spread`` is
    ``prior / 2``.  After ``warmup`` samples a sample moves the mean by at most
    ``gain * clip`` spreads (the spread as it stood before that sample).
    """

    __slots__ = ("clip", "count", "gain", "spread", "spread_gain", "value", "warmup")

    def __init__(
        self,
        prior: float,
        *,
        gain: float = 0.125,
        spread_gain: float = 0.25,
        clip: float = 4.0,
        warmup: int = 4,
    ) -> None:
        if not 0 < gain <= 1 or not 0 < spread_gain <= 1 or clip <= 0:
            raise ConfigError("EWMA gains must be within (0, 1] and clip positive")
        self.value = prior
        self.spread = prior / 2
        self.gain, self.spread_gain, self.clip, self.warmup = gain, spread_gain, clip, warmup
        self.count = 0

    def update(self, sample: float) -> None:
        if self.count == 0:
            self.value, self.spread = sample, sample / 2
        else:
            dev = sample - self.value
            bound = self.clip * self.spread  # the spread before this sample
            self.spread += self.spread_gain * (abs(dev) - self.spread)
            if self.count >= self.warmup:
                dev = min(max(dev, -bound), bound)
            self.value += self.gain * dev
        self.count += 1


def expected_accepted(alpha: float, k: int) -> float:
    """``sum_{i=1..k} alpha^i``: expected accepted tokens of a ``k``-token draft."""
    if k <= 0:
        return 0.0
    if alpha >= 1.0:
        return float(k)
    return alpha * (1.0 - alpha**k) / (1.0 - alpha)


@dataclass(frozen=True, slots=True)
class DeviceEstimate:
    """A snapshot of what the model believes about one device."""

    device_id: str
    rtt_s: float
    rtt_spread_s: float
    draft_s: float  # per token
    alpha: float
    rounds: float  # effective (decayed) rounds behind alpha; 0 = prior only
    fill: float = 1.0  # drafted / hinted length: a drafter's confidence stop cuts drafts short

    def expected_accepted(self, k: int) -> float:
        """``sum_{i=1..k} alpha^i``."""
        return expected_accepted(self.alpha, k)

    def expected_committed(self, k: int) -> float:
        """Tokens a ``k``-token round commits on average: accepted + 1."""
        return 1.0 + expected_accepted(self.alpha, k)

    def drafted(self, hint: int) -> float:
        """Tokens the device is expected to draft when told ``hint`` (at least 1)."""
        return max(1.0, hint * self.fill)

    def turnaround_s(self, hint: int) -> float:
        """Predicted seconds from sending a verdict with ``hint`` to receiving the draft."""
        return self.rtt_s + self.drafted(hint) * self.draft_s


class _Device:
    __slots__ = ("draft", "failures", "fill", "rounds", "rtt", "successes")

    def __init__(self, priors: LatencyPriors) -> None:
        self.rtt = Ewma(priors.rtt_s)
        self.draft = Ewma(priors.draft_s)
        self.fill = Ewma(1.0)
        self.successes = 0.0
        self.failures = 0.0
        self.rounds = 0.0


class LatencyModel:
    """Per-device link, drafting and acceptance estimates plus the target's forward model.

    Unknown devices read as the priors.  A key may be an :meth:`alias` of a
    device (a session of it): it is observed and read as that device, so a
    device's sessions, one after another or at once, share what was learnt
    about its link, drafter and acceptance.  The model keeps at most
    ``max_devices`` devices and drops the least recently observed beyond that.
    """

    def __init__(
        self,
        priors: LatencyPriors | None = None,
        *,
        alpha_decay: float = 0.98,
        forward: ForwardModel | None = None,
        max_devices: int = 65_536,
    ) -> None:
        if not 0 < alpha_decay <= 1:
            raise ConfigError("alpha_decay must be within (0, 1]")
        self.priors = priors or LatencyPriors()
        self.alpha_decay = alpha_decay
        self.forward = forward or ForwardModel(self.priors.forward)
        self.max_devices = max_devices
        self._devices: dict[str, _Device] = {}
        self._alias: dict[str, str] = {}  # key (a session) -> its device

    def alias(self, key: str, device_id: str) -> None:
        """Observe and read ``key`` as ``device_id`` until :meth:`forget` of ``key``."""
        if key != device_id:
            self._alias[key] = device_id

    def _get(self, key: str) -> _Device:
        device_id = self._alias.get(key, key)
        dev = self._devices.pop(device_id, None)  # re-insert: dict order is recency
        if dev is None:
            dev = _Device(self.priors)
            while len(self._devices) >= self.max_devices:
                del self._devices[next(iter(self._devices))]
        self._devices[device_id] = dev
        return dev

    def observe_rtt(self, device_id: str, seconds: float) -> None:
        """A measured round trip (e.g. verdict ``echo_ts`` against the clock)."""
        if seconds >= 0:
            self._get(device_id).rtt.update(seconds)

    def observe_draft(self, device_id: str, seconds: float, tokens: int) -> None:
        """The device reports drafting ``tokens`` tokens took ``seconds``."""
        if tokens > 0 and seconds >= 0:
            self._get(device_id).draft.update(seconds / tokens)

    def observe_turnaround(
        self, device_id: str, verdict_sent_at: float, draft_arrived_at: float, tokens: int
    ) -> None:
        """Infer drafting time: (arrival of the next draft - verdict sent - RTT) / tokens, >= 0."""
        if tokens <= 0 or draft_arrived_at < verdict_sent_at:
            return
        dev = self._get(device_id)
        gap = draft_arrived_at - verdict_sent_at - dev.rtt.value
        dev.draft.update(max(0.0, gap) / tokens)

    def observe_fill(self, device_id: str, drafted: int, hint: int) -> None:
        """A draft of ``drafted`` tokens answered a verdict whose hint was ``hint``."""
        if hint > 0 and drafted > 0:
            self._get(device_id).fill.update(min(1.0, drafted / hint))

    def observe_round(self, device_id: str, proposed: int, accepted: int) -> None:
        """A verified round: ``accepted`` of ``proposed`` draft tokens taken."""
        if proposed <= 0 or not 0 <= accepted <= proposed:
            return
        dev = self._get(device_id)
        g = self.alpha_decay
        dev.successes = g * dev.successes + accepted
        dev.failures = g * dev.failures + (1.0 if accepted < proposed else 0.0)
        dev.rounds = g * dev.rounds + 1.0

    def forget(self, key: str) -> None:
        """Drop an alias (its device's estimates stay), or a device's estimates."""
        if self._alias.pop(key, None) is None:
            self._devices.pop(key, None)

    def device(self, device_id: str) -> DeviceEstimate:
        """The current estimate for a device or alias (the priors if never observed),
        labelled with the key asked for."""
        p = self.priors
        dev = self._devices.get(self._alias.get(device_id, device_id))
        if dev is None:
            return DeviceEstimate(device_id, p.rtt_s, p.rtt_s / 2, p.draft_s, p.alpha, 0.0)
        prior_a = p.alpha * p.alpha_strength
        prior_b = (1.0 - p.alpha) * p.alpha_strength
        alpha = (prior_a + dev.successes) / (prior_a + prior_b + dev.successes + dev.failures)
        return DeviceEstimate(
            device_id,
            dev.rtt.value,
            dev.rtt.spread,
            dev.draft.value,
            alpha,
            dev.rounds,
            min(1.0, max(0.0, dev.fill.value)),
        )

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._alias.get(key, key) in self._devices

    def __len__(self) -> int:
        return len(self._devices)


# Shapes at which the prior speaks: together they identify a, b and c.
_PRIOR_SHAPES = ((1, 1), (8, 1), (8, 16))
DEFAULT_CALIBRATION_SHAPES = ((1, 1), (1, 8), (4, 4), (8, 1), (8, 8), (16, 5))


class ForwardModel:
    """``t(rows, tokens) = a + b*rows + c*rows*tokens``, NNLS over a bounded window.

    The normal equations are kept as running sums (O(1) an observation; they
    are recomputed from the window once per ``window`` observations so that
    rounding cannot build up), and solved lazily on the next read.
    """

    def __init__(
        self,
        prior: ForwardCoefficients | None = None,
        *,
        window: int = 256,
        prior_weight: float = 1e-3,
        anchor_weight: float = 8.0,
    ) -> None:
        if window < 1 or prior_weight <= 0 or anchor_weight <= 0:
            raise ConfigError(
                "forward model window must be >= 1, prior_weight and anchor_weight > 0"
            )
        self.prior = prior or LatencyPriors().forward
        self.prior_weight = prior_weight
        self.anchor_weight = anchor_weight
        self._anchors: list[tuple[int, int, float]] = []  # calibration: never leave the window
        self._obs: deque[tuple[int, int, float]] = deque(maxlen=window)
        self._sums = [0.0] * 9
        self._since_rebuild = 0
        self._fit: ForwardCoefficients | None = self.prior

    def __len__(self) -> int:
        return len(self._obs) + len(self._anchors)

    def observe(self, rows: int, tokens_per_row: int, seconds: float) -> None:
        """A measured forward of ``rows`` rows padded to ``tokens_per_row`` tokens.

        A verify step feeds the last committed token and the draft, so
        ``tokens_per_row`` is the longest draft in the batch + 1.
        """
        if rows <= 0 or tokens_per_row <= 0 or seconds < 0:
            return
        if len(self._obs) == self._obs.maxlen:
            _accumulate(self._sums, *self._obs[0], -1.0)
        self._obs.append((rows, tokens_per_row, seconds))
        _accumulate(self._sums, rows, tokens_per_row, seconds, 1.0)
        self._since_rebuild += 1
        if self._since_rebuild >= (self._obs.maxlen or 1):
            self._sums = [0.0] * 9
            for obs in self._obs:
                _accumulate(self._sums, *obs, 1.0)
            self._since_rebuild = 0
        self._fit = None

    def calibrate(
        self,
        measure: Callable[[int, int], float],
        shapes: Iterable[tuple[int, int]] = DEFAULT_CALIBRATION_SHAPES,
        *,
        repeats: int = 3,
    ) -> ForwardCoefficients:
        """Time each ``(rows, tokens)`` shape ``repeats`` times; the medians become anchors.

        ``measure(rows, tokens)`` runs one forward of that shape and returns its
        seconds (the caller owns the clock and any warm-up).  Anchors stay in the
        fit for good, each weighing ``anchor_weight`` observations: serving
        sees a narrow band of shapes (drafts of 2-5 tokens), along which the
        per-row and per-token costs are nearly collinear, and the calibration's
        spread of shapes (1 to 16 rows, 1 to 8 tokens) keeps them apart.
        """
        for rows, tokens in shapes:
            times = [measure(rows, tokens) for _ in range(max(1, repeats))]
            if rows > 0 and tokens > 0:
                self._anchors.append((rows, tokens, max(0.0, statistics.median(times))))
        self._fit = None
        return self.coefficients()

    def coefficients(self) -> ForwardCoefficients:
        if self._fit is None:
            self._fit = self._solve()
        return self._fit

    def predict(self, rows: int, tokens_per_row: int) -> float:
        return self.coefficients().predict(rows, tokens_per_row)

    def _solve(self) -> ForwardCoefficients:
        sums = list(self._sums)
        for obs in self._anchors:
            _accumulate(sums, *obs, self.anchor_weight)
        if not len(self) or not _identified(_gram(sums)):
            # the data leave a direction open: the prior fills it
            for r, t in _PRIOR_SHAPES:
                _accumulate(sums, r, t, self.prior.predict(r, t), self.prior_weight)
        gram, h = _gram(sums), sums[6:]
        scale = [math.sqrt(gram[i][i]) or 1.0 for i in range(3)]  # rows*tokens dwarfs the 1
        g = [[gram[i][j] / (scale[i] * scale[j]) for j in range(3)] for i in range(3)]
        hs = [h[i] / scale[i] for i in range(3)]
        # NNLS, exactly: the best feasible least-squares solution over the sets of free
        # coefficients (the others pinned at 0).  With G th = h the error is y.y - th.h.
        best, best_gain = [0.0, 0.0, 0.0], 0.0
        for m in (1, 2, 3):
            for cols in itertools.combinations(range(3), m):
                sol = _solve_small([[g[i][j] for j in cols] for i in cols], [hs[i] for i in cols])
                if sol is None or min(sol) < 0:
                    continue
                gain = sum(x * hs[i] for x, i in zip(sol, cols, strict=True))
                if gain > best_gain + 1e-15:
                    best = [0.0, 0.0, 0.0]
                    for x, i in zip(sol, cols, strict=True):
                        best[i] = x
                    best_gain = gain
        return ForwardCoefficients(*(best[i] / scale[i] for i in range(3)))


def _accumulate(sums: list[float], rows: int, tokens: int, seconds: float, w: float) -> None:
    """Add ``w`` x one observation to the normal equations of ``x = [1, r, r*t]``.

    ``sums``: the upper triangle of ``X^T W X`` (00 01 02 11 12 22), then ``X^T W y``.
    """
    r, rt = float(rows), float(rows) * tokens
    sums[0] += w
    sums[1] += w * r
    sums[2] += w * rt
    sums[3] += w * r * r
    sums[4] += w * r * rt
    sums[5] += w * rt * rt
    sums[6] += w * seconds
    sums[7] += w * r * seconds
    sums[8] += w * rt * seconds


def _gram(sums: list[float]) -> list[list[float]]:
    s00, s01, s02, s11, s12, s22 = sums[:6]
    return [[s00, s01, s02], [s01, s11, s12], [s02, s12, s22]]


def _identified(gram: list[list[float]]) -> bool:
    """Whether the data pin down a, b and c: the equilibrated Gram matrix is not singular.

    Its diagonal is 1, so its determinant (the product of its eigenvalues, which
    sum to 3) is in [0, 1] and near 0 when the observed shapes span fewer than
    three directions.
    """
    d = [math.sqrt(gram[i][i]) for i in range(3)]
    if min(d) == 0:
        return False
    g = [[gram[i][j] / (d[i] * d[j]) for j in range(3)] for i in range(3)]
    det = (
        g[0][0] * (g[1][1] * g[2][2] - g[1][2] * g[2][1])
        - g[0][1] * (g[1][0] * g[2][2] - g[1][2] * g[2][0])
        + g[0][2] * (g[1][0] * g[2][1] - g[1][1] * g[2][0])
    )
    return det > 1e-9


def _solve_small(a: list[list[float]], b: list[float]) -> list[float] | None:
    """``a x = b`` for n <= 3 by Gaussian elimination with partial pivoting; None if singular."""
    n = len(b)
    m = [[*row, rhs] for row, rhs in zip(a, b, strict=True)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[piv][col]) < 1e-12:
            return None
        m[col], m[piv] = m[piv], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= f * m[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x
