"""Acceptance rules for speculative decoding: pure tensor-in, tensor-out.

Every rule takes the ``k`` draft tokens and the target's view of the ``k + 1``
positions that follow the committed context (one per draft token plus the
bonus position) and returns ``(n_accepted, next_token)``: the first
``n_accepted`` draft tokens are committed, followed by ``next_token``, the
target's own token (a correction after a rejection, or the bonus token when
every draft token was accepted).  So each round commits ``n_accepted + 1``
tokens and always makes progress.

- :func:`greedy_accept`: exact match against the target's argmax; output
  equals target-only greedy decoding.
- :func:`coupled_accept`: the target picks its token at each position with the
  Gumbel-max trick and noise fixed by ``(seed, position)``
  (:func:`middleware.sampling.coupled_choice`); a draft token is accepted iff it
  equals that pick.  Output equals target-only seeded sampling
  (:func:`middleware.verifier.reference.reference_sample`) token for token.
- :func:`speculative_sampling_accept`: the rejection rule of Leviathan et al.
  2023 ("Fast Inference from Transformers via Speculative Decoding") and Chen et
  al. 2023 ("Accelerating LLM Decoding with Speculative Sampling"); output is
  distributed exactly as target-only sampling.
- :func:`relaxed_accept` (opt-in, LOSSY): greedy acceptance that also takes a
  close second where the target is unsure; output differs from the target's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from middleware.protocol.session import SparseDist
from middleware.sampling import coupled_choice


def _check_shapes(draft: Sequence[int], rows: int) -> None:
    if rows != len(draft) + 1:
        raise ValueError(f"target has {rows} positions, expected len(draft) + 1 = {len(draft) + 1}")


def greedy_accept(draft: Sequence[int], target_argmax: Sequence[int]) -> tuple[int, int]:
    """Accept the longest draft prefix equal to the target's argmax tokens.

    ``target_argmax`` has ``len(draft) + 1`` entries: the target's argmax after
    the last committed token and after each draft token.
    """
    _check_shapes(draft, len(target_argmax))
    for i, token in enumerate(draft):
        if int(token) != int(target_argmax[i]):
            return i, int(target_argmax[i])
    return len(draft), int(target_argmax[len(draft)])


def coupled_accept(
    draft: Sequence[int], target_logprobs: torch.Tensor, seed: int, start_position: int
) -> tuple[int, int]:
    """Accept while each draft token equals the target's Gumbel-max pick.

    ``target_logprobs [k+1, V]`` are the processed target log-probabilities
    (:func:`middleware.sampling.process_logits`); row ``i`` is for generated
    position ``start_position + i``.
    """
    _check_shapes(draft, target_logprobs.shape[0])
    for i in range(len(draft) + 1):
        target_token = coupled_choice(target_logprobs[i], seed, start_position + i)
        if i == len(draft) or int(draft[i]) != target_token:
            return i, target_token
    raise AssertionError("unreachable")


def _dense_q(dist: SparseDist, vocab: int) -> torch.Tensor:
    ids = torch.tensor(dist.ids, dtype=torch.long)  # [m]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError("q: token id outside the vocabulary")
    q = torch.zeros(vocab, dtype=torch.float64)  # [V]
    q.index_put_((ids,), torch.tensor(dist.probs, dtype=torch.float64), accumulate=True)
    return q


def speculative_sampling_accept(
    draft: Sequence[int], q: Sequence[SparseDist], target_probs: torch.Tensor, rng: torch.Generator
) -> tuple[int, int]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

    Draft token ``x_i`` is accepted with probability ``min(1, p_i(x) / q_i(x))``.
    On the first rejection the next token is sampled from
    ``norm(max(0, p_i - q_i))``; if all ``k`` are accepted the bonus token is
    sampled from ``p_k``.  ``target_probs [k+1, V]`` are the processed target
    probabilities; ``q`` holds the drafter's sampling distribution per draft
    token, sparse: zero outside its ids.  A token outside its ids is rejected;
    this stays exact as long as ``q`` gives the drafter's true probabilities on
    its ids.  ``rng`` (CPU) supplies every random draw, so a generator seeded
    per ``(seed, position)`` makes the verdict reproducible.
    """
    _check_shapes(draft, target_probs.shape[0])
    if len(q) != len(draft):
        raise ValueError("speculative sampling needs one q distribution per draft token")
    p = target_probs.to(device="cpu", dtype=torch.float64)  # [k+1, V]
    vocab = p.shape[-1]
    for i, token in enumerate(draft):
        x = int(token)
        if not 0 <= x < vocab:
            raise ValueError(f"draft token {x} outside the vocabulary")
        q_i = _dense_q(q[i], vocab)  # [V]
        u = float(torch.rand((), generator=rng, dtype=torch.float64))
        q_x, p_x = float(q_i[x]), float(p[i, x])
        if q_x > 0.0 and u * q_x < p_x:
            continue
        residual = (p[i] - q_i).clamp_min(0.0)  # [V]
        if float(residual.sum()) <= 0.0:
            residual = p[i]  # p <= q everywhere: only reachable through rounding
        return i, int(torch.multinomial(residual, 1, generator=rng).item())
    return len(draft), int(torch.multinomial(p[len(draft)], 1, generator=rng).item())


# --- opt-in, LOSSY ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RelaxedAcceptance:
    """Parameters of the opt-in relaxed (lossy) acceptance rule; see :func:`relaxed_accept`.

    ``confidence``: a position whose target top probability is at least this is
    *important* (the target is sure) and needs an exact match.  ``ratio``: at an
    unimportant position a draft token is accepted when the target gives it at
    least ``ratio`` times its top probability.
    """

    ratio: float = 0.5
    confidence: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0 or not 0.0 < self.confidence <= 1.0:
            raise ValueError("relaxed acceptance: ratio and confidence must be in (0, 1]")


def relaxed_accept(
    draft: Sequence[int], target_logits: torch.Tensor, rule: RelaxedAcceptance
) -> tuple[int, int, int]:
    """LOSSY greedy acceptance with thresholds by token importance.

    After decentralized speculative decoding's relaxed verification: a draft
    token equal to the target's argmax is accepted as in :func:`greedy_accept`;
    one that differs is still accepted where the target is unsure (top
    probability under ``rule.confidence``) and rates it at least ``rule.ratio``
    times its top choice.  Output is no longer what the target alone would
    produce.  Returns ``(n_accepted, next_token, n_relaxed)``: ``n_relaxed``
    counts the accepted tokens that differ from the target's argmax.
    """
    _check_shapes(draft, target_logits.shape[0])
    probs = torch.softmax(target_logits.float(), dim=-1)  # [k+1, V]
    top_p, top_i = probs.max(dim=-1)  # [k+1]
    relaxed = 0
    for i, token in enumerate(draft):
        x = int(token)
        if x == int(top_i[i]):
            continue
        best = float(top_p[i])
        if (
            0 <= x < probs.shape[-1]
            and best < rule.confidence
            and float(probs[i, x]) >= rule.ratio * best
        ):
            relaxed += 1
            continue
        return i, int(top_i[i]), relaxed
    return len(draft), int(top_i[len(draft)]), relaxed
