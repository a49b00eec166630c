"""One end-to-end conformance suite, run over every transport path.

Each test body runs three times: ``mqtt`` (all on Mosquitto), ``zmq`` (device
DEALERs straight to verifier ROUTERs, no broker) and ``bridge`` (devices on
Mosquitto, verifiers on ZeroMQ, joined by the bridge).  Whatever the path, committed output equals
target-only decoding and the session protocol's healing rules hold.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch

from middleware.broker_bridge.zmq import ZmqBus
from middleware.nodes.drafters import make_drafter
from middleware.nodes.drafters.hf import HFDrafter
from middleware.nodes.service import encode_prompt, stop_ids_of
from middleware.nodes.session import SessionConfig
from middleware.verifier.reference import reference_greedy
from middleware.verifier.service import offline_status_payload as verifier_will
from tests.integration.transports import PATHS, Fleet, Rig, fleet, open_rig
from tests.unit.tiny import EOS, TinyTokenizer, noisy_copy, tiny_llama

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

PROMPTS = [[1, 5, 9, 13], [1, 7, 7, 7, 3, 22, 40], [1, 11, 12, 13, 14, 15, 16, 17, 18]]
MAX_NEW = 24
FP = "tiny"


@pytest.fixture(scope="module")
def target() -> torch.nn.Module:
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def draft_model() -> torch.nn.Module:
    """The target with noisy weights: it agrees often, not always (partial acceptance)."""
    return noisy_copy(seed=0)


@pytest.fixture(scope="module")
def references(target: torch.nn.Module) -> list[list[int]]:
    return [reference_greedy(target, p, MAX_NEW, (EOS,)) for p in PROMPTS]


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def broker(path: str, request: pytest.FixtureRequest) -> Any:
    return None if path == "zmq" else request.getfixturevalue("mosquitto")


@pytest.fixture
async def rig(path: str, broker: Any, unique_prefix: str) -> AsyncIterator[Rig]:
    async with open_rig(path, unique_prefix, broker) as r:
        yield r


@pytest.fixture
async def crew(rig: Rig) -> AsyncIterator[Fleet]:
    async with fleet(rig) as f:
        yield f


async def drain(sub: Any, settle: float = 0.3) -> list[Any]:
    got = []
    while True:
        try:
            got.append(await sub.get(settle))
        except TimeoutError:
            return got


def _session(**kw: Any) -> SessionConfig:
    return SessionConfig(max_new_tokens=MAX_NEW, stop_ids=(EOS,), **kw)


# --- lossless generation --------------------------------------------------------------------
async def test_greedy_generation_equals_target_only(
    crew: Fleet, target, draft_model, references
) -> None:
    await crew.start_verifier(target, FP)
    node = await crew.start_node(
        "dev-1", TinyTokenizer(), FP, lambda: HFDrafter(draft_model), _session()
    )
    outs = await asyncio.wait_for(
        asyncio.gather(*(node.generate_ids(p, session_id=f"s{i}") for i, p in enumerate(PROMPTS))),
        120,
    )
    assert [list(o.tokens) for o in outs] == references
    assert sum(o.stats["accepted"] for o in outs) > 0  # speculation did its work


@pytest.fixture(scope="module")
def smol_case(smollm2) -> tuple[list[int], tuple[int, ...], list[int]]:
    """Prompt ids, stop ids and the target-only greedy continuation (12 tokens)."""
    ids = encode_prompt(smollm2.tokenizer, "What is MQTT?")
    stops = stop_ids_of(smollm2.tokenizer)
    return ids, stops, reference_greedy(smollm2.model, ids, 12, stops)


@pytest.mark.model
async def test_smollm2_greedy_equals_target_only(crew: Fleet, smollm2, smol_case) -> None:
    ids, stops, reference = smol_case
    await crew.start_verifier(smollm2.model, smollm2.fingerprint)
    node = await crew.start_node(
        "dev-1",
        smollm2.tokenizer,
        smollm2.fingerprint,
        lambda: make_drafter("ngram"),
        SessionConfig(max_new_tokens=12, stop_ids=stops),
    )
    out = await asyncio.wait_for(node.generate_ids(ids, session_id="smol"), 120)
    assert list(out.tokens) == reference


# --- the session protocol's healing rules, message by message ------------------------------------
async def test_duplicated_draft_gets_the_same_verdict(crew: Fleet, target, references) -> None:
    await crew.start_verifier(target, FP)
    ref = references[0]
    dev = await crew.hand("dup", PROMPTS[0], FP)
    assert (await dev.open(epoch=1, seq=1)).kind == "opened"
    await dev.draft(1, 2, 0, ref[:3])
    first = await dev.verdict(2)
    await dev.draft(1, 2, 0, ref[:3])  # a QoS 1 redelivery of the same draft
    again = await dev.verdict(2)
    assert first.kind == "accept" and again == first
    assert list(first.tokens) == ref[: len(first.tokens)]
    # back to back: however many verdicts come, they are one and the same
    base = first.committed_len
    await dev.draft(1, 3, base, ref[base : base + 2])
    await dev.draft(1, 3, base, ref[base : base + 2])
    answers = await dev.verdicts(3)
    assert answers and all(v == answers[0] for v in answers)
    assert list(answers[0].tokens) == ref[base : base + len(answers[0].tokens)]


async def test_lost_verdict_heals_with_catchup(crew: Fleet, target, references) -> None:
    await crew.start_verifier(target, FP)
    ref = references[1]
    dev = await crew.hand("lost", PROMPTS[1], FP)
    assert (await dev.open(epoch=1, seq=1)).kind == "opened"
    await dev.draft(1, 2, 0, ref[:2])
    lost = await dev.verdict(2)  # pretend this verdict never arrived
    await dev.draft(1, 3, 0, ref[:4])  # resend: same base, new seq, longer draft
    healed = await dev.verdict(3)
    assert healed.kind == "catchup"
    assert (healed.base, healed.tokens) == (0, lost.tokens)
    assert healed.committed_len == lost.committed_len
    assert list(healed.tokens) == ref[: len(healed.tokens)]


async def test_resync_answers_and_reopen_with_committed(crew: Fleet, target, references) -> None:
    await crew.start_verifier(target, FP)
    ref = references[2]
    dev = await crew.hand("resync", PROMPTS[2], FP)
    assert (await dev.open(epoch=2, seq=1)).kind == "opened"
    await dev.draft(2, 2, 5, ref[5:8])  # base ahead of what the verifier committed
    ahead = await dev.verdict(2)
    await dev.draft(1, 3, 0, ref[:3])  # an epoch the verifier has left behind
    stale = await dev.verdict(3)
    assert (ahead.kind, ahead.committed_len) == ("resync", 0)
    assert stale.kind == "resync"
    # the device's answer to resync: re-open with a newer epoch and what it has committed
    reopened = await dev.open(epoch=3, seq=4, committed=ref[:5])
    assert (reopened.kind, reopened.committed_len) == ("opened", 5)
    await dev.draft(3, 5, 5, ref[5:8])
    v = await dev.verdict(5)
    assert v.kind == "accept" and v.base == 5
    assert list(v.tokens) == ref[5 : 5 + len(v.tokens)]


# --- timeouts: the verifier is away, the device resends, goes offline, comes back ------------
async def test_absent_verifier_timeouts_offline_then_lossless(
    crew: Fleet, rig: Rig, target, references
) -> None:
    if rig.path == "zmq":
        pytest.skip("no bus without a verifier: on ZeroMQ the verifier is the other end")
    watch_bus = await crew.bus("device", "watch")
    opens = await watch_bus.subscribe(rig.topics.all_sessions("open"))
    cfg = _session(
        rto_initial=0.3, rto_min=0.2, max_failures=2, probe_interval=0.2, probe_interval_max=0.5
    )
    node = await crew.start_node("dev-1", TinyTokenizer(), FP, lambda: make_drafter("ngram"), cfg)
    run = asyncio.create_task(node.generate_ids(PROMPTS[0], session_id="away"))
    for _ in range(4):  # the first open, its resend and offline probes: nobody answers
        await opens.get(30)
    await crew.start_verifier(target, FP)
    out = await asyncio.wait_for(run, 120)
    assert list(out.tokens) == references[0]
    assert out.stats["timeouts"] >= 2 and out.stats["offline_periods"] >= 1


# --- a verifier dies: the device fails over to the next endpoint (ZeroMQ direct) ------------
async def test_verifier_kill_fails_over_losslessly(
    crew: Fleet, rig: Rig, target, draft_model, references
) -> None:
    if rig.path != "zmq":
        pytest.skip("failover between verifier endpoints is the ZeroMQ direct path's")
    await crew.start_verifier(target, FP, "v1")  # first endpoint of every device
    await crew.start_verifier(target, FP, "v2")
    watch = await crew.bus("device", "watch")  # also on v1: sees its verdicts
    verdicts = await watch.subscribe(rig.topics.all_sessions("verdict"))
    v1_status = await watch.subscribe(rig.topics.verifier_status("v1"))
    node = await crew.start_node(
        "dev-1", TinyTokenizer(), FP, lambda: HFDrafter(draft_model), _session(rto_initial=0.5)
    )
    run = asyncio.gather(*(node.generate_ids(p, session_id=f"f{i}") for i, p in enumerate(PROMPTS)))
    await verdicts.get(60)  # v1 is serving the sessions
    assert not run.done()
    await crew.kill_verifier("v1")
    outs = await asyncio.wait_for(run, 120)
    assert [list(o.tokens) for o in outs] == references
    bus = node.bus
    assert isinstance(bus, ZmqBus)
    assert bus.failovers >= 1 and bus.server_id.endswith("v2")
    # liveness without a broker: v1's will (handed over in the handshake) reached the device
    statuses = [m.payload for m in await drain(v1_status)]
    assert verifier_will("v1") in statuses
