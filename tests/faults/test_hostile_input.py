"""Malformed and hostile input against a running verifier over a real Mosquitto.

While honest devices generate, an attacker publishes 10,000 fuzzed payloads
(100,000 with ``MW_FAULTS_FULL=1``) and crafted attacks: oversized payloads,
out-of-vocabulary and out-of-protocol token ids, absurd draft lengths and bases,
unknown sessions, stale and future epochs, another device's sessions, a wrong
tokenizer; and a third device floods valid drafts at ten times the honest rate.

- the verifier never crashes and keeps serving: the honest outputs stay identical
  to target-only decoding;
- every rejection is counted, by reason: the rejected-messages counter grows by
  exactly what the oracle (:func:`tests.faults.hostile.expected`) predicts for
  every hostile message, and by nothing for honest traffic;
- memory stays bounded: the process's VmRSS grows by less than
  :data:`RSS_BOUND_KIB`, and the verifier holds no session, queue entry or KV
  cache for the hostile traffic beyond the sessions legitimately opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog

from middleware.broker_bridge.mqtt import MqttBus, MqttSettings
from middleware.nodes.service import Outcome
from middleware.protocol import Draft, OpenSession
from middleware.verifier.service import VerifierConfig
from middleware.verifier.sessions import VERDICT_CACHE
from tests.faults.audit import rss_kib
from tests.faults.conftest import full_only
from tests.faults.drafters import Paced, ReplayDrafter
from tests.faults.fleet import DeviceSpec, Fleet, Job, until
from tests.faults.hostile import Hostile, attacks, fuzz_corpus
from tests.faults.scenario import TOKENIZER, audits, jobs_for, prompts, session_config
from tests.faults.verifiers import TINY_FP, InProcessVerifier, client_id
from tests.unit.tiny import EOS, VOCAB

pytestmark = [pytest.mark.integration]

MAX_NEW = 64
MAX_DRAFT = 16
SIZES = [
    pytest.param(10_000, 40, id="10k"),
    pytest.param(100_000, 200, id="100k", marks=[full_only, pytest.mark.timeout(1800)]),
]
FLOOD_FACTOR = 10
RSS_BOUND_KIB = 64 * 1024
ENGINE_BUDGET = 8192


def session_ids(svc: object) -> set[str]:
    """The session ids (not keys) the verifier holds."""
    return {x.session_id for x in svc.sessions.values()}  # type: ignore[attr-defined]


@pytest.mark.parametrize(("fuzz_n", "per_kind"), SIZES)
async def test_hostile_input_against_running_verifier(
    mosquitto, unique_prefix, tiny_target, reference, fault_report, fuzz_n: int, per_kind: int
) -> None:
    host, port = mosquitto.host, mosquitto.port
    pool = prompts(6, seed=6)
    refs = {p: reference(p, MAX_NEW) for p in pool}
    devices = [
        DeviceSpec(
            f"h{i}",
            lambda i=i: Paced(ReplayDrafter(refs, alpha=0.7, vocab_size=VOCAB, seed=i), 0.01),
        )
        for i in range(3)
    ]
    honest_devices = {d.device_id for d in devices}

    def is_honest(topic: str) -> bool:  # the verifier logs a topic or a session id
        return topic.startswith(("ha", "hb")) or any(f"/{d}/" in topic for d in honest_devices)

    cfg = VerifierConfig(max_draft=MAX_DRAFT)

    def bus(name: str) -> MqttBus:
        return MqttBus(
            MqttSettings(
                host=host, port=port, client_id=client_id(unique_prefix, name), max_inflight=20
            )
        )

    async with (
        Fleet(
            host, port, unique_prefix, devices, session=session_config(MAX_NEW), tokenizer=TOKENIZER
        ) as fleet,
        bus("mallory") as evil,
        bus("dev-b") as victim,
        bus("flooder") as flooder,
    ):
        v = await fleet.start_verifier(
            InProcessVerifier(
                tiny_target,
                host,
                port,
                unique_prefix,
                config=cfg,
                memory_budget_tokens=ENGINE_BUDGET,
            )
        )
        svc, t = v.service, fleet.topics

        # Phase A: honest devices alone; their draft rate is the "normal rate".
        jobs_a = jobs_for(devices, 2, pool, tag="ha")
        started = time.monotonic()
        outs_a = await fleet.generate(jobs_a)
        took = time.monotonic() - started
        per_device = Counter()
        for j, o in zip(jobs_a, outs_a, strict=True):
            per_device[j.device_id] += o.stats["rounds"] + o.stats["resends"]
        normal_rate = max(per_device.values()) / took
        flood_rate = FLOOD_FACTOR * normal_rate

        # The victim device opens sessions (legitimately) that the attacks aim at; the flooder one.
        victims = [f"b-{i}" for i in range(4)]
        for sid in victims:
            await victim.publish(
                t.session("dev-b", sid, "open"),
                OpenSession(
                    session_id=sid,
                    device_id="dev-b",
                    epoch=5,
                    seq=1,
                    tokenizer=TINY_FP,
                    prompt=pool[0],
                    max_new_tokens=MAX_NEW,
                    stop_ids=(EOS,),
                ).encode(),
            )
        await flooder.publish(
            t.session("flooder", "fl-0", "open"),
            OpenSession(
                session_id="fl-0",
                device_id="flooder",
                epoch=1,
                seq=1,
                tokenizer=TINY_FP,
                prompt=pool[1],
                max_new_tokens=MAX_NEW,
                stop_ids=(EOS,),
            ).encode(),
        )
        await until(lambda: all(s in session_ids(svc) for s in [*victims, "fl-0"]), 30)

        corpus, valid_opens_left_out = fuzz_corpus(
            fuzz_n, topics=t, device="mallory", fingerprint=TINY_FP, vocab=VOCAB, limits=cfg.limits
        )
        corpus += list(
            attacks(
                t,
                attacker="mallory",
                victim="dev-b",
                victim_sessions=victims,
                victim_epoch=5,
                fingerprint=TINY_FP,
                vocab=VOCAB,
                max_draft=MAX_DRAFT,
                per_kind=per_kind,
            )
        )
        random.Random(8).shuffle(corpus)  # crafted attacks throughout, not only at the end
        want = Counter(h.expect for h in corpus if h.expect is not None)
        before = Counter(
            {dict(k).get("reason", ""): n for k, n in svc.metrics.rejected.values.items()}
        )
        gc.collect()
        rss_before = rss_kib()

        # Phase B: honest sessions again, beside the attack and the flood.
        jobs_b: list[Job] = []
        outs_b: list[Outcome] = []
        stop = asyncio.Event()
        flood_sent = 0

        def rejected_now() -> Counter[str]:
            now = Counter(
                {dict(k).get("reason", ""): n for k, n in svc.metrics.rejected.values.items()}
            )
            now.subtract(before)
            return +now

        async def attack(messages: list[Hostile]) -> None:
            sent = 0
            window = asyncio.Semaphore(32)

            async def one(h: Hostile) -> None:
                async with window:
                    await evil.publish(h.topic, h.payload, qos=1)

            i = 0
            while i < len(messages):
                # Up to 250 messages or 4 MB at once, then wait until the verifier has dealt with
                # all but 500 of them (all of them after big ones): the broker's per-client queue
                # for the verifier (10,000 messages, 64 MiB) never fills, so nothing is dropped.
                batch, size = [], 0
                while i < len(messages) and len(batch) < 250 and size < 4 << 20:
                    batch.append(messages[i])
                    size += len(messages[i].payload)
                    i += 1
                await asyncio.gather(*(one(h) for h in batch))
                sent += sum(h.expect is not None for h in batch)
                lag = 0 if size >= 1 << 20 else 500
                await until(lambda s=sent, lag=lag: rejected_now().total() >= s - lag, 120)

        async def flood() -> None:
            nonlocal flood_sent
            start = time.monotonic()
            while not stop.is_set():
                flood_sent += 1
                d = Draft(
                    "fl-0", 1, flood_sent, 0, tuple((flood_sent * 7 + k) % VOCAB for k in range(4))
                )
                await flooder.publish(t.session("flooder", "fl-0", "draft"), d.encode(), qos=1)
                if (ahead := start + flood_sent / flood_rate - time.monotonic()) > 0:
                    await asyncio.sleep(ahead)

        started_b = time.monotonic()
        with honest_rejections_logged(is_honest) as honest_rejections:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(flood(), name="flood")
                attacking = tg.create_task(attack(corpus), name="attack")
                try:
                    # Honest sessions, round after round, for as long as the attack lasts.
                    while True:
                        jobs = jobs_for(devices, 2, pool, tag=f"hb{len(jobs_b)}-")
                        outs_b += await fleet.generate(jobs, within=600)
                        jobs_b += jobs
                        if attacking.done():
                            break
                    honest_done = time.monotonic()
                    await attacking
                    attack_done = time.monotonic()
                finally:
                    stop.set()
            with contextlib.suppress(AssertionError):  # the comparison below says what is missing
                await until(lambda: rejected_now().total() >= want.total(), 60)
            await asyncio.sleep(1.0)  # anything counted twice would show now
            got = rejected_now()
            await until(
                lambda: not any(s.startswith("hb") for s in session_ids(svc)), 30
            )  # closes processed

        gc.collect()
        rss_after = rss_kib()
        # Internal structures: nothing kept for hostile traffic.
        sessions = session_ids(svc)
        queued = svc._batcher.qsize()
        newer = len(svc._newer)
        caches = max(len(s.verdicts) for s in svc.sessions.values())
        engine = svc.engine.stats()
        dropped = v.bus.dropped
        alive = not v.task.done()
        flood_verdicts_cached = len(svc.sessions["flooder/fl-0"].verdicts)

    assert alive, "the verifier service stopped"
    assert dropped == 0  # every message reached the verifier: the counts below are exact
    # Honest traffic is rejected only when an honest session recovers from a timeout under the
    # load (a re-open leaves drafts of its old epoch in flight); every hostile message is
    # counted under the predicted reason, and nothing else is counted.
    honest = Counter(str(e["reason"]) for e in honest_rejections)
    assert set(honest) <= {"stale_epoch", "unknown_session"}, honest_rejections[:5]
    assert got == want + honest, (
        f"counted {dict(got)}, expected {dict(want)} + honest {dict(honest)}"
    )
    assert sessions == {*victims, "fl-0"}
    assert (
        queued == 0
        and newer == 0
        and caches <= VERDICT_CACHE
        and flood_verdicts_cached <= VERDICT_CACHE
    )
    assert engine.cached_tokens <= ENGINE_BUDGET and engine.sessions <= len(devices) * 2 + 1
    growth = rss_after - rss_before
    assert growth < RSS_BOUND_KIB, f"VmRSS grew by {growth} KiB"
    result = audits(fleet, jobs_a + jobs_b, outs_a + outs_b, reference, MAX_NEW)
    kinds = Counter(h.kind for h in corpus)
    fault_report.record(
        faults=len(corpus) + flood_sent,
        audits=result,
        fuzzed=fuzz_n,
        crafted=len(corpus) - fuzz_n,
        valid_opens_left_out=valid_opens_left_out,
        ignored_by_design=sum(h.expect is None for h in corpus),
        flood_sent=flood_sent,
        flood_rate_per_s=round(flood_rate, 1),
        normal_rate_per_s=round(normal_rate, 1),
        rejected={k: int(n) for k, n in sorted(got.items())},
        rss_before_kib=rss_before,
        rss_after_kib=rss_after,
        rss_growth_kib=growth,
        honest_rejected=dict(honest),
        **{f"honest_{k}": int(sum(o.stats[k] for o in outs_b)) for k in ("timeouts", "reopens")},
        engine_cached_tokens=engine.cached_tokens,
        fuzz_kinds=dict(kinds),
        attack_s=round(attack_done - started_b, 1),
        honest_rounds_during_attack=len(jobs_b) // len(jobs_a),
        honest_s=round(honest_done - started_b, 1),
    )


@contextlib.contextmanager
def honest_rejections_logged(is_honest: Callable[[str], bool]) -> Iterator[list[dict[str, Any]]]:
    """Keep the ``message_rejected`` log events about honest traffic and drop every other log
    event (keeping 100,000 rejections would itself grow the memory this test measures)."""
    kept: list[dict[str, Any]] = []

    def keep(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        if event.get("event") == "message_rejected" and is_honest(str(event.get("topic", ""))):
            kept.append(dict(event))
        raise structlog.DropEvent

    before = structlog.get_config()["processors"]
    structlog.configure(processors=[keep])
    try:
        yield kept
    finally:
        structlog.configure(processors=before)
