"""The broker SIGKILLed mid-generation and restarted from its persistence (twice).

Devices keep persistent MQTT sessions (clean start off, session expiry); the
broker saves its database every second, so a SIGKILL loses up to a second of
state: in-flight drafts and verdicts, queued messages, retained state.  The
protocol heals all of it (resends, ``catchup``, ``resync`` and re-open): every
session finishes with exactly the target-only tokens, each delivered once to
the user and on the text topic.
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
from tests.faults.verifiers import InProcessVerifier

pytestmark = [pytest.mark.integration]

MAX_NEW = 96


async def test_broker_sigkill_and_restart_mid_generation(
    fresh_mosquitto, unique_prefix, tiny_target, tiny_draft, reference, fault_report
) -> None:
    broker = fresh_mosquitto
    w = workload(8, 1, 4, reference, MAX_NEW, tiny_draft)
    refs, devices, jobs, sids = w.refs, w.devices, w.jobs, w.sids
    at_kill: list[dict[str, int]] = []

    async with Fleet(
        broker.host,
        broker.port,
        unique_prefix,
        devices,
        session=session_config(MAX_NEW),
        tokenizer=TOKENIZER,
        watch=True,
    ) as fleet:
        verifier = await fleet.start_verifier(
            InProcessVerifier(tiny_target, broker.host, broker.port, unique_prefix)
        )

        async def faults() -> None:
            # First when every session has a few tokens, then when the fastest is half-way.
            for i, down in enumerate((1.0, 0.3)):
                if i == 0:
                    await fleet.wait_progress(8, sids)
                else:
                    await fleet.wait_progress(MAX_NEW // 2, sids, any_session=True)
                at_kill.append({s: fleet.progress(s) for s in sids})
                broker.kill()  # SIGKILL: no save, every connection reset
                await asyncio.sleep(down)
                await asyncio.to_thread(broker.start)  # same port, same persistence directory

        async with asyncio.TaskGroup() as tg:
            tg.create_task(faults(), name="faults")
            outcomes = await fleet.generate(jobs)
        await until(lambda: set(fleet.watch.results) >= set(sids), 30, "every retained result")
        await fleet.bus_caught_up(sids, within=5)
        bus_text = {s: fleet.bus_chunks(s) for s in sids}
        results = dict(fleet.watch.results)
        redelivered = fleet.watch.redelivered
        vbus_reconnects = verifier.bus.reconnects

    assert broker.starts == 3
    # The faults hit generation under way: no session had finished at the first kill, and
    # most had not at the second.
    under_way = [
        sum(0 < snap[j.session_id] < len(refs[j.prompt]) for j in jobs) for snap in at_kill
    ]
    assert under_way[0] == len(jobs) and under_way[1] >= len(jobs) * 3 // 4, at_kill
    result = audits(fleet, jobs, outcomes, reference, MAX_NEW)
    # A bystander of the broker: the retained result of every session is its reference text.
    # The text stream (QoS 1, no end-to-end acknowledgement) carries each chunk at least once
    # except those the broker acknowledged and lost in its last second before a SIGKILL (its
    # autosave interval); whatever it carried is what the user saw, in order.
    missed = 0
    for j in jobs:
        assert results[j.session_id].text == TOKENIZER.decode(refs[j.prompt])
        local = {c.seq: c for c in fleet.chunks[j.session_id]}
        assert all(local[c.seq] == c for c in bus_text[j.session_id])
        missed += len(local) - len(bus_text[j.session_id])
    assert vbus_reconnects == 2
    fault_report.record(
        faults=2,
        audits=result,
        under_way_at_kills=under_way,
        text_redelivered=redelivered,
        text_chunks_missed_by_bystander=missed,
        verifier_reconnects=vbus_reconnects,
        **totals(outcomes, "timeouts", "resends", "reopens", "offline_periods"),
    )
