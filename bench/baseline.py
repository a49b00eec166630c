"""Centralized serving baseline: every session's prompt decoded together on the server.

Static batching, as a server without speculation would do it: the prompts are
left-padded into one batch, prefilled in one forward, then decoded greedily one
token per forward for all rows at once with a ``DynamicCache`` (a finished row
keeps its slot until the whole batch is done; its extra tokens are not counted).
Positions and the attention mask make each row the unbatched computation up to
floating-point noise, so outputs are compared with the target-only reference and
any difference is reported (none is expected).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, slots=True)
class BaselineRun:
    outputs: list[list[int]]
    wall_s: float
    forwards: int
    step_s: list[float]  # time of every forward (the first is the prefill)

    @property
    def tokens(self) -> int:
        return sum(len(o) for o in self.outputs)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0


def centralized_greedy(
    model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Collection[int]
) -> BaselineRun:
    """Greedy decoding of all ``prompts`` as one batch; a row stops at a stop id or the budget."""
    from transformers import DynamicCache

    if not prompts or any(not p for p in prompts):
        raise ValueError("need at least one non-empty prompt")
    stops = frozenset(int(t) for t in stop_ids)
    kwargs: dict[str, Any] = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    batch, width = len(prompts), max(len(p) for p in prompts)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * batch
    steps: list[float] = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        feed = torch.zeros(batch, width, dtype=torch.long)  # [B, T], left-padded
        mask = torch.zeros(batch, width, dtype=torch.long)  # [B, T]
        for b, p in enumerate(prompts):
            feed[b, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            mask[b, width - len(p) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
        cache = DynamicCache(config=model.config)
        while True:
            s0 = time.perf_counter()
            logits = model(
                input_ids=feed,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                **kwargs,
            ).logits  # [B, t, V]
            nxt = logits[:, -1].argmax(dim=-1)  # [B]
            steps.append(time.perf_counter() - s0)
            for b, tok in enumerate(nxt.tolist()):
                if not done[b]:
                    outputs[b].append(tok)
                    done[b] = tok in stops or len(outputs[b]) >= max_new_tokens
            if all(done):
                break
            feed = nxt[:, None]  # [B, 1]
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
            positions = positions[:, -1:] + 1
    return BaselineRun(outputs, time.perf_counter() - t0, len(steps), steps)
