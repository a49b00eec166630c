"""Model-free prompt-lookup drafting (pure Python, any vocabulary).

The last ``n`` tokens of the context (``n`` from ``max_n`` down to
``min_n``) are looked up among their earlier occurrences; the token that
followed the most recent occurrence is proposed, appended, and the lookup
repeats.  Confidence is ``n / max_n`` times the share of the (up to
``followers``) most recent occurrences that were followed by the same token,
so long, consistent matches draft far and short, ambiguous ones stop early.

When even the last token never occurred before, an optional online bigram
table (learned from prompts and committed tokens, kept across sessions,
bounded in size) supplies the most frequent successor at low confidence.

The index maps every n-gram to its end positions and follows the context
incrementally: a call costs O(changed tokens * max_n + proposed * max_n).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence

from middleware.errors import ConfigError
from middleware.nodes.drafters.base import Drafter, Proposal, common_prefix
from middleware.nodes.drafters.policy import DraftPolicy
from middleware.protocol.session import SamplingParams, SparseDist

Key = tuple[int, ...]


class NGramIndex:
    """End positions of every n-gram (``n <= max_n``) of a token list that grows and shrinks."""

    __slots__ = ("_ends", "max_n", "tokens")

    def __init__(self, max_n: int) -> None:
        self.max_n = max_n
        self.tokens: list[int] = []
        self._ends: dict[Key, list[int]] = {}  # n-gram -> ascending end indices

    def push(self, token: int) -> None:
        self.tokens.append(token)
        end = len(self.tokens) - 1
        for n in range(1, min(self.max_n, end + 1) + 1):
            self._ends.setdefault(tuple(self.tokens[end - n + 1 : end + 1]), []).append(end)

    def pop(self) -> None:
        end = len(self.tokens) - 1
        for n in range(1, min(self.max_n, end + 1) + 1):
            key = tuple(self.tokens[end - n + 1 : end + 1])
            ends = self._ends[key]
            ends.pop()  # ascending, so the last entry is `end`
            if not ends:
                del self._ends[key]
        self.tokens.pop()

    def sync(self, context: Sequence[int]) -> None:
        """Make the index describe ``context``, reusing the longest common prefix."""
        keep = common_prefix(self.tokens, context)
        while len(self.tokens) > keep:
            self.pop()
        for t in context[keep:]:
            self.push(int(t))

    def earlier_ends(self, n: int) -> list[int]:
        """End indices of earlier occurrences of the last ``n`` tokens (oldest first)."""
        size = len(self.tokens)
        if size < n + 1:
            return []
        ends = self._ends.get(tuple(self.tokens[size - n :]), [])
        return ends[:-1]  # the last entry is the suffix itself


class BigramTable:
    """Online successor counts, bounded to ``max_keys`` predecessor tokens."""

    __slots__ = ("_next", "max_keys")

    def __init__(self, max_keys: int = 65_536) -> None:
        self.max_keys = max_keys
        self._next: dict[int, Counter[int]] = {}

    def learn(self, tokens: Sequence[int]) -> None:
        for a, b in itertools.pairwise(tokens):
            nxt = self._next.get(a)
            if nxt is None:
                if len(self._next) >= self.max_keys:
                    continue
                nxt = self._next[a] = Counter()
            nxt[b] += 1

    def best(self, token: int) -> tuple[int, float] | None:
        """Most frequent successor of ``token`` and its share, or None."""
        nxt = self._next.get(token)
        if not nxt:
            return None
        tok, count = nxt.most_common(1)[0]
        return tok, count / sum(nxt.values())


class NGramDrafter(Drafter):
    """Prompt-lookup drafter: copies what followed earlier occurrences of the context's tail."""

    def __init__(
        self,
        n: int = 3,
        policy: DraftPolicy | None = None,
        *,
        min_n: int = 1,
        followers: int = 16,
        bigram: bool = True,
        bigram_weight: float = 0.25,
        name: str | None = None,
    ) -> None:
        if not 1 <= min_n <= n:
            raise ConfigError("ngram: need 1 <= min_n <= n")
        super().__init__(name or f"ngram{n}", policy)
        self.max_n = n
        self.min_n = min_n
        self.followers = max(followers, 1)
        self.bigram_weight = bigram_weight
        self.bigram = BigramTable() if bigram else None
        self._index = NGramIndex(n)
        self._prompt: tuple[int, ...] = ()
        self._learned = 0  # committed tokens already fed to the bigram table

    def start(self, prompt: Sequence[int], sampling: SamplingParams) -> None:
        self.sampling = sampling
        self._prompt = tuple(int(t) for t in prompt)
        self._index = NGramIndex(self.max_n)
        self._learned = 0
        if self.bigram is not None:
            self.bigram.learn(self._prompt)

    def propose(
        self, committed: Sequence[int], speculative: Sequence[int], max_tokens: int, position: int
    ) -> Proposal:
        self._learn_committed(committed)
        self._index.sync([*self._prompt, *committed, *speculative])
        limit = self.policy.limit(max_tokens)
        tokens: list[int] = []
        confs: list[float] = []
        while len(tokens) < limit:
            guess = self.next_token()
            if guess is None:
                break
            tok, conf = guess
            tokens.append(tok)
            confs.append(conf)
            self._index.push(tok)
            if self.policy.should_stop(len(tokens) - 1, conf):
                break
        q = (
            tuple(SparseDist((t,), (1.0,)) for t in tokens)
            if self.sampling.mode == "rejection"
            else ()
        )
        return Proposal(tuple(tokens), tuple(confs), q)

    def next_token(self) -> tuple[int, float] | None:
        """The continuation of the current context and its confidence, or None."""
        for n in range(self.max_n, self.min_n - 1, -1):
            ends = self._index.earlier_ends(n)
            if not ends:
                continue
            toks = self._index.tokens
            tok = toks[ends[-1] + 1]
            recent = ends[-self.followers :]
            agree = sum(1 for e in recent if toks[e + 1] == tok) / len(recent)
            return tok, agree * n / self.max_n
        if self.bigram is not None and self._index.tokens:
            best = self.bigram.best(self._index.tokens[-1])
            if best is not None:
                return best[0], best[1] * self.bigram_weight / self.max_n
        return None

    def _learn_committed(self, committed: Sequence[int]) -> None:
        if self.bigram is None or len(committed) <= self._learned:
            return
        # Include the joint with the previous token (or the prompt's last token).
        prev = [int(committed[self._learned - 1])] if self._learned else list(self._prompt[-1:])
        self.bigram.learn([*prev, *(int(t) for t in committed[self._learned :])])
        self._learned = len(committed)
