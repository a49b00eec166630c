"""Seeded sampling shared by device drafters and the verifier.

Everything here is a pure function of its arguments so the device and the
verifier compute the same thing:

- :func:`process_logits` turns raw logits into the log-probabilities tokens
  are sampled from (temperature, then top-k, then top-p, then log-softmax).
- :func:`gumbel_noise` is standard Gumbel noise fixed by ``(seed, position)``.
- :func:`coupled_choice` is the Gumbel-max trick: ``argmax(logprobs + noise)``
  is an exact sample from ``softmax(logprobs)``.  Because the noise depends
  only on ``(seed, position)``, a drafter and the target that share it pick
  the same token whenever their distributions are close enough, and the
  target's pick is a function of the target alone, which is what makes the
  coupled mode lossless.

``position`` is the index of the token among the *generated* tokens of a
session (0 for the first token after the prompt).

Noise is drawn from a CPU ``torch.Generator`` (mt19937, platform
independent) in float64 and rounded to float32.  A device whose ``log`` differs
from the verifier's in the last bit can at worst make a different draft pick
in a near-tie; that lowers acceptance but never changes committed output,
which the verifier alone decides.
"""

from __future__ import annotations

import torch

from middleware.protocol.session import SamplingParams

MASK64 = (1 << 64) - 1
MASK63 = (1 << 63) - 1
# Odd 64-bit constants (golden ratio and a splitmix multiplier) that spread
# position and stream across the seed's bits.
POSITION_MIX = 0x9E3779B97F4A7C15
STREAM_MIX = 0xD1B54A32D192ED03

STREAM_GUMBEL = 0
STREAM_REJECTION = 1


def splitmix64(x: int) -> int:
    """One splitmix64 output for state ``x`` (a well-mixed 64-bit hash)."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def mixed_key(seed: int, position: int, stream: int = STREAM_GUMBEL) -> int:
    """A 63-bit generator key for ``(seed, position, stream)``."""
    if seed < 0 or position < 0 or stream < 0:
        raise ValueError("seed, position and stream must be non-negative")
    x = (seed ^ (position * POSITION_MIX) ^ (stream * STREAM_MIX)) & MASK64
    return splitmix64(x) & MASK63


def seeded_generator(seed: int, position: int, stream: int = STREAM_GUMBEL) -> torch.Generator:
    """A fresh CPU generator whose state depends only on ``(seed, position, stream)``."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(mixed_key(seed, position, stream))
    return gen


def gumbel_noise(seed: int, position: int, vocab_size: int) -> torch.Tensor:
    """Standard Gumbel noise, float32 ``[vocab_size]`` on CPU, fixed by ``(seed, position)``."""
    gen = seeded_generator(seed, position, STREAM_GUMBEL)
    u = torch.rand(vocab_size, generator=gen, dtype=torch.float64)  # [V] in [0, 1)
    u = u.clamp_min(torch.finfo(torch.float64).tiny)
    return (-torch.log(-torch.log(u))).to(torch.float32)


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probabilities ``[..., V]`` (float32) to sample from, given raw ``logits [..., V]``.

    Order: divide by ``temperature``; keep the ``top_k`` largest (ties with the
    k-th value are kept); keep the smallest set of most likely tokens whose
    probability reaches ``top_p`` (the most likely token is always kept, ties
    broken by a stable sort on token id); filtered entries become ``-inf``;
    then ``log_softmax``.  ``params.mode`` is not consulted: greedy callers take
    the argmax of the raw logits instead.
    """
    x = logits.to(torch.float32) / params.temperature  # [..., V]
    vocab = x.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]  # [..., 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True, stable=True)  # [..., V]
        probs = torch.softmax(sorted_x, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # [..., V]
        drop_sorted = mass_before >= params.top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return torch.log_softmax(x, dim=-1)


def coupled_choice(logprobs: torch.Tensor, seed: int, position: int) -> int:
    """Gumbel-max sample from ``softmax(logprobs [V])`` with noise fixed by ``(seed, position)``."""
    noise = gumbel_noise(seed, position, logprobs.shape[-1])  # [V]
    return int(torch.argmax(logprobs.to(torch.float32).cpu() + noise).item())


def greedy_choice(logits: torch.Tensor) -> int:
    """Argmax of ``logits [V]`` (first index on ties, as ``generate`` does)."""
    return int(torch.argmax(logits).item())
