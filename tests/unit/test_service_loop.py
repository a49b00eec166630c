"""Verifier and device services end to end over the in-memory bus with a tiny random model.

The committed tokens must equal target-only decoding, whatever the drafter
proposes, with several sessions sharing batches.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from middleware.nodes.drafters import make_drafter
from middleware.nodes.drafters.hf import HFDrafter
from middleware.nodes.service import NodeConfig, NodeService
from middleware.nodes.session import SessionConfig
from middleware.protocol import SamplingParams
from middleware.verifier.acceptance import RelaxedAcceptance
from middleware.verifier.batcher import BatchConfig
from middleware.verifier.control import Controller
from middleware.verifier.engine import TargetEngine
from middleware.verifier.reference import reference_greedy, reference_sample
from middleware.verifier.service import VerifierConfig, VerifierService
from tests.unit.membus import InMemoryBroker, InMemoryBus
from tests.unit.tiny import EOS, TinyTokenizer, noisy_copy, tiny_llama

PROMPTS = [[1, 5, 9, 13], [1, 7, 7, 7, 3, 22, 40], [1, 30], [1, 11, 12, 13, 14, 15, 16, 17, 18]]


@pytest.fixture(scope="module")
def target() -> torch.nn.Module:
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def draft_model() -> torch.nn.Module:
    """The target with noisy weights: it agrees often, not always (partial acceptance)."""
    return noisy_copy(seed=0)


async def _run(
    target,
    factory,
    sampling: SamplingParams,
    prompts,
    max_new: int = 24,
    memory_budget: int = 65536,
    relaxed: RelaxedAcceptance | None = None,
    texts: list | None = None,
    batch: BatchConfig | None = None,
):
    broker = InMemoryBroker()
    engine = TargetEngine(target, memory_budget_tokens=memory_budget)
    vcfg = VerifierConfig(verifier_id="v1", relaxed=relaxed, batch=batch or BatchConfig())
    async with InMemoryBus(broker, "v") as vbus, InMemoryBus(broker, "d") as dbus:
        verifier = VerifierService(vbus, engine, tokenizer_fingerprint="tiny", config=vcfg)
        node = NodeService(
            dbus,
            tokenizer=TinyTokenizer(),
            tokenizer_fp="tiny",
            drafter_factory=factory,
            drafter_name="test",
            config=NodeConfig(
                device_id="dev-1",
                max_concurrent=len(prompts),
                session=SessionConfig(max_new_tokens=max_new, sampling=sampling, stop_ids=(EOS,)),
            ),
        )
        if texts is not None:
            node.on_text = texts.append
        async with asyncio.TaskGroup() as tg:
            vt = tg.create_task(verifier.run())
            nt = tg.create_task(node.run())
            await verifier.ready.wait()
            await node.ready.wait()
            outs = await asyncio.wait_for(
                asyncio.gather(
                    *(node.generate_ids(p, session_id=f"s{i}") for i, p in enumerate(prompts))
                ),
                120,
            )
            vt.cancel()
            nt.cancel()
    return outs, verifier


@pytest.mark.parametrize("kind", ["ngram", "hf"])
async def test_greedy_equals_target_only(target, draft_model, kind: str) -> None:
    factory = (
        (lambda: make_drafter("ngram")) if kind == "ngram" else (lambda: HFDrafter(draft_model))
    )
    outs, verifier = await _run(target, factory, SamplingParams(), PROMPTS)
    for p, o in zip(PROMPTS, outs, strict=True):
        assert list(o.tokens) == reference_greedy(target, p, 24, (EOS,))
    m = verifier.metrics
    assert m.forwards.total() < m.committed.total()  # speculation saved forward passes...
    assert m.batch_size.count > 0
    if kind == "hf":
        assert 0 < m.accepted.total() < m.proposed.total()  # partly accepted, partly corrected


async def test_sessions_share_batches(target, draft_model) -> None:
    outs, verifier = await _run(target, lambda: HFDrafter(draft_model), SamplingParams(), PROMPTS)
    assert max(verifier.metrics.batch_size._recent) >= 2
    assert len(outs) == len(PROMPTS)


async def test_coupled_sampling_equals_target_only_sampling(target, draft_model) -> None:
    sp = SamplingParams(mode="coupled", seed=1234, temperature=0.8, top_k=20)
    outs, _ = await _run(target, lambda: HFDrafter(draft_model), sp, PROMPTS[:3])
    for p, o in zip(PROMPTS[:3], outs, strict=True):
        assert list(o.tokens) == reference_sample(target, p, 24, (EOS,), sp)


async def test_eviction_rebuilds_sessions_by_prefill(target, draft_model) -> None:
    outs, verifier = await _run(
        target, lambda: HFDrafter(draft_model), SamplingParams(), PROMPTS, memory_budget=24
    )
    assert verifier.engine.evictions > 0
    for p, o in zip(PROMPTS, outs, strict=True):
        assert list(o.tokens) == reference_greedy(target, p, 24, (EOS,))


async def test_relaxed_mode_is_lossy_and_says_so_everywhere(target, draft_model) -> None:
    """Opt-in relaxed acceptance: more tokens per round, and every verdict, text chunk and
    result of the session is marked lossy; the lossless default is never marked."""
    texts: list = []
    rule = RelaxedAcceptance(ratio=0.05, confidence=1.0)  # very loose: deviations are certain
    outs, verifier = await _run(
        target, lambda: HFDrafter(draft_model), SamplingParams(), PROMPTS, relaxed=rule, texts=texts
    )
    m = verifier.metrics
    assert m.lossy.get() == 1.0 and m.relaxed.total() > 0
    refs = [reference_greedy(target, p, 24, (EOS,)) for p in PROMPTS]
    assert any(list(o.tokens) != r for o, r in zip(outs, refs, strict=True))  # it is lossy
    assert m.answers.get(kind="accept") > 0
    assert texts and all(t.lossy for t in texts)
    assert verifier.status().stats["lossy_mode"] == 1.0

    plain: list = []
    outs, verifier = await _run(
        target, lambda: HFDrafter(draft_model), SamplingParams(), PROMPTS, texts=plain
    )
    assert [list(o.tokens) for o in outs] == refs
    assert plain and not any(t.lossy for t in plain)
    assert verifier.metrics.lossy.get() == 0.0 and verifier.metrics.relaxed.total() == 0


async def test_planned_policy_stays_lossless_and_sends_length_hints(target, draft_model) -> None:
    """Speculation control on: batches and draft lengths come from the planner; the output is
    still the target's own, and devices receive (and honour) the planner's hints."""
    hints: list[int] = []
    outs, verifier = await _run(
        target,
        lambda: _Recording(draft_model, hints),
        SamplingParams(),
        PROMPTS,
        batch=BatchConfig(policy="planned", window=0.02),
    )
    for p, o in zip(PROMPTS, outs, strict=True):
        assert list(o.tokens) == reference_greedy(target, p, 24, (EOS,))
    control = verifier.control
    assert isinstance(control, Controller) and control.plans > 0
    assert hints and all(1 <= h <= 16 for h in hints)
    assert len(control.model.forward) > 0  # forward passes observed
    # Finished sessions are forgotten; what they taught about their device stays.
    assert not any(o.session_id in control.model for o in outs)
    assert len(control.model) == 1 and "dev-1" in control.model
    assert 1 <= control.first_hint("dev-1") <= 16  # its next session starts from its last hint


class _Recording(HFDrafter):
    """An HF drafter that records the verifier's hints."""

    def __init__(self, model, hints: list[int]) -> None:
        super().__init__(model)
        self._hints_seen = hints

    def hint(self, next_len: int) -> None:
        self._hints_seen.append(next_len)
        super().hint(next_len)
