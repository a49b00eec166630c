"""The live latency model: EWMAs, acceptance estimate, forward-time NNLS (injected times only)."""

from __future__ import annotations

import random

import pytest

from middleware.errors import ConfigError
from middleware.verifier.latency import (
    DEFAULT_CALIBRATION_SHAPES,
    ForwardCoefficients,
    ForwardModel,
    LatencyModel,
    LatencyPriors,
    expected_accepted,
)

TRUE = ForwardCoefficients(a=0.030, b=0.002, c=0.0005)
SHAPES = [(r, t) for r in (1, 2, 4, 8, 16) for t in (1, 3, 5, 9, 17)]


def play_round(rng: random.Random, alpha: float, k: int) -> int:
    """Accepted tokens of a k-token draft when each is accepted with probability alpha."""
    accepted = 0
    while accepted < k and rng.random() < alpha:
        accepted += 1
    return accepted


# --- expected accepted tokens -------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 0.99])
@pytest.mark.parametrize("k", [0, 1, 4, 16])
def test_expected_accepted_is_the_geometric_sum(alpha: float, k: int) -> None:
    assert expected_accepted(alpha, k) == pytest.approx(sum(alpha**i for i in range(1, k + 1)))


def test_expected_accepted_at_alpha_one_is_k() -> None:
    assert expected_accepted(1.0, 7) == 7.0


def test_expected_accepted_matches_simulated_rounds() -> None:
    rng = random.Random(3)
    mean = sum(play_round(rng, 0.7, 5) for _ in range(40_000)) / 40_000
    assert mean == pytest.approx(expected_accepted(0.7, 5), rel=0.02)


# --- per-device estimates -----------------------------------------------------------------


def test_unknown_device_reads_as_the_priors() -> None:
    priors = LatencyPriors(rtt_s=0.07, draft_s=0.011, alpha=0.55)
    est = LatencyModel(priors).device("nobody")
    assert (est.rtt_s, est.draft_s, est.alpha, est.rounds) == (0.07, 0.011, 0.55, 0.0)
    assert est.expected_committed(3) == pytest.approx(1 + 0.55 + 0.55**2 + 0.55**3)
    assert est.turnaround_s(4) == pytest.approx(0.07 + 4 * 0.011)


def test_rtt_converges_and_spread_follows_the_jitter() -> None:
    model = LatencyModel()
    rng = random.Random(1)
    for _ in range(300):
        model.observe_rtt("d", 0.040 + rng.uniform(-0.004, 0.004))
    est = model.device("d")
    assert est.rtt_s == pytest.approx(0.040, abs=0.002)
    # mean absolute deviation of U(-4, 4) ms is 2 ms
    assert 0.0005 < est.rtt_spread_s < 0.004


def test_one_rtt_spike_moves_the_mean_by_at_most_clip_spreads() -> None:
    model = LatencyModel()
    for i in range(50):
        model.observe_rtt("d", 0.040 + (0.001 if i % 2 else -0.001))
    before = model.device("d")
    model.observe_rtt("d", 2.0)  # a 2 s stall
    after = model.device("d")
    assert after.rtt_s - before.rtt_s <= 0.125 * 4 * before.rtt_spread_s + 1e-12
    assert after.rtt_s < 0.041
    assert after.rtt_spread_s > before.rtt_spread_s  # but the spread widens at once


def test_a_lasting_rtt_change_is_followed() -> None:
    model = LatencyModel()
    for _ in range(50):
        model.observe_rtt("d", 0.010)
    for _ in range(100):
        model.observe_rtt("d", 0.100)
    assert model.device("d").rtt_s == pytest.approx(0.100, rel=0.02)


def test_reported_draft_time_is_per_token() -> None:
    model = LatencyModel()
    for _ in range(60):
        model.observe_draft("d", 0.080, 4)
    assert model.device("d").draft_s == pytest.approx(0.020)


def test_inferred_draft_time_subtracts_the_rtt_and_clamps_at_zero() -> None:
    model = LatencyModel()
    for _ in range(40):
        model.observe_rtt("d", 0.030)
    # verdict sent at t=10.0, 5-token draft in at 10.130: (0.130 - 0.030) / 5 = 20 ms a token
    for i in range(60):
        model.observe_turnaround("d", 10.0 + i, 10.130 + i, 5)
    assert model.device("d").draft_s == pytest.approx(0.020, rel=1e-6)
    fast = LatencyModel()
    for _ in range(40):
        fast.observe_rtt("f", 0.030)
    for i in range(60):  # in sooner than one RTT: drafted while waiting, counts as 0
        fast.observe_turnaround("f", 1.0 + i, 1.020 + i, 5)
    assert fast.device("f").draft_s == 0.0


