"""Duplicated and reordered messages: each round takes effect once, outputs stay identical.

Every device's bus is a :class:`ReorderingBus`: its opens and drafts reach the
broker twice or late (some past the retransmission timeout, so a stale copy
arrives after the session's resend), and its verdicts reach the session twice or
out of order.  The verifier answers a duplicate from its verdict cache, a stale
base with ``catchup`` and a resend that overtakes its original by verifying the
newest draft; the session ignores verdicts of other rounds except for the truth
they carry.  So the verifier commits each token exactly once: its committed-token
counter equals the total length of the references.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from functools import partial

import pytest

from tests.faults.faulty_bus import ReorderingBus
from tests.faults.fleet import Fleet
from tests.faults.scenario import (
    TOKENIZER,
    audits,
    jobs_for,
    mixed_devices,
    prompts,
    session_config,
    totals,
)
from tests.faults.verifiers import InProcessVerifier

pytestmark = [pytest.mark.integration]

MAX_NEW = 64


async def test_duplicated_and_reordered_messages(
    mosquitto, unique_prefix, tiny_target, tiny_draft, reference, fault_report
) -> None:
    host, port = mosquitto.host, mosquitto.port
    pool = prompts(8, seed=5)
    refs = {p: reference(p, MAX_NEW) for p in pool}
    devices = [
        replace(d, bus=partial(ReorderingBus, seed=i))
        for i, d in enumerate(mixed_devices(4, refs, tiny_draft, pace=0.005))
    ]
    jobs = jobs_for(devices, 2, pool)
    async with Fleet(
        host, port, unique_prefix, devices, session=session_config(MAX_NEW), tokenizer=TOKENIZER
    ) as fleet:
        v = await fleet.start_verifier(InProcessVerifier(tiny_target, host, port, unique_prefix))
        outcomes = await fleet.generate(jobs)
        injected: Counter[str] = Counter()
        for bus in fleet.buses.values():
            assert isinstance(bus, ReorderingBus)
            injected.update(bus.injected)
        m = v.service.metrics
        committed, rounds = m.committed.total(), m.rounds.total()
        from_cache = m.answers.get(kind="accept") - rounds
        catchups = m.answers.get(kind="catchup")
        rejected = {dict(k)["reason"]: int(n) for k, n in m.rejected.values.items()}

    result = audits(fleet, jobs, outcomes, reference, MAX_NEW)
    assert committed == sum(len(refs[j.prompt]) for j in jobs)  # each round took effect once
    assert injected["draft_duplicated"] > 0 and injected["verdict_duplicated"] > 0
    assert injected["draft_late"] > 0 and injected["verdict_delayed"] > 0
    assert from_cache > 0  # duplicates were answered from the verdict cache, not verified again
    fault_report.record(
        faults=sum(injected.values()),
        audits=result,
        **dict(sorted(injected.items())),
        verifier_rounds=int(rounds),
        answered_from_cache=int(from_cache),
        catchups=int(catchups),
        verifier_rejected=rejected,
        **totals(outcomes, "timeouts", "resends", "reopens", "offline_periods"),
    )
