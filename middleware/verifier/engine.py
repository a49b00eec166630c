"""The target engine: batched, KV-cached verification forwards for many sessions.

Each session owns a KV cache that holds the keys and values of
``context[:-1]`` (every committed token but the last).  A verify step then
feeds ``[last, d1 .. dk]`` and reads the ``k + 1`` logits rows that score the
draft tokens and the bonus position.

Batching sessions with different cache and draft lengths in one forward
(:meth:`TargetEngine._forward`):

- the cached KV of every row is **left-padded** with zeros to the longest
  cache, so the new tokens of all rows land in the same cache slots;
- the new tokens are **right-padded** to the longest row;
- a 2-D ``attention_mask`` marks real slots, so padded keys get exactly zero
  attention weight (they are masked to ``-inf`` before the softmax);
- explicit ``position_ids`` give every real token its true position, so the
  rotary embedding is the one an unbatched forward uses (cached keys keep
  the rotation they were computed with).

Mathematically each row is the unbatched computation; in floating point the
matmul shapes differ, which moves logits in the last bits.  Measured on
SmolLM2-135M (float32, CPU, 138 positions over 4-session batches): max |logit
diff| 6.5e-5 batched vs alone and 6.1e-5 batched vs step-by-step decoding with
a ``DynamicCache`` (sdpa; eager: 5.0e-5 / 5.7e-5), against a smallest
top-1/top-2 gap of 1.3e-2: no argmax flip.  The model's own attention
implementation is kept.  After the forward each row's new KV is cut out of
the batched cache and kept per session.

The engine never trusts its cache: every verify compares the cached token ids
with the authoritative context and keeps only the longest common prefix,
feeding (prefilling) whatever is missing.  :meth:`TargetEngine.commit` is
therefore an optimisation (drop rejected draft KV early), never a condition
for correct output.  Idle sessions are evicted least-recently-used first when
the cached tokens exceed ``memory_budget_tokens`` and rebuilt on next use.

Supported models: Hugging Face causal LMs with a standard per-layer KV cache
(full attention in every layer); the Llama family is tested.
"""

from __future__ import annotations

import inspect
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from middleware.errors import ModelError
from middleware.protocol.session import common_prefix

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [1, H, L, D]


@dataclass(frozen=True, slots=True)
class VerifyItem:
    """One draft to verify: the session, its full context (prompt + committed) and the draft."""

    session_key: Hashable
    context: Sequence[int]
    draft: Sequence[int]


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of the engine's counters."""

    sessions: int
    cached_tokens: int
    evictions: int
    prefills: int
    prefill_tokens: int
    forward_passes: int
    last_batch_size: int
    forward_time_s: float


class Engine(Protocol):
    """What the verifier service and :func:`~middleware.verifier.rounds.run_round` use of a
    target engine: :class:`TargetEngine`, or ``bench/noop_engine.py`` for measuring the
    middleware alone."""

    # False: a round takes microseconds and runs on the event loop, no worker thread
    # (TargetEngine explains the figures).
    blocking: ClassVar[bool]
    vocab_size: int
    max_positions: int  # longest context the model takes
    evictions: int  # KV caches dropped under memory pressure so far
    # A forward's fixed cost in padded token slots: the service sets it from its fit.
    forward_overhead_tokens: int

    def prefill(self, session_key: Hashable, context: Sequence[int], max_tokens: int) -> int:
        """Feed up to ``max_tokens`` more of ``context``; the tokens still to feed."""
        ...

    def verify_batch(self, items: Sequence[VerifyItem]) -> list[torch.Tensor]:
        """One forward over every item; per item, the logits after each draft position."""
        ...

    def commit(self, session_key: Hashable, new_len: int) -> None:
        """Keep the first ``new_len`` positions of the session's cache."""
        ...

    def close(self, session_key: Hashable) -> None:
        """Drop the session's cache."""
        ...


@dataclass
class _Session:
    tokens: list[int] = field(default_factory=list)  # ids whose KV is cached
    kv: KV | None = None
    pinned: bool = False  # verified, commit pending: never evicted

    def crop(self, keep: int) -> None:
        if keep >= len(self.tokens):
            return
        self.tokens = self.tokens[:keep]
        if keep == 0 or self.kv is None:
            self.kv = None
        else:
            self.kv = [(k[:, :, :keep], v[:, :, :keep]) for k, v in self.kv]


@dataclass(frozen=True)
class _Row:
    session: _Session
    tokens: list[int]  # fed after the session's cached tokens


def _check_supported(model: Any) -> None:
    config = model.config.get_text_config(decoder=True)
    layer_types = getattr(config, "layer_types", None) or []
    odd = sorted({t for t in layer_types if t != "full_attention"})
    if odd:
        raise ModelError(f"TargetEngine supports full-attention models only, got layer types {odd}")
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError("TargetEngine needs a decoder-only causal LM")