def test_alpha_is_the_censored_geometric_posterior_mean() -> None:
    priors = LatencyPriors(alpha=0.5, alpha_strength=2.0)  # Beta(1, 1)
    model = LatencyModel(priors, alpha_decay=1.0)
    model.observe_round("d", 4, 4)  # 4 successes, censored
    model.observe_round("d", 4, 1)  # 1 success, then a reject
    model.observe_round("d", 3, 0)  # a reject at once
    # S = 5, F = 2: (1 + 5) / (2 + 7)
    assert model.device("d").alpha == pytest.approx(6 / 9)
    assert model.device("d").rounds == 3.0


@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.8, 0.95])
def test_alpha_converges_without_forgetting(alpha: float) -> None:
    model = LatencyModel(alpha_decay=1.0)
    rng = random.Random(int(alpha * 100))
    for i in range(4000):
        k = 1 + i % 8
        model.observe_round("d", k, play_round(rng, alpha, k))
    assert model.device("d").alpha == pytest.approx(alpha, abs=0.015)


def test_alpha_with_forgetting_converges_and_tracks_a_change() -> None:
    model = LatencyModel(alpha_decay=0.98)
    rng = random.Random(11)
    errors = []
    for i in range(3000):
        model.observe_round("d", 6, play_round(rng, 0.85, 6))
        if i >= 500:
            errors.append(abs(model.device("d").alpha - 0.85))
    assert sum(errors) / len(errors) < 0.03
    for _ in range(300):  # the drafter falls behind the target (new topic)
        model.observe_round("d", 6, play_round(rng, 0.3, 6))
    assert model.device("d").alpha == pytest.approx(0.3, abs=0.08)


def test_invalid_observations_are_ignored() -> None:
    model = LatencyModel()
    model.observe_round("d", 0, 0)
    model.observe_round("d", 3, 4)
    model.observe_draft("d", 0.1, 0)
    model.observe_rtt("d", -1.0)
    model.observe_turnaround("d", 5.0, 4.0, 3)
    est = model.device("d")
    assert (est.alpha, est.rtt_s, est.draft_s) == (
        model.priors.alpha,
        model.priors.rtt_s,
        model.priors.draft_s,
    )


def test_forget_and_the_device_bound() -> None:
    model = LatencyModel(max_devices=3)
    for d in "abcd":
        model.observe_rtt(d, 0.01)
    assert len(model) == 3 and "a" not in model and "d" in model
    model.observe_rtt("b", 0.01)  # b is now the most recent, c the oldest
    model.observe_rtt("e", 0.01)
    assert "c" not in model and "b" in model
    model.forget("b")
    assert "b" not in model
    assert model.device("b").rtt_s == model.priors.rtt_s


@pytest.mark.parametrize(
    "kwargs", [{"rtt_s": -1.0}, {"alpha": 1.0}, {"alpha": 0.0}, {"alpha_strength": 0.0}]
)
def test_invalid_priors_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        LatencyPriors(**kwargs)  # type: ignore[arg-type]


def test_invalid_decay_is_refused() -> None:
    with pytest.raises(ConfigError):
        LatencyModel(alpha_decay=0.0)


# --- the forward-time model ---------------------------------------------------------------


def test_forward_model_without_observations_is_the_prior() -> None:
    prior = ForwardCoefficients(0.02, 0.001, 0.0004)
    fm = ForwardModel(prior)
    co = fm.coefficients()
    assert (co.a, co.b, co.c) == pytest.approx((0.02, 0.001, 0.0004))
    assert fm.predict(4, 5) == pytest.approx(0.02 + 0.004 + 0.0004 * 20)


def test_forward_model_recovers_exact_coefficients() -> None:
    fm = ForwardModel(ForwardCoefficients(0.1, 0.0, 0.01))  # a wrong prior
    for rows, tokens in SHAPES:
        fm.observe(rows, tokens, TRUE.predict(rows, tokens))
    co = fm.coefficients()
    assert co.a == pytest.approx(TRUE.a, rel=1e-3)
    assert co.b == pytest.approx(TRUE.b, rel=1e-3)
    assert co.c == pytest.approx(TRUE.c, rel=1e-3)


def test_forward_model_recovers_coefficients_from_noisy_observations() -> None:
    fm = ForwardModel(window=512)
    rng = random.Random(5)
    for _ in range(10):
        for rows, tokens in SHAPES:
            fm.observe(rows, tokens, TRUE.predict(rows, tokens) * rng.uniform(0.95, 1.05))
    co = fm.coefficients()
    assert co.a == pytest.approx(TRUE.a, rel=0.05)
    assert co.b == pytest.approx(TRUE.b, rel=0.25)
    assert co.c == pytest.approx(TRUE.c, rel=0.05)


