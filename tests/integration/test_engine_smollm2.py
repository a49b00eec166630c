"""The target engine on the real SmolLM2-135M-Instruct: batching numerics and lossless decoding.

Speculative rounds run over the engine with 4 sessions per batch (3 chat
prompts, the first one twice with a different drafter) and must reproduce
``model.generate(do_sample=False)`` and :func:`reference_sample` token for
token, including after LRU eviction and rebuild.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import torch

from middleware.models.loading import LoadedModel, load_causal_lm
from middleware.protocol.session import SamplingParams
from middleware.sampling import process_logits
from middleware.verifier.acceptance import coupled_accept, greedy_accept
from middleware.verifier.engine import TargetEngine, VerifyItem
from middleware.verifier.reference import reference_greedy, reference_sample

pytestmark = pytest.mark.model

MAX_NEW = 48
COUPLED_NEW = 32
QUESTIONS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
)


@pytest.fixture(scope="session")
def smollm2() -> Iterator[LoadedModel]:
    yield load_causal_lm("smollm2")


@pytest.fixture(scope="session")
def prompts(smollm2: LoadedModel) -> list[list[int]]:
    tok = smollm2.tokenizer
    return [
        list(
            tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)[
                "input_ids"
            ]
        )
        for q in QUESTIONS
    ]


@pytest.fixture(scope="session")
def stop_ids(smollm2: LoadedModel) -> frozenset[int]:
    return frozenset({int(smollm2.tokenizer.eos_token_id)})


@pytest.fixture(scope="session")
def generated(smollm2: LoadedModel, prompts: list[list[int]]) -> list[list[int]]:
    """``model.generate(do_sample=False)`` continuations: the ground truth."""
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        seq = smollm2.model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW
        )
        out.append(seq[0, len(p) :].tolist())
    return out


def test_loaded_model_and_fingerprint(smollm2: LoadedModel) -> None:
    assert smollm2.name == "SmolLM2-135M-Instruct"
    assert smollm2.model.config.vocab_size == 49152
    assert not smollm2.model.training
    # Pinned: computed in a separate process; a change means devices and
    # verifiers built with another tokenizer reading would refuse each other.
    assert smollm2.fingerprint == "4ee59ed15ede7f8d"


def test_reference_greedy_equals_generate(
    smollm2: LoadedModel,
    prompts: list[list[int]],
    stop_ids: frozenset[int],
    generated: list[list[int]],
) -> None:
    # One prompt: the decoder is checked on more prompts with the tiny model.
    assert reference_greedy(smollm2.model, prompts[2], MAX_NEW, stop_ids) == generated[2]


def test_batched_verify_logits_match_unbatched(
    smollm2: LoadedModel, prompts: list[list[int]], generated: list[list[int]]
) -> None:
    """Four sessions of different cache and draft lengths in one batch vs each alone.

    Also compared with step-by-step decoding (what ``generate`` computes).
    """
    from transformers import DynamicCache

    model = smollm2.model
    rnd = random.Random(3)
    items = []
    for i, (p, g) in enumerate(
        [*zip(prompts, generated, strict=False), (prompts[0], generated[0])]
    ):
        committed = g[: 5 + 7 * i]
        draft = [
            *g[len(committed) : len(committed) + 1 + i],
            rnd.randrange(49152),
        ]  # last one wrong
        items.append(VerifyItem(f"s{i}", p + committed, draft))
    batched = TargetEngine(model).verify_batch(items)
    worst_alone = worst_steps = 0.0
    for item, lg in zip(items, batched, strict=True):
        alone = TargetEngine(model).verify_batch([item])[0]
        rows = []
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            out = model(
                torch.tensor([list(item.context)]),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            rows.append(out.logits[0, -1])
            for t in item.draft:
                out = model(torch.tensor([[t]]), past_key_values=cache, use_cache=True)
                rows.append(out.logits[0, -1])
        steps = torch.stack(rows).float()
        assert torch.equal(lg.argmax(-1), alone.argmax(-1))
        assert torch.equal(lg.argmax(-1), steps.argmax(-1))
        worst_alone = max(worst_alone, float((lg - alone).abs().max()))
        worst_steps = max(worst_steps, float((lg - steps).abs().max()))
        # float32 rounding only: measured ~2e-6 of the largest logit.
        assert max(worst_alone, worst_steps) <= 1e-5 * float(steps.abs().max())
    print(
        f"\nSmolLM2: max|batched - alone| = {worst_alone:.3g}, "
        f"max|batched - step-by-step| = {worst_steps:.3g}, "
        f"max|logit| = {float(steps.abs().max()):.3g}"
    )


@dataclass
class Sess:
    key: str
    prompt: list[int]
    target: list[int]
    corrupt: float  # how often the drafter proposes a wrong token
    generated: list[int] = field(default_factory=list)
    done: bool = False


def run_rounds(
    engine: TargetEngine,
    sessions: list[Sess],
    params: SamplingParams,
    stop_ids: frozenset[int],
    max_new: int = MAX_NEW,
) -> None:
    """Verifier rounds with all live sessions in one batch; a peeking, corrupting drafter."""
    rnd = random.Random(7)
    while live := [s for s in sessions if not s.done]:
        drafts = []
        for s in live:
            pos = len(s.generated)
            truth = s.target[pos : pos + rnd.randint(1, 6)]
            drafts.append([t if rnd.random() >= s.corrupt else rnd.randrange(49152) for t in truth])
        logits = engine.verify_batch(
            [
                VerifyItem(s.key, s.prompt + s.generated, d)
                for s, d in zip(live, drafts, strict=False)
            ]
        )
        for s, d, lg in zip(live, drafts, logits, strict=True):
            if params.mode == "greedy":
                n, nxt = greedy_accept(d, lg.argmax(-1).tolist())
            else:
                lp = process_logits(lg, params)
                n, nxt = coupled_accept(d, lp, params.seed, len(s.generated))
            for t in [*d[:n], nxt]:
                s.generated.append(t)
                if t in stop_ids or len(s.generated) == max_new:
                    s.done = True
                    break
            if s.done:
                engine.close(s.key)
            else:
                engine.commit(s.key, len(s.prompt) + len(s.generated))


def make_sessions(prompts: list[list[int]], targets: list[list[int]]) -> list[Sess]:
    sessions = [
        Sess(f"s{i}", p, t, corrupt=0.2)
        for i, (p, t) in enumerate(zip(prompts, targets, strict=False))
    ]
    sessions.append(Sess("s3", prompts[0], targets[0], corrupt=0.5))
    return sessions


def test_speculative_greedy_equals_generate(
    smollm2: LoadedModel,
    prompts: list[list[int]],
    stop_ids: frozenset[int],
    generated: list[list[int]],
) -> None:
    # A budget below the four sessions' contexts forces evictions and rebuilds.
    engine = TargetEngine(smollm2.model, memory_budget_tokens=120)
    sessions = make_sessions(prompts, generated)
    run_rounds(engine, sessions, SamplingParams(), stop_ids)
    stats = engine.stats()
    print(f"\ngreedy: {stats}")
    assert [s.generated for s in sessions] == [*generated, generated[0]]
    assert stats.evictions > 0


def test_speculative_coupled_equals_reference_sample(
    smollm2: LoadedModel, prompts: list[list[int]], stop_ids: frozenset[int]
) -> None:
    params = SamplingParams(mode="coupled", seed=1234, temperature=0.8, top_p=0.95)
    refs = [reference_sample(smollm2.model, p, COUPLED_NEW, stop_ids, params) for p in prompts]
    engine = TargetEngine(smollm2.model)
    sessions = make_sessions(prompts, refs)
    run_rounds(engine, sessions, params, stop_ids, COUPLED_NEW)
    print(f"\ncoupled: {engine.stats()}")
    assert [s.generated for s in sessions] == [*refs, refs[0]]
