"""The verifier's per-session truth and the rules that answer a draft.

``triage`` is pure: given a session and a draft it says whether the draft is
verified, answered from the verdict cache (duplicate), caught up (its base is
behind), or refused/resynced.  No bus, no model.
"""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from middleware.protocol import Draft, OpenSession, SamplingParams, SessionState, Verdict
from middleware.protocol.session import (
    commit_tag,
    session_instance,
    tokens_digest,
)

VERDICT_CACHE = 16


def session_key(device_id: str, session_id: str) -> str:
    """The verifier's key of a session: session ids are per device (ids never hold '/')."""
    return f"{device_id}/{session_id}"


@dataclass(slots=True)
class VerifierSession:
    """Mutable state of one session owned by this verifier.

    ``committed`` holds only tokens this process committed or proved (see
    :mod:`middleware.verifier.opening`); ``opening`` is true while a (re-)open's
    prompt is prefilled and its claim proved: drafts are not answered then.
    """

    session_id: str
    device_id: str
    epoch: int
    prompt: tuple[int, ...]
    committed: list[int]
    sampling: SamplingParams
    max_new_tokens: int
    stop_ids: frozenset[int]
    drafter: str = ""
    finish_reason: str = ""
    verdicts: OrderedDict[int, Verdict] = field(default_factory=OrderedDict)
    last_active: float = field(default_factory=time.monotonic)
    pending: bool = False  # a draft of this session waits in the batch queue
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    instance: str = ""
    opening: bool = False
    tag_key: bytes = b""  # the MAC key of commit tags (shared by verifiers that share a key)
    _digest: object = None  # running SHA-256 of ``committed`` (protocol.session.tokens_digest)
    _tag: str = ""

    @classmethod
    def from_open(
        cls,
        msg: OpenSession,
        committed: Sequence[int] = (),
        tag_key: bytes = b"",
        instance: str = "",
    ) -> VerifierSession:
        """A session for ``msg`` holding ``committed``: the proven tokens, never the claim.
        ``instance``: ``session_instance(msg)`` when the caller has it already."""
        s = cls(
            session_id=msg.session_id,
            device_id=msg.device_id,
            epoch=msg.epoch,
            prompt=msg.prompt,
            committed=[],
            sampling=msg.sampling,
            max_new_tokens=msg.max_new_tokens,
            stop_ids=frozenset(msg.stop_ids),
            drafter=msg.drafter,
            instance=instance or session_instance(msg),
            tag_key=tag_key,
        )
        s.commit(list(committed), "")
        return s

    @property
    def key(self) -> str:
        return session_key(self.device_id, self.session_id)

    @property
    def tag(self) -> str:
        """MAC of (instance, committed): lets a verifier sharing the key accept them later."""
        if not self._tag and self.tag_key:
            self._tag = commit_tag(self.tag_key, self.instance, len(self.committed), self._digest)
        return self._tag

    @property
    def done(self) -> bool:
        return bool(self.finish_reason)

    @property
    def context(self) -> list[int]:
        return [*self.prompt, *self.committed]

    def verdict(
        self,
        kind: Literal["opened", "accept"],
        seq: int,
        *,
        base: int,
        tokens: Sequence[int],
        verifier_id: str,
        accepted: int = 0,
        next_len: int = 0,
        echo_ts: float = 0.0,
    ) -> Verdict:
        """A verdict that leaves the device with this session's committed tokens: ``tokens``
        are the committed ones from ``base`` on; it carries the instance and the tag."""
        return Verdict(
            session_id=self.session_id,
            epoch=self.epoch,
            seq=seq,
            kind=kind,
            base=base,
            accepted=accepted,
            tokens=tuple(tokens),
            committed_len=len(self.committed),
            done=self.done,
            finish_reason=self.finish_reason,
            next_len=next_len,
            verifier_id=verifier_id,
            echo_ts=echo_ts,
            instance=self.instance,
            tag=self.tag,
        )

    def remember(self, verdict: Verdict) -> None:
        """Keep the verdict so a duplicate draft (QoS 1 redelivery) gets it again."""
        self.verdicts[verdict.seq] = verdict
        while len(self.verdicts) > VERDICT_CACHE:
            self.verdicts.popitem(last=False)

    def clip(self, tokens: list[int]) -> tuple[list[int], str]:
        """What of ``tokens`` may be committed: cut after a stop token or at the length limit."""
        return clip_commit(tokens, len(self.committed), self.max_new_tokens, self.stop_ids)

    def commit(self, tokens: list[int], finish_reason: str) -> None:
        """Append tokens already clipped by :meth:`clip`."""
        self.committed.extend(tokens)
        self._digest = tokens_digest(tokens, self._digest)
        self._tag = ""
        self.finish_reason = finish_reason

    def state(self, owner: str) -> SessionState:
        return SessionState(
            session_id=self.session_id,
            device_id=self.device_id,
            epoch=self.epoch,
            owner=owner,
            status="done" if self.done else "open",
            committed=tuple(self.committed),
            prompt_len=len(self.prompt),
            finish_reason=self.finish_reason,
            updated_at=time.time(),
            instance=self.instance,
            tag=self.tag,
        )


