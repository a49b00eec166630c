"""Building blocks the fault tests share: prompts, a mixed fleet, jobs, audits."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from middleware.nodes.drafters import Drafter, make_drafter
from middleware.nodes.drafters.hf import HFDrafter
from middleware.nodes.service import Outcome
from middleware.nodes.session import SessionConfig
from tests.faults.audit import Audit, audit
from tests.faults.drafters import Paced, ReplayDrafter
from tests.faults.fleet import DeviceSpec, Fleet, Job
from tests.unit.tiny import EOS, VOCAB, TinyTokenizer

Reference = Callable[[tuple[int, ...], int], list[int]]
TOKENIZER = TinyTokenizer()


def prompts(n: int, seed: int = 0) -> list[tuple[int, ...]]:
    """``n`` distinct prompts of 2-9 tokens over the tiny vocabulary."""
    rng = random.Random(seed)
    out: list[tuple[int, ...]] = []
    while len(out) < n:
        p = (1, *(rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 9))))
        if p not in out:
            out.append(p)
    return out


def session_config(max_new: int, **kw: Any) -> SessionConfig:
    return SessionConfig(max_new_tokens=max_new, stop_ids=(EOS,), probe_interval=0.5, **kw)


def mixed_devices(
    n: int,
    refs: dict[tuple[int, ...], list[int]],
    tiny_draft: Any,
    *,
    pace: float = 0.01,
    **spec: Any,
) -> list[DeviceSpec]:
    """``n`` devices cycling through four drafter kinds: a good and a poor replayed draft model,
    the n-gram drafter and a real (noisy tiny) model drafter, each paced to ``pace`` s/token."""
    kinds: list[tuple[str, Callable[[int], Any]]] = [
        ("replay-good", lambda i: ReplayDrafter(refs, alpha=0.85, vocab_size=VOCAB, seed=i)),
        ("ngram", lambda i: make_drafter("ngram")),
        ("replay-poor", lambda i: ReplayDrafter(refs, alpha=0.4, vocab_size=VOCAB, seed=i)),
        ("hf-noisy", lambda i: HFDrafter(tiny_draft, name="hf-noisy")),
    ]

    def paced(make: Callable[[int], Any], i: int) -> Callable[[], Drafter]:
        return lambda: Paced(make(i), pace)

    out = []
    for i in range(n):
        name, make = kinds[i % len(kinds)]
        out.append(DeviceSpec(f"d{i}-{name}", paced(make, i), **spec))
    return out


def jobs_for(
    devices: Sequence[DeviceSpec], per_device: int, pool: Sequence[tuple[int, ...]], tag: str = "s"
) -> list[Job]:
    jobs = []
    for i, d in enumerate(devices):
        for k in range(per_device):
            jobs.append(Job(d.device_id, f"{tag}{i}-{k}", pool[(i * per_device + k) % len(pool)]))
    return jobs


@dataclass(frozen=True)
class Workload:
    """The usual fault-test fleet: prompts, their references, mixed devices, two jobs each."""

    refs: dict[tuple[int, ...], list[int]]
    devices: list[DeviceSpec]
    jobs: list[Job]

    @property
    def sids(self) -> list[str]:
        return [j.session_id for j in self.jobs]


def workload(
    n_prompts: int, seed: int, n_devices: int, reference: Reference, max_new: int, tiny_draft: Any
) -> Workload:
    pool = prompts(n_prompts, seed=seed)
    refs = {p: reference(p, max_new) for p in pool}
    devices = mixed_devices(n_devices, refs, tiny_draft, pace=0.01)
    return Workload(refs, devices, jobs_for(devices, 2, pool))


def audits(
    fleet: Fleet,
    jobs: Sequence[Job],
    outcomes: Sequence[Outcome],
    reference: Reference,
    max_new: int,
) -> list[Audit]:
    return [
        audit(
            j.session_id,
            reference(j.prompt, max_new),
            o.tokens,
            fleet.chunks[j.session_id],
            TOKENIZER,
        )
        for j, o in zip(jobs, outcomes, strict=True)
    ]


def totals(outcomes: Sequence[Outcome], *keys: str) -> dict[str, int]:
    return {k: int(sum(o.stats.get(k, 0) for o in outcomes)) for k in keys}
