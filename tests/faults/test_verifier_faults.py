"""The verifier process SIGKILLed mid-generation: restarted, or taken over by a second one.

The verifier runs as a child process (``tests.faults.verifier_proc``) and is
killed with SIGKILL, so it loses every session and KV cache and the broker sees
its socket close (its last will fires).

- *restart* (exclusive verifier): devices time out while no verifier runs (they
  may go offline and show provisional text), then the new process answers their
  drafts with ``resync``; they re-open with their committed tokens and it
  rebuilds each session by prefill.
- *takeover* (two verifiers sharing the open subscription): the devices of the
  killed one see its last will, re-open at once, and the survivor claims them.

Either way every output equals target-only decoding.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.faults.fleet import Fleet, until
from tests.faults.scenario import (
    TOKENIZER,
    audits,
    session_config,
    totals,
    workload,
)
from tests.faults.verifiers import ProcessVerifier

pytestmark = [pytest.mark.integration]

MAX_NEW = 64


async def test_verifier_sigkill_and_restart(
    mosquitto, unique_prefix, tiny_draft, reference, fault_report, tmp_path
) -> None:
    w = workload(6, 2, 3, reference, MAX_NEW, tiny_draft)
    refs, devices, jobs, sids = w.refs, w.devices, w.jobs, w.sids
    host, port = mosquitto.host, mosquitto.port
    first = ProcessVerifier(host, port, unique_prefix, "v1", tmp_path)
    second = ProcessVerifier(host, port, unique_prefix, "v1", tmp_path / "restart")
    (tmp_path / "restart").mkdir()
    at_kill: dict[str, int] = {}

    async with Fleet(
        host, port, unique_prefix, devices, session=session_config(MAX_NEW), tokenizer=TOKENIZER
    ) as fleet:
        await fleet.start_verifier(first)

        async def fault() -> None:
            await fleet.wait_progress(8, sids)
            at_kill.update({s: fleet.progress(s) for s in sids})
            first.kill()
            await fleet.start_verifier(second)  # a new process: no sessions, no caches

        async with asyncio.TaskGroup() as tg:
            tg.create_task(fault(), name="fault")
            outcomes = await fleet.generate(jobs)

    assert all(0 < at_kill[j.session_id] < len(refs[j.prompt]) for j in jobs), at_kill
    figures = totals(
        outcomes, "timeouts", "reopens", "offline_periods", "provisional", "corrections"
    )
    assert figures["reopens"] >= len(jobs)  # every session was rebuilt on the new process
    fault_report.record(
        faults=1, audits=audits(fleet, jobs, outcomes, reference, MAX_NEW), **figures
    )


async def test_second_verifier_takes_over_after_sigkill(
    mosquitto, unique_prefix, tiny_draft, reference, fault_report, tmp_path
) -> None:
    w = workload(8, 3, 4, reference, MAX_NEW, tiny_draft)
    devices, jobs, sids = w.devices, w.jobs, w.sids
    host, port = mosquitto.host, mosquitto.port
    shared = [
        ProcessVerifier(host, port, unique_prefix, v, tmp_path, exclusive=False)
        for v in ("v1", "v2")
    ]
    owned: list[str] = []

    async with Fleet(
        host,
        port,
        unique_prefix,
        devices,
        session=session_config(MAX_NEW),
        tokenizer=TOKENIZER,
        watch=True,
    ) as fleet:
        await asyncio.gather(*(fleet.start_verifier(v) for v in shared))
        owners = fleet.watch.owners

        async def fault() -> None:
            await fleet.wait_progress(8, sids)
            await until(lambda: all(s in owners for s in sids), 30, "every owner on the broker")
            assert set(owners.values()) == {"v1", "v2"}, owners  # both hold sessions
            owned.extend(s for s in sids if owners[s] == "v1")
            shared[0].kill()

        async with asyncio.TaskGroup() as tg:
            tg.create_task(fault(), name="fault")
            outcomes = await fleet.generate(jobs)
        final_owners = dict(owners)

    moved = [o for o in outcomes if o.session_id in owned]
    assert moved and all(o.stats["reopens"] >= 1 for o in moved)
    assert all(final_owners[s] == "v2" for s in owned)
    fault_report.record(
        faults=1,
        audits=audits(fleet, jobs, outcomes, reference, MAX_NEW),
        sessions_moved=len(moved),
        **totals(outcomes, "timeouts", "reopens", "offline_periods"),
    )
