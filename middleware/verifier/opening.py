"""What a verifier keeps of the committed tokens an open claims.  Pure: no bus, no model.

Committed tokens in an open are a *claim*: the device may have been told them
by another verifier (failover), by this one before a restart, or not at all
(a forged open, a forged retained state the device picked up).  The verifier
keeps only what it can stand behind:

- **held**: tokens this process committed itself for the same session
  instance.  A claim that diverges from them, or stops short, is answered with
  them (the device rolls back to them).
- **tag**: a claim carrying a valid commit tag (HMAC over instance and tokens,
  :func:`middleware.protocol.session.commit_tag`) was committed by a verifier
  sharing this verifier's key.  It is the only proof rejection sampling has:
  its tokens depend on the draft distributions of past rounds, which nobody
  keeps, so they cannot be re-derived.
- **prove**: greedy and coupled tokens are a function of the context (coupled
  sampling draws position-seeded noise), so the verifier re-verifies the claim
  as a draft during the re-open: the prefill computes those logits anyway, so
  a claim costs the forward it would cost to rebuild the cache.  Where the
  claim and the target first differ, the target's token is committed and the
  rest of the claim is dropped.
- **rollback**: a rejection-mode claim without a valid tag (a restarted
  verifier with a per-process key, a forged open) is dropped back to what is
  held (often nothing): the device shows a correction and generates again.

Why both and not only tags: tags need a key shared across verifiers and
restarts, which a default install does not have; proving needs no key and
turns a forged claim into a correction instead of a refusal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from middleware.protocol.session import common_prefix

How = Literal["none", "held", "tag", "prove", "rollback"]


@dataclass(frozen=True, slots=True)
class OpenPlan:
    trusted: tuple[int, ...]  # committed tokens kept as they are
    to_prove: tuple[int, ...]  # claimed tokens right after ``trusted``, to re-verify
    how: How


def plan_open(
    claim: Sequence[int], held: Sequence[int] | None, *, tag_ok: bool, mode: str
) -> OpenPlan:
    """Decide what of ``claim`` to keep, prove or drop.

    ``held``: what this process committed for the same instance (None: nothing
    known); ``tag_ok``: whether the open's tag authenticates exactly ``claim``.
    """
    claim = tuple(claim)
    if held is not None:
        held = tuple(held)
        if common_prefix(held, claim) < len(held) or len(claim) == len(held):
            return OpenPlan(held, (), "held")  # the claim stops short or diverges: ours stand
        rest = claim[len(held) :]
    else:
        held, rest = (), claim
    if not rest:
        return OpenPlan(held, (), "none")
    if tag_ok:
        return OpenPlan(claim, (), "tag")
    if mode in ("greedy", "coupled"):
        return OpenPlan(held, rest, "prove")
    return OpenPlan(held, (), "rollback")
