"""A :class:`TargetEngine` that counts what its forward passes feed, for the benchmarks.

The verifier's cost on a CPU is the target's forward passes, and a forward's
cost grows with the tokens it is fed, padding included: a verify forward pads
every row to the longest draft of its batch.  This subclass wraps the engine's
single forward method and splits its counts by phase (prefill of missing context
vs. verification of drafts).  Measurement only; behaviour is unchanged.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from middleware.verifier.engine import TargetEngine


@dataclass(slots=True)
class PhaseCounts:
    forwards: int = 0
    rows: int = 0
    tokens: int = 0  # real tokens fed
    padded_tokens: int = 0  # rows x widest row: what the forward computes
    seconds: float = 0.0


class CountingEngine(TargetEngine):
    """Counts forwards, rows, real and padded tokens and time, for prefill and verify."""

    def __init__(self, model: Any, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        # not ``prefill``: TargetEngine.prefill is the engine's chunked-prefill method
        self.prefill_counts = PhaseCounts()
        self.verify_counts = PhaseCounts()

    def _forward(self, rows: list[Any], *, keep_all_logits: bool) -> torch.Tensor:
        phase = self.verify_counts if keep_all_logits else self.prefill_counts  # prefill: no logits
        t0 = time.perf_counter()
        out = super()._forward(rows, keep_all_logits=keep_all_logits)
        phase.seconds += time.perf_counter() - t0
        widths = [len(r.tokens) for r in rows]
        phase.forwards += 1
        phase.rows += len(rows)
        phase.tokens += sum(widths)
        phase.padded_tokens += len(rows) * max(widths)
        return out

    def counts(self) -> dict[str, dict[str, float]]:
        return {"prefill": asdict(self.prefill_counts), "verify": asdict(self.verify_counts)}
