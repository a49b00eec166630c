"""A small Hugging Face causal LM as drafter, with a KV cache kept between calls.

The cache holds the keys/values of ``_cached`` tokens.  Each call computes the
longest common prefix of ``_cached`` and the new context, crops the cache to it
(``DynamicCache.crop`` with a negative count, transformers 5 semantics) and
feeds only the rest, so a rejected draft costs no recomputation beyond the
tokens that changed.  At least the context's last token is always fed: its
logits are what the first draft token is chosen from.

The drafter's logits must be over the target's vocabulary (same tokenizer
and same logits width) for coupled sampling and verification to line up.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache

from middleware.errors import ModelError
from middleware.nodes.drafters.base import Drafter, Proposal, common_prefix
from middleware.nodes.drafters.policy import DraftPolicy, Metric
from middleware.protocol.session import SamplingParams, SparseDist
from middleware.sampling import coupled_choice, process_logits, seeded_generator

REJECTION_TOPK = 16
# The drafter's own random stream: distinct from the Gumbel stream and from
# sampling.STREAM_REJECTION (the verifier's), so the draft pick is independent
# of the verifier's acceptance draws.
STREAM_DRAFT = 2


class HFDrafter(Drafter):
    """Drafts with a causal LM on one device (float32 CPU by default)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        policy: DraftPolicy | None = None,
        *,
        name: str | None = None,
        topk_q: int = REJECTION_TOPK,
    ) -> None:
        super().__init__(
            name or f"hf:{getattr(model.config, 'name_or_path', '') or 'model'}", policy
        )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.topk_q = topk_q
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self._prompt: tuple[int, ...] = ()
        self._cache: DynamicCache | None = None
        self._cached: list[int] = []  # tokens whose keys/values are in _cache
        self.forwards = 0  # model calls (for tests and metrics)
        self.fed_tokens = 0  # tokens fed through the model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def start(self, prompt: Sequence[int], sampling: SamplingParams) -> None:
        self.sampling = sampling
        self._prompt = tuple(int(t) for t in prompt)
        self._cache = None
        self._cached = []

    def propose(
        self, committed: Sequence[int], speculative: Sequence[int], max_tokens: int, position: int
    ) -> Proposal:
        context, limit = self._room(
            self._prompt, committed, speculative, max_tokens, self.max_context
        )
        if limit <= 0:
            return Proposal()
        tokens: list[int] = []
        confs: list[float] = []
        qs: list[SparseDist] = []
        logits = self._advance(context)
        for i in range(limit):
            tok, conf, q = self._choose(logits, position + i)
            tokens.append(tok)
            confs.append(conf)
            if q is not None:
                qs.append(q)
            if i + 1 >= limit or self.policy.should_stop(i, conf):
                break
            logits = self._advance([*context, *tokens])
        return Proposal(tuple(tokens), tuple(confs), tuple(qs))

    def _choose(
        self,
        logits: torch.Tensor,
        position: int,
    ) -> tuple[int, float, SparseDist | None]:
        """One draft token from next-token ``logits`` [V]: (token, confidence, q or None)."""
        mode = self.sampling.mode
        metric = self.policy.metric
        if mode == "greedy":
            tok = int(torch.argmax(logits))
            return tok, confidence(torch.softmax(logits, dim=-1), metric), None
        logprobs = process_logits(logits, self.sampling)  # [V], -inf outside top-k/top-p
        conf = confidence(torch.exp(logprobs), metric)
        if mode == "coupled":
            return int(coupled_choice(logprobs, self.sampling.seed, position)), conf, None
        ids, probs = sparse_topk(logprobs, self.topk_q)
        gen = seeded_generator(self.sampling.seed, position, STREAM_DRAFT)
        pick = int(torch.multinomial(probs, 1, generator=gen))
        q = SparseDist(tuple(int(t) for t in ids), tuple(float(p) for p in probs))
        return int(ids[pick]), conf, q

    def _advance(self, context: list[int]) -> torch.Tensor:
        """Crop the cache to the common prefix (at most ``context[:-1]``), feed the rest."""
        keep = min(common_prefix(self._cached, context), len(context) - 1)
        if self._cache is None or keep == 0:
            self._cache = DynamicCache()
        elif keep < len(self._cached):
            self._cache.crop(keep - len(self._cached))
        new = torch.tensor([context[keep:]], dtype=torch.long, device=self.device)  # [1, T]
        try:
            with torch.inference_mode():
                out = self.model(
                    input_ids=new, past_key_values=self._cache, use_cache=True, logits_to_keep=1
                )
        except (RuntimeError, ValueError, IndexError) as exc:
            self._cache, self._cached = None, []
            raise ModelError(f"{self.name}: forward failed: {exc}") from exc
        self._cached = list(context)
        self.forwards += 1
        self.fed_tokens += len(context) - keep
        # Token choice runs on CPU: the seeded generators and Gumbel noise live there.
        return out.logits[0, -1].float().cpu()  # [V]


def confidence(probs: torch.Tensor, metric: Metric) -> float:
    """Confidence in [0, 1] of a full distribution ``probs`` [V] (as ``confidence_from_probs``)."""
    if metric == "max_prob":
        return float(probs.max())
    if metric == "margin":
        top = torch.topk(probs, k=min(2, probs.numel())).values
        return float(top[0] - (top[1] if top.numel() > 1 else 0.0))
    if metric == "entropy":
        p = probs[probs > 0]
        return float(torch.exp((p * torch.log(p)).sum()))
    raise ModelError(f"unknown confidence metric {metric!r}")


def sparse_topk(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` ids of ``logprobs`` [V] (finite ones only) and their renormalized probs [k']."""
    top = torch.topk(logprobs, k=min(k, logprobs.numel()))
    finite = torch.isfinite(top.values)
    ids, vals = top.indices[finite], top.values[finite]
    return ids, torch.softmax(vals.double(), dim=-1).float()
