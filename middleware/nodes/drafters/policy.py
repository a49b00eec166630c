"""Dynamic draft length (SLED-style): when a drafter stops proposing.

A round of drafting proposes tokens one by one; after each token the policy
looks at the drafter's confidence in it and decides whether to go on:

- never more than the current maximum length (``max_len``, adapted, further
  clamped by the verifier's hint and by the caller's ``max_tokens``);
- stop once confidence drops below ``threshold``, but only after ``min_len``
  tokens (the low-confidence token itself is still proposed: drafting it
  cost nothing more, and verifying one more token is nearly free).

Adaptation: an exponential moving average of the per-round acceptance ratio
(accepted / proposed).  While it is high the drafter is trusted more (longer
drafts, lower threshold); while it is low, less.  Every value stays within the
configured bounds.

No torch, no I/O: this module runs on a device without the model stack.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from middleware.errors import ConfigError

Metric = Literal["max_prob", "entropy", "margin"]
METRICS: tuple[str, ...] = ("max_prob", "entropy", "margin")


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Static settings of a :class:`DraftPolicy`.

    ``max_len`` is the starting maximum draft length; adaptation moves it
    within ``[min_len, max_len_cap]``, and the threshold within
    ``[threshold_min, threshold_max]``.  ``high``/``low`` are the EMA
    acceptance levels above/below which the policy relaxes/tightens.
    """

    metric: Metric = "max_prob"
    threshold: float = 0.4
    min_len: int = 1
    max_len: int = 8
    adaptive: bool = True
    max_len_cap: int = 16
    threshold_min: float = 0.0
    threshold_max: float = 0.9
    threshold_step: float = 0.05
    ema_alpha: float = 0.3
    high: float = 0.8
    low: float = 0.4

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"policy.metric: {self.metric!r} not one of {METRICS}")
        if not 1 <= self.min_len <= self.max_len <= self.max_len_cap:
            raise ConfigError("policy: need 1 <= min_len <= max_len <= max_len_cap")
        if not 0.0 <= self.threshold_min <= self.threshold <= self.threshold_max <= 1.0:
            raise ConfigError("policy: need 0 <= threshold_min <= threshold <= threshold_max <= 1")
        if not 0.0 < self.ema_alpha <= 1.0:
            raise ConfigError("policy.ema_alpha outside (0, 1]")
        if not 0.0 <= self.low <= self.high <= 1.0:
            raise ConfigError("policy: need 0 <= low <= high <= 1")
        if self.threshold_step < 0.0:
            raise ConfigError("policy.threshold_step negative")


class DraftPolicy:
    """The adaptive stopping rule of one drafter (its state lives here).

    Deterministic and free of I/O; mutated only by :meth:`observe` and
    :meth:`hint`.
    """

    __slots__ = ("_hint", "config", "ema", "max_len", "threshold")

    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.config = config or PolicyConfig()
        self.threshold = self.config.threshold
        self.max_len = self.config.max_len
        self.ema: float | None = None  # EMA of the per-round acceptance ratio
        self._hint = 0

    @property
    def metric(self) -> Metric:
        return self.config.metric

    def limit(self, max_tokens: int) -> int:
        """How many tokens this round may propose at most (0 when ``max_tokens`` <= 0)."""
        n = min(self.max_len, max_tokens)
        if self._hint > 0:
            n = min(n, self._hint)
        return max(n, 0)

    def should_stop(self, i: int, confidence: float) -> bool:
        """After proposing token ``i`` (0-based) with ``confidence``: stop here?"""
        if i + 1 >= self.limit(self.max_len):
            return True
        return i + 1 >= self.config.min_len and confidence < self.threshold

    def hint(self, next_len: int) -> None:
        """Honour a verifier's speculation-length hint until the next one (0 clears it)."""
        self._hint = max(int(next_len), 0)

    def observe(self, proposed: int, accepted: int) -> None:
        """Feed one verified round: ``accepted`` of ``proposed`` draft tokens were taken."""
        if proposed <= 0 or not self.config.adaptive:
            return
        c = self.config
        ratio = min(max(accepted, 0), proposed) / proposed
        prev = ratio if self.ema is None else self.ema
        self.ema = (1.0 - c.ema_alpha) * prev + c.ema_alpha * ratio
        if self.ema >= c.high:
            self.max_len = min(self.max_len + 1, c.max_len_cap)
            self.threshold = max(self.threshold - c.threshold_step, c.threshold_min)
        elif self.ema < c.low:
            self.max_len = max(self.max_len - 1, c.min_len)
            self.threshold = min(self.threshold + c.threshold_step, c.threshold_max)

    def reset(self) -> None:
        """Back to the configured starting point (forget adaptation and hint)."""
        self.threshold = self.config.threshold
        self.max_len = self.config.max_len
        self.ema = None
        self._hint = 0

    def __repr__(self) -> str:
        return (
            f"DraftPolicy(metric={self.metric!r}, threshold={self.threshold:.3f}, "
            f"max_len={self.max_len}, ema={self.ema}, hint={self._hint})"
        )


def confidence_from_probs(probs: Sequence[float], metric: Metric) -> float:
    """A drafter's confidence in [0, 1] from a (possibly truncated) distribution.

    ``max_prob``: the largest probability.  ``margin``: largest minus second
    largest.  ``entropy``: ``exp(-H)`` in nats (1 for a point mass, 1/V for
    uniform over V tokens); mass missing from a truncated list is ignored.
    """
    if not probs:
        return 0.0
    if metric == "max_prob":
        return float(max(probs))
    if metric == "margin":
        top = sorted(probs, reverse=True)
        return float(top[0] - (top[1] if len(top) > 1 else 0.0))
    if metric == "entropy":
        h = -sum(p * math.log(p) for p in probs if p > 0.0)
        return math.exp(-h)
    raise ConfigError(f"unknown confidence metric {metric!r}")