def tag_matches(key: bytes, instance: str, tokens: Sequence[int], tag: str) -> bool:
    """Whether ``tag`` is the commit tag of exactly ``tokens`` of ``instance`` under ``key``."""
    if not tag or not key:
        return False
    want = commit_tag(key, instance, len(tokens), tokens_digest(tokens))
    return hmac.compare_digest(want, tag)


def clip_commit(
    tokens: list[int], committed_len: int, max_new_tokens: int, stop_ids: frozenset[int]
) -> tuple[list[int], str]:
    """Tokens that may follow ``committed_len`` ones, and the finish reason ("" if none)."""
    room = max(0, max_new_tokens - committed_len)
    out: list[int] = []
    for t in tokens[:room]:
        out.append(t)
        if t in stop_ids:
            return out, "stop"
    return out, ("length" if committed_len + len(out) >= max_new_tokens else "")


Action = Literal["verify", "duplicate", "catchup", "resync", "refuse", "done", "ignore"]


@dataclass(frozen=True, slots=True)
class Triage:
    action: Action
    verdict: Verdict | None = None  # the answer, for every action but verify/ignore
    reason: str = ""


def triage(
    s: VerifierSession | None, d: Draft, *, vocab_size: int, verifier_id: str, max_draft: int
) -> Triage:
    """Decide how to answer draft ``d`` of session ``s`` (None: unknown here)."""

    def answer(kind: str, reason: str = "", **kw: Any) -> Verdict:
        return Verdict(
            session_id=d.session_id,
            epoch=d.epoch,
            seq=d.seq,
            kind=kind,  # type: ignore[arg-type]
            reason=reason,
            verifier_id=verifier_id,
            echo_ts=d.sent_at,
            instance=s.instance if s is not None else "",
            tag=s.tag if s is not None and kw.get("committed_len") == len(s.committed) else "",
            **kw,
        )

    if s is None:
        return Triage("resync", answer("resync", "unknown session: re-open"), "unknown_session")
    if d.epoch > s.epoch:
        # Another verifier owns a newer epoch of this session; it answers.
        return Triage("ignore", reason="newer_epoch")
    if s.opening:  # its opened verdict has not been sent: nothing may be drafted yet
        return Triage("ignore", reason="opening")
    if d.epoch < s.epoch:
        return Triage(
            "resync",
            answer("resync", f"stale epoch {d.epoch} < {s.epoch}", committed_len=len(s.committed)),
            "stale_epoch",
        )
    cached = s.verdicts.get(d.seq)
    if cached is not None:
        return Triage("duplicate", cached, "duplicate")
    clen = len(s.committed)
    if d.base < clen:
        return Triage(
            "catchup",
            answer(
                "catchup",
                "",
                base=d.base,
                tokens=tuple(s.committed[d.base :]),
                committed_len=clen,
                done=s.done,
                finish_reason=s.finish_reason,
            ),
            "behind",
        )
    if d.base > clen:
        return Triage(
            "resync",
            answer("resync", f"base {d.base} ahead of committed {clen}", committed_len=clen),
            "ahead",
        )
    if s.done:
        return Triage(
            "done",
            answer(
                "accept",
                "session finished",
                base=clen,
                committed_len=clen,
                done=True,
                finish_reason=s.finish_reason,
            ),
            "done",
        )
    if len(d.tokens) > max_draft:
        return Triage(
            "refuse",
            answer(
                "refused",
                f"draft of {len(d.tokens)} tokens exceeds {max_draft}",
                committed_len=clen,
            ),
            "draft_too_long",
        )
    bad = next((t for t in d.tokens if t >= vocab_size), None)
    if bad is not None:
        return Triage(
            "refuse",
            answer(
                "refused", f"token id {bad} outside vocabulary of {vocab_size}", committed_len=clen
            ),
            "token_out_of_range",
        )
    if s.sampling.mode == "rejection" and len(d.q) != len(d.tokens):
        return Triage(
            "refuse",
            answer("refused", "rejection mode needs q for every draft token", committed_len=clen),
            "missing_q",
        )
    return Triage("verify")
