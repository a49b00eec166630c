"""The drafter interface every device-side drafting strategy implements.

A session's context is ``prompt + committed + speculative``: ``committed`` is
the verifier's truth so far, ``speculative`` are draft tokens already sent but
not yet verified (pipelining).  :meth:`Drafter.propose` continues after that
context.  Drafters that keep state (a KV cache) reuse the longest common
prefix with the context they saw last and drop the rest, so a rejection rolls
their state back by itself.

Token choice per sampling mode (model drafters):

- ``greedy``: argmax of the drafter's logits;
- ``coupled``: ``coupled_choice(process_logits(logits), seed, position + i)``,
  the same Gumbel noise the target uses, so draft and target agree whenever
  their perturbed argmaxes do;
- ``rejection``: a sample from the drafter's processed top-k distribution,
  reported as ``q`` so the verifier's rejection sampling is exact.

No torch here: an n-gram drafter runs on a device without the model stack.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from middleware.errors import ModelError
from middleware.nodes.drafters.policy import DraftPolicy
from middleware.protocol.session import SamplingParams, SparseDist, common_prefix

__all__ = ["DraftStats", "Drafter", "Proposal", "common_prefix"]


@dataclass(frozen=True, slots=True)
class Proposal:
    """Draft tokens for one round, with the drafter's confidence in each.

    ``q`` holds one distribution per token in rejection mode and is empty
    otherwise.
    """

    tokens: tuple[int, ...] = ()
    confidences: tuple[float, ...] = ()
    q: tuple[SparseDist, ...] = ()

    def __post_init__(self) -> None:
        if len(self.confidences) != len(self.tokens):
            raise ValueError("proposal: one confidence per token required")
        if self.q and len(self.q) != len(self.tokens):
            raise ValueError("proposal: q must be empty or one per token")

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass(slots=True)
class DraftStats:
    """Counters over verified rounds (mutable; owned by one drafter)."""

    rounds: int = 0
    proposed: int = 0
    accepted: int = 0

    def record(self, proposed: int, accepted: int) -> None:
        self.rounds += 1
        self.proposed += max(proposed, 0)
        self.accepted += max(min(accepted, proposed), 0)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (0 before any proposal)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted(self) -> float:
        """Mean accepted draft tokens per verified round."""
        return self.accepted / self.rounds if self.rounds else 0.0

    def reset(self) -> None:
        self.rounds = self.proposed = self.accepted = 0


class Drafter(ABC):
    """Proposes draft tokens for one session at a time.

    Subclasses implement :meth:`start` and :meth:`propose`; the adaptive
    state (draft length, threshold) lives in :attr:`policy`.
    """

    name: str
    policy: DraftPolicy
    stats: DraftStats

    def __init__(self, name: str, policy: DraftPolicy | None = None) -> None:
        self.name = name
        self.policy = policy or DraftPolicy()
        self.stats = DraftStats()
        self.sampling = SamplingParams()

    @abstractmethod
    def start(self, prompt: Sequence[int], sampling: SamplingParams) -> None:
        """Begin a new session: drop all per-session state."""

    @abstractmethod
    def propose(
        self, committed: Sequence[int], speculative: Sequence[int], max_tokens: int, position: int
    ) -> Proposal:
        """Draft up to ``max_tokens`` tokens after ``prompt + committed + speculative``.

        ``position`` is the index among generated tokens of the first token to
        propose (``len(committed) + len(speculative)``); it keys the coupled
        Gumbel noise and the rejection-mode random stream.
        """

    def _room(
        self,
        prompt: Sequence[int],
        committed: Sequence[int],
        speculative: Sequence[int],
        max_tokens: int,
        max_context: int,
    ) -> tuple[list[int], int]:
        """A model drafter's context (``prompt + committed + speculative``) and how many
        tokens it may draft on it now (policy and context window; 0: none)."""
        context = [*prompt, *(int(t) for t in committed), *(int(t) for t in speculative)]
        if not context:
            raise ModelError(f"{self.name}: propose() before start() or with an empty prompt")
        return context, min(self.policy.limit(max_tokens), max_context - len(context))

    def observe(self, proposed: int, accepted: int) -> None:
        """Feed back one verified round (``accepted`` of ``proposed`` taken)."""
        self.stats.record(proposed, accepted)
        self.policy.observe(proposed, accepted)

    def hint(self, next_len: int) -> None:
        """Pass on the verifier's speculation-length hint (0 clears it)."""
        self.policy.hint(next_len)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, policy={self.policy!r})"
