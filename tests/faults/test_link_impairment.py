"""Impaired links between the devices and the broker (each device behind its own TCP proxy).

- *latency*: 40 ms + up to 60 ms of jitter each way, for the whole run.  Rounds get
  slower; nothing times out, nothing goes offline.
- *resets*: every device's connection is reset every 1.5 s for the whole run.  The
  MQTT client reconnects, resumes its persistent session and re-sends unacknowledged
  QoS 1 publishes (real DUP redeliveries); lost verdicts heal by ``catchup``.
- *half-open*: every link black-holed (TCP up, no byte through) for longer than
  twice the devices' 2 s MQTT keepalive.  Sessions time out and go offline: they
  release provisional text and keep drafting; the client sees the dead link by its
  keepalive and reconnects once the link is back; the sessions re-open, reconcile
  with the retained state and each provisional token is confirmed or corrected.

Outputs are identical to target-only decoding in all three.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace

import pytest

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
from tests.integration.proxy import TcpProxy

pytestmark = [pytest.mark.integration]

MAX_NEW = 64
KEEPALIVE = 2
BLACKHOLE_S = 3 * KEEPALIVE + 1.0


@pytest.mark.parametrize("impairment", ["latency", "resets", "half-open"])
async def test_impaired_links(
    mosquitto, unique_prefix, tiny_target, tiny_draft, reference, fault_report, impairment: str
) -> None:
    host, port = mosquitto.host, mosquitto.port
    pool = prompts(6, seed=4)
    refs = {p: reference(p, MAX_NEW) for p in pool}
    async with contextlib.AsyncExitStack() as stack:
        proxies = [await stack.enter_async_context(TcpProxy(host, port, seed=i)) for i in range(3)]
        # A slower drafting pace under resets, so that the run spans several of them.
        pace = 0.06 if impairment == "resets" else 0.01
        devices = [
            replace(d, address=(p.host, p.port), keepalive=KEEPALIVE, connect_timeout=3.0)
            for d, p in zip(mixed_devices(3, refs, tiny_draft, pace=pace), proxies, strict=True)
        ]
        jobs = jobs_for(devices, 2, pool)
        sids = [j.session_id for j in jobs]
        injected = 0
        async with Fleet(
            host, port, unique_prefix, devices, session=session_config(MAX_NEW), tokenizer=TOKENIZER
        ) as fleet:
            verifier = await fleet.start_verifier(
                InProcessVerifier(tiny_target, host, port, unique_prefix)
            )
            if impairment == "latency":
                for p in proxies:
                    p.delay, p.jitter = 0.04, 0.06
                injected = len(proxies)
                outcomes = await fleet.generate(jobs)
            else:
                stop = asyncio.Event()

                async def resets() -> None:
                    nonlocal injected
                    while not stop.is_set():
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), 1.5)
                        if not stop.is_set():
                            injected += sum(p.reset() for p in proxies)

                async def half_open() -> None:
                    nonlocal injected
                    await fleet.wait_progress(8, sids)
                    for p in proxies:
                        p.blackholed = True
                    injected = len(proxies)
                    await asyncio.sleep(BLACKHOLE_S)
                    for p in proxies:
                        p.blackholed = False

                async with asyncio.TaskGroup() as tg:
                    tg.create_task(
                        resets() if impairment == "resets" else half_open(), name=impairment
                    )
                    try:
                        outcomes = await fleet.generate(jobs)
                    finally:
                        stop.set()
            reconnects = sum(b.reconnects for b in fleet.buses.values())
            m = verifier.service.metrics
            rejected = {dict(k)["reason"]: int(n) for k, n in m.rejected.values.items()}
            # Verdicts sent again from the verdict cache (duplicate drafts, e.g. QoS 1 redeliveries)
            # or for finished sessions: answers of kind accept beyond the rounds verified.
            from_cache = m.answers.get(kind="accept") - m.rounds.total()

    result = audits(fleet, jobs, outcomes, reference, MAX_NEW)
    figures = totals(
        outcomes, "timeouts", "resends", "reopens", "offline_periods", "provisional", "corrections"
    )
    if impairment == "latency":
        assert figures["offline_periods"] == 0 and reconnects == 0
    elif impairment == "resets":
        assert injected >= 3 * len(proxies) and reconnects >= injected // 2
    else:
        # Offline mode engaged for the sessions under way, released provisional text, and every
        # provisional token was later confirmed or corrected (the audit checks the committed text).
        assert figures["offline_periods"] >= 1 and figures["provisional"] >= 1
        assert reconnects >= len(proxies)  # the keepalive found every dead link
        assert sum(p.dropped_bytes for p in proxies) > 0
        kinds = {c.kind for s in sids for c in fleet.chunks[s]}
        assert {"provisional"} < kinds and kinds & {"confirmed", "correction"}
    fault_report.record(
        faults=injected,
        audits=result,
        reconnects=reconnects,
        verifier_rejected=rejected,
        verdicts_from_cache=int(from_cache),
        **figures,
    )
