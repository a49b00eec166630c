"""A target engine that costs (almost) nothing: for measuring the middleware alone.

It accepts every draft token and proposes ``last + 1`` as the bonus token, so
a verify round commits ``k + 1`` tokens.  It implements
:class:`middleware.verifier.engine.Engine`, what the verifier service uses of a
target engine; its logits are one-hot rows over a small vocabulary, so the
acceptance code still runs on real tensors.  It says it does not block
(``blocking = False``), so the verifier calls it on its event loop: figures
measured with it leave out the worker-thread hop a model engine pays per round
(about 160 us of a 2.3 ms round trip on the loaded 2-core build machine,
interleaved A/B).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from middleware.verifier.engine import EngineStats, VerifyItem


class NoopEngine:
    """Accept everything; one tiny tensor per draft."""

    blocking = False  # a round takes microseconds: the verifier calls it on its event loop

    def __init__(self, vocab_size: int = 64) -> None:
        self.vocab_size = vocab_size
        self.max_positions = 1 << 20
        self.evictions = 0
        self.forward_overhead_tokens = 0
        self.forwards = 0
        self._lens: dict[Hashable, int] = {}
        self._eye = torch.eye(vocab_size)

    def verify_batch(self, items: Sequence[VerifyItem]) -> list[torch.Tensor]:
        """One gather of one-hot rows for the whole batch, split per draft (views): two
        tensor ops per batch instead of four per draft (those were 8.6% of the no-op
        verifier's event loop under load, py-spy; timeit: 1,394 -> 136 us for 45 drafts,
        34 -> 31 us for one)."""
        self.forwards += 1
        wanted: list[int] = []
        sizes = []
        for it in items:
            wanted += it.draft
            wanted.append(((it.draft or it.context)[-1] + 1) % self.vocab_size)
            sizes.append(len(it.draft) + 1)
            self._lens[it.session_key] = len(it.context)
        if not items:
            return []
        return list(self._eye[wanted].split(sizes))  # one-hot rows, gathered at once

    def prefill(self, session_key: Hashable, context: Sequence[int], max_tokens: int) -> int:
        self._lens[session_key] = len(context)
        return 0

    def commit(self, session_key: Hashable, new_len: int) -> None:
        self._lens[session_key] = new_len

    def close(self, session_key: Hashable) -> None:
        self._lens.pop(session_key, None)

    def __contains__(self, session_key: Hashable) -> bool:
        return session_key in self._lens

    def cached_len(self, session_key: Hashable) -> int:
        return self._lens.get(session_key, 0)

    def cached_tokens(self) -> int:
        return sum(self._lens.values())

    def stats(self) -> EngineStats:
        return EngineStats(
            sessions=len(self._lens),
            cached_tokens=self.cached_tokens(),
            evictions=0,
            prefills=0,
            prefill_tokens=0,
            forward_passes=self.forwards,
            last_batch_size=0,
            forward_time_s=0.0,
        )