def test_forward_coefficients_stay_non_negative() -> None:
    fm = ForwardModel()
    # time falls with rows at fixed tokens: unconstrained least squares would give b < 0
    for rows, tokens, s in [
        (1, 4, 0.050),
        (2, 4, 0.049),
        (4, 4, 0.048),
        (8, 4, 0.047),
        (1, 8, 0.051),
        (8, 8, 0.048),
    ]:
        fm.observe(rows, tokens, s)
    co = fm.coefficients()
    assert min(co.a, co.b, co.c) >= 0.0
    assert co.a == pytest.approx(0.049, abs=0.002)


def test_one_observation_is_matched_and_the_prior_fills_in() -> None:
    fm = ForwardModel(ForwardCoefficients(0.02, 0.001, 0.0005))
    fm.observe(4, 5, 0.060)
    assert fm.predict(4, 5) == pytest.approx(0.060, rel=0.05)
    # elsewhere: increasing in rows and tokens, positive
    assert 0 < fm.predict(1, 1) < fm.predict(8, 1) < fm.predict(8, 16)


def test_repeated_single_shape_still_predicts_other_shapes() -> None:
    fm = ForwardModel(ForwardCoefficients(0.02, 0.001, 0.0005))
    for _ in range(200):
        fm.observe(1, 5, 0.030)  # a lone session, always 4 draft tokens
    assert fm.predict(1, 5) == pytest.approx(0.030, rel=1e-3)
    assert fm.predict(16, 5) > fm.predict(1, 5)


def test_the_window_forgets_old_observations() -> None:
    fm = ForwardModel(window=len(SHAPES))
    for rows, tokens in SHAPES:
        fm.observe(rows, tokens, 3 * TRUE.predict(rows, tokens))  # a slower phase
    for rows, tokens in SHAPES:
        fm.observe(rows, tokens, TRUE.predict(rows, tokens))
    assert len(fm) == len(SHAPES)
    assert fm.coefficients().a == pytest.approx(TRUE.a, rel=1e-3)


def test_calibrate_times_each_shape_and_takes_the_median() -> None:
    calls: list[tuple[int, int]] = []

    def measure(rows: int, tokens: int) -> float:
        calls.append((rows, tokens))
        spike = 1.0 if len(calls) % 3 == 1 else 0.0  # first of every three: a GC pause
        return TRUE.predict(rows, tokens) + spike

    co = ForwardModel(ForwardCoefficients(0.1, 0.1, 0.1)).calibrate(measure, repeats=3)
    assert calls == [s for s in DEFAULT_CALIBRATION_SHAPES for _ in range(3)]
    assert (co.a, co.b, co.c) == pytest.approx((TRUE.a, TRUE.b, TRUE.c), rel=1e-2)


def test_calibration_anchors_outlast_the_window_and_separate_collinear_costs() -> None:
    # Serving sees one band of shapes: here always 3 tokens a row, along which the per-row
    # and per-token costs cannot be told apart.  Calibrated shapes keep them apart for good;
    # the same shapes observed online leave the window and the prior fills the gap.
    true = ForwardCoefficients(a=0.105, b=0.0, c=0.0065)
    anchored, online = ForwardModel(window=64), ForwardModel(window=64)
    anchored.calibrate(true.predict, repeats=1)
    for rows, tokens in DEFAULT_CALIBRATION_SHAPES:
        online.observe(rows, tokens, true.predict(rows, tokens))
    for i in range(200):
        rows = 2 + i % 19
        anchored.observe(rows, 3, true.predict(rows, 3))
        online.observe(rows, 3, true.predict(rows, 3))
    assert len(anchored) == 64 + len(DEFAULT_CALIBRATION_SHAPES) and len(online) == 64
    assert anchored.predict(8, 10) == pytest.approx(true.predict(8, 10), rel=0.01)
    assert abs(online.predict(8, 10) / true.predict(8, 10) - 1) > 0.2


def test_latency_model_owns_a_forward_model() -> None:
    model = LatencyModel(LatencyPriors(forward=ForwardCoefficients(0.05, 0.0, 0.0)))
    assert model.forward.predict(3, 3) == pytest.approx(0.05)
    model.forward.observe(3, 3, 0.01)
    assert model.forward.predict(3, 3) == pytest.approx(0.01, rel=0.05)


def test_aliases_read_and_feed_their_device() -> None:
    model = LatencyModel()
    model.alias("s1", "dev")
    model.alias("s2", "dev")
    model.observe_round("s1", proposed=4, accepted=4)
    model.observe_rtt("s2", 0.2)
    one, two, dev = model.device("s1"), model.device("s2"), model.device("dev")
    assert (one.device_id, two.device_id, dev.device_id) == ("s1", "s2", "dev")
    assert one.alpha == two.alpha == dev.alpha > model.priors.alpha
    assert one.rtt_s == dev.rtt_s != model.priors.rtt_s
    assert len(model) == 1 and "s1" in model
    model.forget("s1")  # the session ends: its device's estimates stay
    assert "s1" not in model and "dev" in model and model.device("s2").alpha == dev.alpha
    model.forget("dev")
    assert "dev" not in model and "s2" not in model
