"""Checking a session's output against its target-only reference, token by token.

A session is *identical* when its committed tokens equal the reference and the
text its user saw, read as committed chunks (verified, confirmed, correction)
in order, a ``correction`` replacing what was shown from its position on, equals the
reference's text.  A reference position is *lost* when the
committed tokens lack it or carry another token there, or when no committed
chunk ever delivered it to the user; it is *duplicated* when more than one
committed chunk delivered it (or the session committed more than the reference).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from middleware.protocol import TextChunk

COMMITTED_KINDS = ("verified", "confirmed", "correction")


@dataclass(frozen=True, slots=True)
class Audit:
    session_id: str
    reference_len: int
    committed_len: int
    lost: int
    duplicated: int
    identical: bool
    provisional: int  # tokens released unverified while offline
    corrections: int  # correction chunks (provisional text replaced)

    @property
    def completed(self) -> bool:
        return self.committed_len > 0 and self.lost == 0


def audit(
    session_id: str,
    reference: Sequence[int],
    tokens: Sequence[int],
    chunks: Iterable[TextChunk],
    tokenizer: Any,
) -> Audit:
    ref = list(reference)
    tokens = list(tokens)
    chunks = [c for c in chunks if c.session_id == session_id]
    cover = [0] * len(ref)
    beyond = 0
    committed = [c for c in chunks if c.kind in COMMITTED_KINDS and c.n_tokens]
    shown: list[TextChunk] = []  # the committed chunks the user sees, corrections applied
    for c in committed:
        if c.kind == "correction":
            # It replaces everything from its position on (provisional text, or committed
            # text re-sent after a node restart or rolled back by an `opened` verdict).
            for p in range(c.pos, len(ref)):
                cover[p] = 0
            shown = [s for s in shown if s.pos < c.pos]
        shown.append(c)
        for p in range(c.pos, c.pos + c.n_tokens):
            if p < len(ref):
                cover[p] += 1
            else:
                beyond += 1
    agree = next(
        (i for i, (a, b) in enumerate(zip(ref, tokens, strict=False)) if a != b),
        min(len(ref), len(tokens)),
    )
    lost = sum(1 for i in range(len(ref)) if i >= agree or cover[i] == 0)
    duplicated = sum(max(0, n - 1) for n in cover) + beyond + max(0, len(tokens) - len(ref))
    text = "".join(c.text for c in shown)
    identical = tokens == ref and text == tokenizer.decode(ref, skip_special_tokens=True)
    return Audit(
        session_id,
        len(ref),
        len(tokens),
        lost,
        duplicated,
        identical,
        provisional=sum(c.n_tokens for c in chunks if c.kind == "provisional"),
        corrections=sum(1 for c in chunks if c.kind == "correction"),
    )


def rss_kib(pid: int | str = "self") -> int:
    """Resident set size (VmRSS) of a process, in KiB, from /proc/PID/status."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")