class TargetEngine:
    """Batched verification with per-session KV caches over a Hugging Face causal LM.

    Methods are thread-safe (one lock); the verifier calls
    :meth:`verify_batch`, decides acceptance, then :meth:`commit` (or
    :meth:`close`) for every item of the batch.
    """

    # A forward takes milliseconds to seconds, so the verifier runs each verify round in a
    # worker thread and the event loop keeps serving meanwhile.  An engine whose rounds take
    # microseconds (bench/noop_engine.py) sets False and is called on the event loop: the
    # hop (a thread wakeup and a loop wakeup) cost about 160 us of a 2.3 ms no-op round trip
    # on the loaded 2-core build machine (interleaved A/B, p50).
    blocking: ClassVar[bool] = True

    def __init__(
        self,
        model: Any,
        *,
        memory_budget_tokens: int = 65536,
        max_batch_tokens: int = 4096,
        device: str | torch.device | None = None,
        forward_overhead_tokens: int = 8,
    ) -> None:
        """``memory_budget_tokens``: cached tokens kept over all sessions before LRU eviction.

        ``max_batch_tokens``: most (padded) new tokens per forward; longer
        prefills are chunked and larger verify batches split.

        ``forward_overhead_tokens``: what one more forward pass costs, in padded
        token slots.  A verify batch whose drafts differ in length is split into
        forwards of similar lengths when that saves more padding than this (each
        row is padded to the longest draft of its forward); 0 never pads, a large
        value never splits.
        """
        if memory_budget_tokens < 1 or max_batch_tokens < 1 or forward_overhead_tokens < 0:
            raise ValueError("memory_budget_tokens and max_batch_tokens must be positive")
        self.forward_overhead_tokens = forward_overhead_tokens
        self.padded_tokens = 0  # padding slots computed in verify forwards (for metrics)
        _check_supported(model)
        self.model = model
        self.device = (
            torch.device(device) if device is not None else next(model.parameters()).device
        )
        self.memory_budget_tokens = memory_budget_tokens
        self.max_batch_tokens = max_batch_tokens
        text_config = model.config.get_text_config(decoder=True)
        self.vocab_size = int(text_config.vocab_size)
        # Positions the model was trained for: the verifier's default prompt limit.
        self.max_positions = int(getattr(text_config, "max_position_embeddings", 0) or 1 << 20)
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._sessions: OrderedDict[Hashable, _Session] = OrderedDict()
        self._lock = threading.RLock()
        self.evictions = 0
        self.prefills = 0
        self.prefill_tokens = 0
        self.forward_passes = 0
        self.last_batch_size = 0
        self.forward_time_s = 0.0

    # -- session lifecycle -------------------------------------------------

    def open(self, session_key: Hashable, context: Sequence[int]) -> None:
        """Register a session (optional: :meth:`verify_batch` registers unknown keys).

        Nothing is computed now; the cache is built by the first verify.  A
        cache left from an earlier open is kept up to its common prefix with
        ``context[:-1]``.
        """
        if not context:
            raise ValueError("context must hold at least one token")
        with self._lock:
            session = self._touch(session_key)
            self._sync(session, context)
            self._evict()

    def prefill(self, session_key: Hashable, context: Sequence[int], max_tokens: int) -> int:
        """Feed at most ``max_tokens`` of the uncached part of ``context[:-1]``; return how many
        tokens are still missing afterwards.

        The verifier calls it chunk by chunk, between verify rounds, so that one long
        prompt delays each round by one chunk instead of stalling every session for the
        whole prompt (a 4,096-token prompt took 51.6 s in one piece on SmolLM2, CPU).
        Chunking moves logits in the last bits like any other split of a forward.
        """
        if not context or max_tokens < 1:
            raise ValueError("prefill needs a context and max_tokens >= 1")
        with self._lock:
            session = self._touch(session_key)
            self._sync(session, context)
            missing = [int(t) for t in context[len(session.tokens) : -1]]
            if not missing:
                return 0
            chunk = missing[:max_tokens]
            self._check_vocab(chunk, session_key)
            self.prefills += 1
            self.prefill_tokens += len(chunk)
            self._forward([_Row(session, chunk)], keep_all_logits=False)
            self._evict()
            return len(missing) - len(chunk)

    def commit(self, session_key: Hashable, new_len: int) -> None:
        """Drop cached KV beyond ``new_len - 1`` after acceptance (the rejected drafts).

        ``new_len`` is the length of the new full context.  Unknown keys are ignored.
        """
        with self._lock:
            session = self._sessions.get(session_key)
            if session is None:
                return
            session.crop(max(new_len - 1, 0))
            session.pinned = False
            self._evict()

    def close(self, session_key: Hashable) -> None:
        """Forget a session and free its cache (unknown keys are ignored)."""
        with self._lock:
            self._sessions.pop(session_key, None)

    def __contains__(self, session_key: Hashable) -> bool:
        return session_key in self._sessions

    def cached_len(self, session_key: Hashable) -> int:
        """Tokens currently cached for a session (0 if unknown or evicted)."""
        session = self._sessions.get(session_key)
        return len(session.tokens) if session is not None else 0

    @property
    def cached_tokens(self) -> int:
        """Cached tokens over all sessions (what the memory budget counts)."""
        return sum(len(s.tokens) for s in self._sessions.values())

    def stats(self) -> EngineStats:
        """A snapshot of the counters."""
        with self._lock:
            return EngineStats(
                len(self._sessions),
                self.cached_tokens,
                self.evictions,
                self.prefills,
                self.prefill_tokens,
                self.forward_passes,
                self.last_batch_size,
                self.forward_time_s,
            )

    # -- verification ------------------------------------------------------

    def verify_batch(self, items: Sequence[VerifyItem]) -> list[torch.Tensor]:
        """Target logits (float32, CPU) ``[k+1, V]`` per item, after ``last, d1 .. dk``.

        Sessions whose cache is missing or does not match ``context[:-1]`` are
        (re)built first by prefill forwards; then one forward verifies the
        whole batch (split only if it exceeds ``max_batch_tokens``).  Every
        session of the batch stays pinned until its :meth:`commit`.
        """
        if not items:
            return []
        keys = [item.session_key for item in items]
        if len(set(keys)) != len(keys):
            raise ValueError("a session may appear only once per batch")
        for item in items:
            if not item.context:
                raise ValueError(f"session {item.session_key!r}: empty context")
            self._check_vocab([item.context[-1], *item.draft], item.session_key)
        with self._lock:
            for session in self._sessions.values():
                session.pinned = False  # a new round: earlier rounds are committed or abandoned
            sessions = [self._touch(key) for key in keys]
            missing: list[_Row] = []
            for session, item in zip(sessions, items, strict=True):
                session.pinned = True
                if self._sync(session, item.context):
                    tokens = [int(t) for t in item.context[len(session.tokens) : -1]]
                    self._check_vocab(tokens, item.session_key)
                    missing.append(_Row(session, tokens))
            self._prefill(missing)
            rows = [
                _Row(s, [int(item.context[-1]), *map(int, item.draft)])
                for s, item in zip(sessions, items, strict=True)
            ]
            logits: list[torch.Tensor | None] = [None] * len(rows)
            for group in self._split(rows):
                chunk = [rows[i] for i in group]
                out = self._forward(chunk, keep_all_logits=True)  # [B, T, V]
                width = max(len(r.tokens) for r in chunk)
                self.padded_tokens += sum(width - len(r.tokens) for r in chunk)
                for b, i in enumerate(group):
                    logits[i] = out[b, : len(rows[i].tokens)]
            self.last_batch_size = len(items)
            self._evict()
        with torch.inference_mode(False):
            return [
                lg.to(device="cpu", dtype=torch.float32).clone() for lg in logits if lg is not None
            ]

    def _check_vocab(self, tokens: Sequence[int], session_key: Hashable) -> None:
        bad = next((t for t in tokens if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"session {session_key!r}: token {bad} outside the vocabulary")

    @staticmethod
    def _sync(session: _Session, context: Sequence[int]) -> bool:
        """Crop the cache to its common prefix with ``context[:-1]``; True if tokens are missing."""
        target = [int(t) for t in context[:-1]]
        session.crop(common_prefix(session.tokens, target))
        return len(session.tokens) < len(target)

    def _prefill(self, rows: list[_Row]) -> None:
        """Feed each row's missing tokens; equal lengths batch together, long ones in chunks."""
        by_len: dict[int, list[_Row]] = {}
        for row in rows:
            by_len.setdefault(len(row.tokens), []).append(row)
            self.prefills += 1
            self.prefill_tokens += len(row.tokens)
        for length, group in sorted(by_len.items()):
            step = min(length, self.max_batch_tokens)
            per_forward = max(1, self.max_batch_tokens // step)
            for i in range(0, len(group), per_forward):
                batch = group[i : i + per_forward]
                for start in range(0, length, step):
                    self._forward(
                        [_Row(r.session, r.tokens[start : start + step]) for r in batch],
                        keep_all_logits=False,
                    )

    def _split(self, rows: list[_Row]) -> list[list[int]]:
        """Row indices per forward: rows sorted by width, cut where it saves padding.

        Minimises ``sum over forwards (overhead + rows x widest)`` over the cuts of
        the width-sorted rows (a small DP), each forward within ``max_batch_tokens``.
        """
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].tokens))
        widths = [len(rows[i].tokens) for i in order]
        n, over = len(order), self.forward_overhead_tokens
        best = [0.0] + [math.inf] * n  # best[j]: cost of the first j sorted rows
        cut = [0] * (n + 1)
        for j in range(1, n + 1):
            for i in range(j - 1, -1, -1):  # forward = sorted rows i..j-1, widest widths[j-1]
                padded = (j - i) * widths[j - 1]
                if padded > self.max_batch_tokens and j - i > 1:
                    break
                cost = best[i] + over + padded
                if cost < best[j]:
                    best[j], cut[j] = cost, i
        groups: list[list[int]] = []
        j = n
        while j > 0:
            groups.append(order[cut[j] : j])
            j = cut[j]
        return groups[::-1]

    # -- the forward pass --------------------------------------------------

    def _forward(self, rows: list[_Row], *, keep_all_logits: bool) -> torch.Tensor:
        """One padded forward; appends each row's new KV to its session.  Logits ``[B, T, V]``."""
        from transformers import DynamicCache

        past = [len(r.session.tokens) for r in rows]
        width = [len(r.tokens) for r in rows]
        p_max, t_max, batch = max(past), max(width), len(rows)
        t0 = time.perf_counter()
        with torch.inference_mode():
            input_ids = torch.zeros(batch, t_max, dtype=torch.long)  # [B, T], right-padded
            mask = torch.zeros(batch, p_max + t_max, dtype=torch.long)  # [B, P+T]
            positions = torch.zeros(batch, t_max, dtype=torch.long)  # [B, T]
            for b, row in enumerate(rows):
                input_ids[b, : width[b]] = torch.tensor(row.tokens, dtype=torch.long)
                mask[b, p_max - past[b] : p_max + width[b]] = 1
                positions[b] = torch.arange(past[b], past[b] + t_max)
                positions[b, width[b] :] = past[b] + width[b] - 1  # padding: stay in range
            cache = DynamicCache(self._padded_past(rows, past, p_max) if p_max else None)
            kwargs: dict[str, Any] = {}
            if self._keeps_logits:
                kwargs["logits_to_keep"] = 0 if keep_all_logits else 1
            try:
                out = self.model(
                    input_ids=input_ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    position_ids=positions.to(self.device),
                    past_key_values=cache,
                    use_cache=True,
                    **kwargs,
                )
            except (RuntimeError, ValueError, IndexError) as exc:
                raise ModelError(
                    f"target forward failed (batch {batch}, {t_max} new tokens, "
                    f"{p_max} cached): {exc}"
                ) from exc
            layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
            for b, row in enumerate(rows):
                lo, hi = p_max - past[b], p_max + width[b]
                kv = [(k[b : b + 1, :, lo:hi], v[b : b + 1, :, lo:hi]) for k, v in layers]
                if batch > 1:  # a view would keep the whole batch's cache alive
                    kv = [(k.clone(), v.clone()) for k, v in kv]
                row.session.kv = kv
                row.session.tokens.extend(row.tokens)
        self.forward_passes += 1
        self.forward_time_s += time.perf_counter() - t0
        return out.logits

    def _padded_past(self, rows: list[_Row], past: list[int], p_max: int) -> KV:
        """Left-pad every row's cached KV to ``p_max`` slots: per layer ``[B, H, P, D]``."""
        template = next(r.session.kv for r in rows if r.session.kv is not None)
        padded: KV = []
        for layer, (k0, v0) in enumerate(template):
            keys = k0.new_zeros(len(rows), k0.shape[1], p_max, k0.shape[3])
            values = v0.new_zeros(len(rows), v0.shape[1], p_max, v0.shape[3])
            for b, row in enumerate(rows):
                if past[b] and row.session.kv is not None:
                    k, v = row.session.kv[layer]
                    keys[b, :, p_max - past[b] :] = k[0]
                    values[b, :, p_max - past[b] :] = v[0]
            padded.append((keys, values))
        return padded

    # -- bookkeeping -------------------------------------------------------

    def _touch(self, session_key: Hashable) -> _Session:
        session = self._sessions.get(session_key)
        if session is None:
            session = self._sessions[session_key] = _Session()
        self._sessions.move_to_end(session_key)
        return session

    def _evict(self) -> None:
        """Evict least-recently-used unpinned caches until the budget holds."""
        total = self.cached_tokens
        for session in self._sessions.values():
            if total <= self.memory_budget_tokens:
                return
            if session.pinned or not session.tokens:
                continue
            total -= len(session.tokens)
            session.crop(0)
            self.evictions += 1
