"""Soak: many simulated devices generating back to back for a bounded time.

64 devices for 45 s (and, with ``MW_FAULTS_FULL=1``, 256 devices for 10 minutes),
each a real node service on its own MQTT connection with a replayed draft model
(acceptance 0.5-0.9), run sessions one after another against one
verifier with the tiny target.  Checked:

- every session's output is identical to target-only decoding (audited, and its
  chunks dropped, as soon as it ends);
- no session is stuck: a watchdog fails the test if any session goes
  :data:`STALL_S` seconds without committing a token;
- memory stays bounded: VmRSS after the run exceeds VmRSS after the first third
  by less than :data:`RSS_GROWTH_BOUND_KIB`; the verifier ends with no session,
  no queued draft and at most its KV budget of cached tokens; nodes keep at most
  ``OUTCOMES_KEPT`` outcomes.
"""

from __future__ import annotations

import asyncio
import gc
import time

import pytest

from middleware.nodes.service import OUTCOMES_KEPT
from tests.faults.audit import Audit, audit, rss_kib
from tests.faults.conftest import full_only
from tests.faults.drafters import ReplayDrafter
from tests.faults.fleet import DeviceSpec, Fleet, until
from tests.faults.scenario import TOKENIZER, prompts, session_config
from tests.faults.verifiers import InProcessVerifier
from tests.unit.tiny import VOCAB

pytestmark = [pytest.mark.integration]

SIZES = [
    pytest.param(64, 45.0, id="64-devices-45s"),
    pytest.param(256, 600.0, id="256-devices-10min", marks=[full_only, pytest.mark.timeout(1800)]),
]
MAX_NEW = 32
STALL_S = 30.0
ENGINE_BUDGET = 16_384
RSS_GROWTH_BOUND_KIB = 64 * 1024


@pytest.mark.parametrize(("n_devices", "duration_s"), SIZES)
async def test_soak_many_devices(
    mosquitto,
    unique_prefix,
    tiny_target,
    reference,
    fault_report,
    n_devices: int,
    duration_s: float,
) -> None:
    host, port = mosquitto.host, mosquitto.port
    pool = prompts(16, seed=7)
    for p in pool:
        reference(p, MAX_NEW)  # computed before the clock starts
    refs = {p: reference(p, MAX_NEW) for p in pool}
    devices = [
        DeviceSpec(
            f"sim{i:03d}",
            lambda i=i: ReplayDrafter(refs, alpha=0.5 + 0.1 * (i % 5), vocab_size=VOCAB, seed=i),
            max_concurrent=1,
        )
        for i in range(n_devices)
    ]
    results: list[Audit] = []
    active: dict[str, tuple[int, float]] = {}  # session -> (tokens, when they last grew)
    stuck: list[str] = []
    rss: list[tuple[float, int]] = []
    longest_stall = 0.0

    async with Fleet(
        host, port, unique_prefix, devices, session=session_config(MAX_NEW), tokenizer=TOKENIZER
    ) as fleet:
        v = await fleet.start_verifier(
            InProcessVerifier(
                tiny_target, host, port, unique_prefix, memory_budget_tokens=ENGINE_BUDGET
            )
        )
        svc = v.service
        start = time.monotonic()
        deadline = start + duration_s

        async def device(d: DeviceSpec, idx: int) -> None:
            node = fleet.nodes[d.device_id]
            k = 0
            while time.monotonic() < deadline:
                prompt = pool[(idx + k) % len(pool)]
                sid = f"{d.device_id}-{k}"
                active[sid] = (0, time.monotonic())
                out = await node.generate_ids(prompt, session_id=sid)
                active.pop(sid)
                results.append(
                    audit(sid, refs[prompt], out.tokens, fleet.chunks.pop(sid, []), TOKENIZER)
                )
                k += 1

        async def watchdog(stop: asyncio.Event) -> None:
            nonlocal longest_stall
            while not stop.is_set():
                await asyncio.sleep(1.0)
                now = time.monotonic()
                for sid, (n, since) in list(active.items()):
                    if (p := fleet.progress(sid)) > n:
                        active[sid] = (p, now)
                    else:
                        longest_stall = max(longest_stall, now - since)
                        if now - since > STALL_S and sid not in stuck:
                            stuck.append(sid)
                rss.append((now - start, rss_kib()))

        stop = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            dog = tg.create_task(watchdog(stop), name="watchdog")
            loops = [
                tg.create_task(device(d, i), name=f"loop-{d.device_id}")
                for i, d in enumerate(devices)
            ]
            try:
                await asyncio.wait_for(asyncio.gather(*loops), duration_s + 180)
            finally:
                stop.set()
            await dog
        elapsed = time.monotonic() - start
        await until(lambda: not svc.sessions, 30)  # every close processed
        gc.collect()
        rss_end = rss_kib()
        queued, newer = svc._batcher.qsize(), len(svc._newer)
        engine = svc.engine.stats()
        kept = max(len(n.outcomes) for n in fleet.nodes.values())
        done = sum(n.sessions_done for n in fleet.nodes.values())
        committed = svc.metrics.committed.total()
        batch_mean = svc.metrics.batch_size.mean

    assert not stuck, f"sessions without progress for {STALL_S} s: {stuck[:10]}"
    assert done == len(results) and len(results) >= n_devices
    warm = next(kib for t, kib in rss if t >= duration_s / 3)
    growth = rss_end - warm
    assert growth < RSS_GROWTH_BOUND_KIB, f"VmRSS grew by {growth} KiB after warm-up"
    assert queued == 0 and newer == 0
    assert engine.cached_tokens <= ENGINE_BUDGET and kept <= OUTCOMES_KEPT
    fault_report.record(
        faults=0,
        audits=results,
        devices=n_devices,
        duration_s=round(elapsed, 1),
        sessions_per_s=round(len(results) / elapsed, 2),
        tokens_per_s=round(committed / elapsed, 1),
        mean_batch=round(batch_mean, 2),
        longest_stall_s=round(longest_stall, 1),
        rss_warm_kib=warm,
        rss_end_kib=rss_end,
        rss_peak_kib=max(k for _, k in rss),
        rss_growth_kib=growth,
        engine_cached_tokens=engine.cached_tokens,
    )
