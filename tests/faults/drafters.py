"""Lightweight drafters for simulated devices: a replayed draft model and a pacing wrapper.

Neither changes what is committed (the verifier decides that); they only shape
the traffic: how long drafts are, how often they are wrong, how long a device
takes to draft.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence

from middleware.nodes.drafters.base import Drafter, Proposal
from middleware.protocol import SamplingParams


class ReplayDrafter(Drafter):
    """Knows the target's continuation of each prompt and proposes it, right with probability
    ``alpha`` per position (one seeded draw per position, so proposing the same position again
    gives the same answer, as a deterministic draft model would); a wrong guess is never the
    right token.  Confidence is high for right tokens and low for wrong ones, so the draft
    policy tends to stop at a wrong token."""

    def __init__(
        self,
        references: Mapping[tuple[int, ...], Sequence[int]],
        *,
        alpha: float,
        vocab_size: int,
        seed: int = 0,
        name: str = "replay",
    ) -> None:
        super().__init__(name)
        self.references = references
        self.alpha = alpha
        self.vocab_size = vocab_size
        self.seed = seed
        self.reference: tuple[int, ...] = ()

    def start(self, prompt: Sequence[int], sampling: SamplingParams) -> None:
        self.sampling = sampling
        self.reference = tuple(self.references[tuple(prompt)])
        self.seed = hash((self.seed, self.reference)) & 0xFFFF_FFFF

    def _token(self, pos: int, on_path: bool) -> tuple[int, float, bool]:
        rng = random.Random(self.seed * 1_000_003 + pos)
        hit, offset, u = rng.random() < self.alpha, rng.randrange(1, self.vocab_size), rng.random()
        truth = self.reference[pos] if pos < len(self.reference) else 0
        if on_path and hit and pos < len(self.reference):
            return truth, 0.5 + 0.5 * u, True
        return (truth + offset) % self.vocab_size, 0.3 * u, False

    def propose(
        self, committed: Sequence[int], speculative: Sequence[int], max_tokens: int, position: int
    ) -> Proposal:
        context = (*committed, *speculative)
        on_path = context == self.reference[: len(context)]
        tokens: list[int] = []
        confs: list[float] = []
        limit = self.policy.limit(max_tokens)
        while len(tokens) < limit:
            tok, conf, on_path = self._token(len(context) + len(tokens), on_path)
            tokens.append(tok)
            confs.append(conf)
            if self.policy.should_stop(len(tokens) - 1, conf):
                break
        return Proposal(tuple(tokens), tuple(confs))


class Paced(Drafter):
    """Any drafter, slowed to ``seconds_per_token`` per proposed token (a device's drafting
    speed), so that a fault can land while generation is under way."""

    def __init__(self, inner: Drafter, seconds_per_token: float) -> None:
        super().__init__(inner.name, inner.policy)
        self.inner = inner
        self.stats = inner.stats
        self.seconds_per_token = seconds_per_token

    def start(self, prompt: Sequence[int], sampling: SamplingParams) -> None:
        self.sampling = sampling
        self.inner.start(prompt, sampling)

    def propose(
        self, committed: Sequence[int], speculative: Sequence[int], max_tokens: int, position: int
    ) -> Proposal:
        p = self.inner.propose(committed, speculative, max_tokens, position)
        if p.tokens and self.seconds_per_token > 0:
            time.sleep(
                len(p.tokens) * self.seconds_per_token
            )  # runs in the session's worker thread
        return p

    def observe(self, proposed: int, accepted: int) -> None:
        self.inner.observe(proposed, accepted)

    def hint(self, next_len: int) -> None:
        self.inner.hint(next_len)
