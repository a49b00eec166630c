"""Whether and how the verifier serves an open: a pure decision, beside
:func:`~middleware.verifier.sessions.triage` for drafts.

:func:`screen_open` looks at the open, the session table and the limits and says
what to do; the service carries it out (drops, verdicts, prefill).  No I/O, no
clock of its own (``now`` is given), so every admission rule is a unit test.

Order of the checks (the first that fails answers): the tokenizer, token ids
inside the vocabulary, the prompt length, then the session id (another
generation on a live id is refused; on a finished one, or one idle for
``reuse_idle_s``, it replaces it), then the epoch (an older one is told to
``resync``; the same one is a duplicate of the open being served), then room:
the device's own limit, then the verifier's, shared fairly (:func:`victim`).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

from middleware.protocol import OpenSession
from middleware.verifier.sessions import VerifierSession


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    fingerprint: str  # the verifier's tokenizer
    vocab_size: int
    max_prompt_tokens: int
    max_sessions: int
    max_sessions_per_device: int
    reuse_idle_s: float  # a session idle this long may be replaced or evicted


@dataclass(frozen=True, slots=True)
class OpenDecision:
    """``serve`` (after dropping ``replace`` and ``evict``, if set), ``duplicate`` (the open
    being served, again), ``refuse`` or ``resync`` (with ``reason``, the metric label, and
    ``why``, the verdict's text)."""

    action: Literal["serve", "duplicate", "refuse", "resync"]
    reason: str = ""
    why: str = ""
    committed_len: int = 0  # resync: what the verifier holds
    replace: VerifierSession | None = None  # another generation on this id, finished or idle
    evict: VerifierSession | None = None  # a session dropped to make room


def _refuse(reason: str, why: str) -> OpenDecision:
    return OpenDecision("refuse", reason, why)


def screen_open(
    m: OpenSession,
    instance: str,
    old: VerifierSession | None,
    sessions: Collection[VerifierSession],
    limits: AdmissionLimits,
    now: float,
) -> OpenDecision:
    """What to do with open ``m`` (of ``instance``); ``old`` is the session now held under
    its (device, session id), ``sessions`` every session held."""
    if m.tokenizer != limits.fingerprint:
        return _refuse(
            "tokenizer_mismatch", f"tokenizer {m.tokenizer!r} != verifier's {limits.fingerprint!r}"
        )
    bad = next((t for t in (*m.prompt, *m.committed) if t >= limits.vocab_size), None)
    if bad is not None:
        return _refuse("token_out_of_range", f"token id {bad} outside vocabulary")
    if len(m.prompt) > limits.max_prompt_tokens:
        return _refuse(
            "prompt_too_long",
            f"prompt of {len(m.prompt)} tokens exceeds this verifier's limit of "
            f"{limits.max_prompt_tokens}",
        )
    replace = None
    if old is not None and old.instance != instance:
        # The same session id for another generation (prompt, sampling, nonce).
        if not (old.done or (not old.pending and now - old.last_active > limits.reuse_idle_s)):
            return _refuse(
                "session_taken",
                "session id in use by another generation of this device; "
                "use a new session id or retry once it ends",
            )
        replace, old = old, None
    if old is not None:
        if m.epoch < old.epoch:
            return OpenDecision(
                "resync", "stale_epoch", f"stale epoch {m.epoch} < {old.epoch}", len(old.committed)
            )
        if m.epoch == old.epoch:
            return OpenDecision("duplicate")
        return OpenDecision("serve")  # a re-open of the session held
    others = [s for s in sessions if s is not replace]
    mine = sum(1 for s in others if s.device_id == m.device_id)
    if mine >= limits.max_sessions_per_device:
        return _refuse("device_session_limit", "device at its session limit on this verifier")
    evict = None
    if len(others) >= limits.max_sessions:
        evict = victim(others, mine, limits.reuse_idle_s, now)
        if evict is None:
            return _refuse("too_many_sessions", "verifier at its session limit; retry later")
    return OpenDecision("serve", replace=replace, evict=evict)


def victim(
    sessions: Collection[VerifierSession], opener_holds: int, reuse_idle_s: float, now: float
) -> VerifierSession | None:
    """The session to drop so a new one fits, or None: finished sessions first, then the
    longest idle (``reuse_idle_s``), then, if the opener holds fewer sessions than the
    device holding most, that device's least recently active one.  So 1,100 one-shot
    opens from 1,100 device ids cannot lock out a device that comes later (issue: they
    filled all 1,024 slots), and no device keeps more than its share while others wait.
    Sessions waiting for a round or still opening are never dropped."""
    idle = [s for s in sessions if not s.pending and not s.opening]
    done = [s for s in idle if s.done]
    if done:
        return min(done, key=lambda s: s.last_active)
    stale = [s for s in idle if now - s.last_active > reuse_idle_s]
    if stale:
        return min(stale, key=lambda s: s.last_active)
    per_device: dict[str, list[VerifierSession]] = {}
    for s in idle:
        per_device.setdefault(s.device_id, []).append(s)
    if not per_device:
        return None
    heaviest = max(per_device.values(), key=len)
    total = sum(1 for s in sessions if s.device_id == heaviest[0].device_id)
    if total > opener_holds + 1:
        return min(heaviest, key=lambda s: s.last_active)
    return None
