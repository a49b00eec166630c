"""One verification round: a batch of drafts, one forward pass, acceptance per draft.

Blocking and free of I/O: the service runs it in a worker thread.  Inputs are
snapshots, so the event loop may keep mutating sessions meanwhile.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from middleware.protocol import Draft, SamplingParams
from middleware.sampling import STREAM_REJECTION, process_logits, seeded_generator
from middleware.verifier.acceptance import (
    RelaxedAcceptance,
    coupled_accept,
    greedy_accept,
    relaxed_accept,
    speculative_sampling_accept,
)
from middleware.verifier.engine import Engine, VerifyItem
from middleware.verifier.sessions import clip_commit


@dataclass(frozen=True, slots=True)
class RoundInput:
    session_id: str
    prompt: tuple[int, ...]
    committed: tuple[int, ...]
    draft: Draft
    sampling: SamplingParams
    max_new_tokens: int
    stop_ids: frozenset[int]
    relaxed: RelaxedAcceptance | None = None  # opt-in LOSSY rule (greedy sessions only)


@dataclass(frozen=True, slots=True)
class RoundOutput:
    session_id: str
    seq: int
    proposed: int  # draft tokens offered
    accepted: int  # draft tokens accepted (before clipping)
    tokens: tuple[int, ...]  # to commit, clipped at stop/length
    finish_reason: str
    relaxed: int = 0  # accepted tokens the target would not have chosen (relaxed mode)


@dataclass(frozen=True, slots=True)
class RoundResult:
    outputs: list[RoundOutput]
    forward_s: float
    batch_size: int
    tokens_in: int


def rejection_rng(seed: int, position: int) -> torch.Generator:
    """The verifier's reproducible randomness for rejection sampling at a position."""
    return seeded_generator(seed, position, STREAM_REJECTION)


def accept_one(inp: RoundInput, logits: torch.Tensor) -> tuple[int, int, int]:
    """(n_accepted, next_token, n_relaxed) for one draft given target logits [k+1, V]."""
    draft = list(inp.draft.tokens)
    mode = inp.sampling.mode
    position = len(inp.committed)
    if mode == "greedy" and inp.relaxed is not None:
        return relaxed_accept(draft, logits, inp.relaxed)
    if mode == "greedy":
        return (*greedy_accept(draft, logits.argmax(dim=-1).tolist()), 0)
    logprobs = process_logits(logits, inp.sampling)  # [k+1, V]
    if mode == "coupled":
        return (*coupled_accept(draft, logprobs, inp.sampling.seed, position), 0)
    return (
        *speculative_sampling_accept(
            draft, list(inp.draft.q), logprobs.exp(), rejection_rng(inp.sampling.seed, position)
        ),
        0,
    )


def run_round(engine: Engine, inputs: list[RoundInput]) -> RoundResult:
    """Verify a batch with one forward pass and commit the accepted prefix of each draft."""
    t0 = time.perf_counter()
    items = [
        VerifyItem(i.session_id, [*i.prompt, *i.committed], list(i.draft.tokens)) for i in inputs
    ]
    logits = engine.verify_batch(items)
    forward_s = time.perf_counter() - t0
    outputs = []
    for inp, lg in zip(inputs, logits, strict=True):
        n, nxt, relaxed = accept_one(inp, lg)
        tokens, fin = clip_commit(
            [*inp.draft.tokens[:n], nxt], len(inp.committed), inp.max_new_tokens, inp.stop_ids
        )
        new_len = len(inp.prompt) + len(inp.committed) + len(tokens)
        if fin:
            engine.close(inp.session_id)
        else:
            engine.commit(inp.session_id, new_len)
        outputs.append(
            RoundOutput(
                inp.session_id, inp.draft.seq, len(inp.draft.tokens), n, tuple(tokens), fin, relaxed
            )
        )
    return RoundResult(outputs, forward_s, len(inputs), sum(len(i.draft) + 1 for i in items))
