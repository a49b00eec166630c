"""Acceptance rules and seeded sampling: hand-made cases and fixed-seed statistics."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from middleware.protocol.session import SamplingParams, SparseDist
from middleware.sampling import (
    STREAM_REJECTION,
    coupled_choice,
    gumbel_noise,
    mixed_key,
    process_logits,
    seeded_generator,
)
from middleware.verifier.acceptance import (
    RelaxedAcceptance,
    coupled_accept,
    greedy_accept,
    relaxed_accept,
    speculative_sampling_accept,
)

NEG = float("-inf")

# Chi-square critical values at significance 0.001 by degrees of freedom.
CHI2_999 = {3: 16.27, 5: 20.52, 7: 24.32}


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    keep = expected > 0
    assert int(counts[~keep].sum()) == 0, "a zero-probability token was emitted"
    return float((((counts[keep] - expected[keep]) ** 2) / expected[keep]).sum())


def one_hot_logprobs(tokens: list[int], vocab: int = 16) -> torch.Tensor:
    """[len(tokens), V] log-probabilities that put all mass on ``tokens``."""
    lp = torch.full((len(tokens), vocab), NEG)
    for i, t in enumerate(tokens):
        lp[i, t] = 0.0
    return lp


# -- greedy ------------------------------------------------------------------


def test_greedy_accepts_all_and_takes_bonus() -> None:
    assert greedy_accept([5, 6, 7], [5, 6, 7, 9]) == (3, 9)


def test_greedy_stops_at_first_mismatch_with_target_token() -> None:
    assert greedy_accept([5, 6, 7], [5, 1, 7, 9]) == (1, 1)
    assert greedy_accept([5, 6, 7], [4, 6, 7, 9]) == (0, 4)


def test_greedy_empty_draft_gives_one_target_token() -> None:
    assert greedy_accept([], [3]) == (0, 3)


def test_greedy_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError):
        greedy_accept([1, 2], [1, 2])


# -- seeded sampling -----------------------------------------------------------


def test_gumbel_noise_is_deterministic_per_seed_and_position() -> None:
    a = gumbel_noise(7, 3, 64)
    assert a.dtype == torch.float32 and a.shape == (64,)
    assert torch.equal(a, gumbel_noise(7, 3, 64))
    assert not torch.equal(a, gumbel_noise(7, 4, 64))
    assert not torch.equal(a, gumbel_noise(8, 3, 64))
    assert torch.isfinite(a).all()


def test_mixed_key_fits_63_bits_and_separates_streams() -> None:
    keys = {
        mixed_key(s, p, st)
        for s in (0, 1, (1 << 63) - 1)
        for p in (0, 1, 10**6)
        for st in (0, STREAM_REJECTION)
    }
    assert len(keys) == 18
    assert all(0 <= k < (1 << 63) for k in keys)


def test_gumbel_noise_has_standard_gumbel_moments() -> None:
    x = gumbel_noise(123, 0, 200_000).double()
    # Standard Gumbel: mean = Euler-Mascheroni constant, variance = pi^2 / 6.
    assert abs(float(x.mean()) - 0.5772156649) < 0.01
    assert abs(float(x.var()) - math.pi**2 / 6) < 0.03


def test_process_logits_temperature_then_topk_then_topp() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    plain = process_logits(logits, SamplingParams(mode="coupled"))
    assert torch.allclose(plain, torch.log_softmax(logits, -1))
    hot = process_logits(logits, SamplingParams(mode="coupled", temperature=2.0))
    assert torch.allclose(hot, torch.log_softmax(logits / 2.0, -1))
    top2 = process_logits(logits, SamplingParams(mode="coupled", top_k=2))
    assert torch.isinf(top2[2:]).all() and torch.allclose(top2[:2].exp().sum(), torch.tensor(1.0))
    probs = torch.softmax(logits, -1)
    nucleus = process_logits(logits, SamplingParams(mode="coupled", top_p=float(probs[0]) + 1e-3))
    assert torch.isfinite(nucleus[:2]).all() and torch.isinf(nucleus[2:]).all()
    only_top = process_logits(logits, SamplingParams(mode="coupled", top_p=1e-6))
    assert torch.isfinite(only_top[0]) and torch.isinf(only_top[1:]).all()


def test_process_logits_keeps_ties_at_the_kth_value_and_batches() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0]])
    out = process_logits(logits, SamplingParams(mode="coupled", top_k=2))
    assert torch.isfinite(out[0, :3]).all() and torch.isinf(out[0, 3])
    assert torch.isfinite(out[1, :2]).all() and torch.isinf(out[1, 2:]).all()


def test_coupled_choice_samples_softmax() -> None:
    """Gumbel-max over positions is a sample from softmax(logprobs): chi-square, fixed seeds."""
    logprobs = torch.log_softmax(torch.tensor([1.0, 0.0, -0.5, 2.0, 0.3, -2.0, 0.0, 1.2]), -1)
    counts = torch.zeros(8, dtype=torch.float64)
    for position in range(4000):
        counts[coupled_choice(logprobs, seed=99, position=position)] += 1
    assert chi_square(counts, logprobs.exp()) < CHI2_999[7]


def test_coupled_choice_never_picks_filtered_tokens() -> None:
    logprobs = process_logits(
        torch.randn(32, generator=torch.Generator().manual_seed(0)),
        SamplingParams(mode="coupled", top_k=3),
    )
    allowed = set(torch.topk(logprobs, 3).indices.tolist())
    assert {coupled_choice(logprobs, 5, p) for p in range(200)} <= allowed


# -- coupled -----------------------------------------------------------------


def test_coupled_accept_with_certain_targets() -> None:
    lp = one_hot_logprobs([3, 4, 5, 6])
    assert coupled_accept([3, 4, 5], lp, seed=1, start_position=0) == (3, 6)
    assert coupled_accept([3, 9, 5], lp, seed=1, start_position=0) == (1, 4)
    assert coupled_accept([], lp[:1], seed=1, start_position=0) == (0, 3)


def test_coupled_accept_uses_one_noise_per_generated_position() -> None:
    gen = torch.Generator().manual_seed(4)
    lp = torch.log_softmax(torch.randn(5, 16, generator=gen), -1)  # [k+1, V]
    start = 11
    picks = [coupled_choice(lp[i], 77, start + i) for i in range(5)]
    assert coupled_accept(picks[:4], lp, 77, start) == (4, picks[4])
    wrong = [*picks[:2], (picks[2] + 1) % 16, picks[3]]
    assert coupled_accept(wrong, lp, 77, start) == (2, picks[2])


# -- speculative sampling (rejection) -----------------------------------------


def dense_to_sparse(q: torch.Tensor) -> SparseDist:
    ids = [i for i in range(q.numel()) if float(q[i]) > 0]
    return SparseDist(tuple(ids), tuple(float(q[i]) for i in ids))


def test_rejection_accepts_when_target_dominates_draft() -> None:
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    q = [SparseDist((0,), (1.0,))]
    for seed in range(20):
        rng = seeded_generator(seed, 0, STREAM_REJECTION)
        # p(0) / q(0) = 0.5: accepted or corrected to token 1 (the only residual mass).
        n, nxt = speculative_sampling_accept([0], q, p, rng)
        assert (n, nxt) in ((1, 2), (0, 1))
    rng = seeded_generator(0, 0, STREAM_REJECTION)
    p_same = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    assert speculative_sampling_accept([1], [SparseDist((1,), (1.0,))], p_same, rng) == (1, 3)


def test_rejection_rejects_zero_target_probability_and_tokens_outside_q() -> None:
    p = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    rng = seeded_generator(3, 0, STREAM_REJECTION)
    assert speculative_sampling_accept([0], [SparseDist((0,), (1.0,))], p, rng) == (0, 2)
    p2 = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    # token 1 is not among q's ids: q(1) = 0, so it is rejected even though p(1) = 1.
    assert speculative_sampling_accept([1], [SparseDist((0,), (1.0,))], p2, rng) == (0, 1)


def test_rejection_is_reproducible_with_the_same_generator_seed() -> None:
    p = torch.softmax(torch.randn(3, 8, generator=torch.Generator().manual_seed(1)), -1)
    q = [
        dense_to_sparse(
            torch.softmax(torch.randn(8, generator=torch.Generator().manual_seed(i)), -1)
        )
        for i in (2, 3)
    ]
    results = {
        speculative_sampling_accept([1, 2], q, p, seeded_generator(5, 9, STREAM_REJECTION))
        for _ in range(5)
    }
    assert len(results) == 1


def test_rejection_rejects_bad_inputs() -> None:
    p = torch.full((2, 4), 0.25)
    rng = seeded_generator(0, 0)
    with pytest.raises(ValueError):
        speculative_sampling_accept([1], [], p, rng)
    with pytest.raises(ValueError):
        speculative_sampling_accept([9], [SparseDist((1,), (1.0,))], p, rng)
    with pytest.raises(ValueError):
        speculative_sampling_accept([1], [SparseDist((7,), (1.0,))], p, rng)


@pytest.mark.parametrize("q_kind", ["dense", "sparse"])
def test_rejection_first_token_is_distributed_as_target(q_kind: str) -> None:
    """Over many trials, the first emitted token follows p exactly (chi-square, fixed seeds).

    ``sparse``: the drafter samples from its full distribution but reports only
    its top 3 (ids, probs); tokens drawn outside them are rejected, which keeps
    the output exact.
    """
    vocab, trials = 8, 4000
    p = torch.tensor(
        [
            [0.30, 0.05, 0.20, 0.0, 0.15, 0.10, 0.12, 0.08],
            [0.10, 0.10, 0.10, 0.20, 0.10, 0.10, 0.10, 0.20],
        ]
    )  # [k+1, V]
    q_full = torch.tensor([0.05, 0.40, 0.10, 0.15, 0.05, 0.05, 0.10, 0.10])
    if q_kind == "dense":
        q = dense_to_sparse(q_full)
    else:
        top = torch.topk(q_full, 3)
        q = SparseDist(tuple(top.indices.tolist()), tuple(top.values.tolist()))
    draft_rng = torch.Generator().manual_seed(2024)
    counts = torch.zeros(vocab, dtype=torch.float64)
    accepted = 0
    for trial in range(trials):
        x = int(torch.multinomial(q_full, 1, generator=draft_rng))
        rng = seeded_generator(17, trial, STREAM_REJECTION)
        n, nxt = speculative_sampling_accept([x], [q], p, rng)
        first = x if n == 1 else nxt
        counts[first] += 1
        accepted += n
    stat = chi_square(counts, p[0])
    print(f"rejection ({q_kind}): chi2={stat:.2f} (7 dof), acceptance={accepted / trials:.3f}")
    assert stat < CHI2_999[7]
    # Expected acceptance = sum_x min(p, q) over q's ids.
    ids = torch.tensor(q.ids)
    expected = float(torch.minimum(p[0, ids], torch.tensor(q.probs)).sum())
    assert abs(accepted / trials - expected) < 4 * math.sqrt(expected * (1 - expected) / trials)


# --- relaxed (opt-in, lossy) -------------------------------------------------------------
def _logits(rows: list[list[float]]) -> torch.Tensor:
    return torch.log(torch.tensor(rows, dtype=torch.float32))


def test_relaxed_accepts_a_close_second_only_where_the_target_is_unsure() -> None:
    rule = RelaxedAcceptance(ratio=0.5, confidence=0.6)
    unsure = [0.40, 0.35, 0.25]  # top 0.40 < 0.6; token 1 has 0.875 x top
    sure = [0.90, 0.06, 0.04]  # top 0.90 >= 0.6: exact match required
    far = [0.45, 0.10, 0.45]  # token 1 has 0.22 x top < 0.5
    assert relaxed_accept([1, 0], _logits([unsure, sure, sure]), rule) == (2, 0, 1)
    assert relaxed_accept([1, 1], _logits([unsure, sure, sure]), rule) == (1, 0, 1)
    assert relaxed_accept([1], _logits([far, sure]), rule) == (0, 0, 0)
    assert relaxed_accept([0, 0], _logits([sure, unsure, far]), rule) == (2, 0, 0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 7), min_size=0, max_size=6), st.integers(0, 2**31 - 1))
def test_relaxed_with_no_slack_is_greedy(draft: list[int], seed: int) -> None:
    """ratio 1 and the tiniest confidence accept exactly what greedy accepts."""
    logits = torch.randn(len(draft) + 1, 8, generator=torch.Generator().manual_seed(seed))
    n, nxt, relaxed = relaxed_accept(draft, logits, RelaxedAcceptance(ratio=1.0, confidence=1e-9))
    assert (n, nxt) == greedy_accept(draft, logits.argmax(dim=-1).tolist()) and relaxed == 0


def test_relaxed_rule_bounds() -> None:
    for ratio, conf in ((0.0, 0.5), (1.5, 0.5), (0.5, 0.0), (0.5, 1.1)):
        with pytest.raises(ValueError):
            RelaxedAcceptance(ratio, conf)
