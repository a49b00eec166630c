"""Drafters on the real SmolLM2-135M: agreement of quantized copies with the full model.

The full model (the GGUF dequantized to float32) is the target; its greedy
continuations of a few chat prompts are the reference.  Agreement is
teacher-forced: at every generated position, does the drafter's argmax given
the target's own prefix equal the target's token?
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from middleware.models.loading import LoadedModel, load_causal_lm
from middleware.nodes.drafters.base import Drafter
from middleware.nodes.drafters.hf import HFDrafter
from middleware.nodes.drafters.policy import DraftPolicy, PolicyConfig
from middleware.nodes.drafters.quantized import QuantizedDrafter, quantize_model
from middleware.protocol.session import SamplingParams
from middleware.sampling import coupled_choice, process_logits

pytestmark = pytest.mark.model

PROMPTS = (
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Explain photosynthesis in simple terms.",
)
NEW_TOKENS = 40
LOOP_CASES = 2  # speculative loops run one forward per draft token: keep them short
GREEDY = SamplingParams()

Case = tuple[list[int], list[int]]  # (prompt ids, target greedy continuation)


@pytest.fixture(scope="module")
def smollm2() -> LoadedModel:
    return load_causal_lm("smollm2", "cpu", "float32")


@pytest.fixture(scope="module")
def cases(smollm2: LoadedModel) -> list[Case]:
    out = []
    tok = smollm2.tokenizer
    for text in PROMPTS:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": text}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
        with torch.inference_mode():
            gen = smollm2.model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        out.append((ids[0].tolist(), gen[0, ids.shape[1] :].tolist()))
    return out


def teacher_forced_preds(model: torch.nn.Module, case: Case) -> list[int]:
    """The model's argmax at each generated position given the target's prefix."""
    prompt, gen = case
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + gen]), use_cache=False).logits[0]  # [T, V]
    return logits[len(prompt) - 1 : -1].argmax(-1).tolist()


def agreement(model: torch.nn.Module, cases: list[Case]) -> float:
    hits = total = 0
    for case in cases:
        preds = teacher_forced_preds(model, case)
        hits += sum(p == t for p, t in zip(preds, case[1], strict=True))
        total += len(case[1])
    return hits / total


def speculate(
    drafter: Drafter,
    prompt: Sequence[int],
    target: Sequence[int],
    k: int = 6,
    sampling: SamplingParams = GREEDY,
) -> list[tuple[int, tuple[int, ...], int]]:
    """Greedy speculative decoding against a known target continuation.

    Returns (committed length, proposal, accepted) per round; each round
    commits the accepted drafts plus the target's next token.
    """
    drafter.start(prompt, sampling)
    committed: list[int] = []
    rounds = []
    while len(committed) < len(target):
        p = drafter.propose(committed, [], k, len(committed))
        rest = target[len(committed) :]
        n = 0
        while n < min(len(p.tokens), len(rest)) and p.tokens[n] == rest[n]:
            n += 1
        rounds.append((len(committed), p.tokens, n))
        drafter.observe(min(len(p.tokens), len(rest)), n)
        committed.extend(rest[: n + 1])
    assert committed == list(target)
    return rounds


def fixed_policy() -> DraftPolicy:
    return DraftPolicy(PolicyConfig(threshold=0.0, max_len=6, adaptive=False))


def test_quantized_copies_agree_less_with_fewer_bits(
    smollm2: LoadedModel, cases: list[Case]
) -> None:
    full = agreement(smollm2.model, cases)
    rates = {}
    for bits in (4, 3):
        q = quantize_model(smollm2.model, bits)
        rates[bits] = agreement(q, cases)
        del q
    print(
        f"\nteacher-forced greedy agreement with the full model "
        f"({len(cases)} prompts x {NEW_TOKENS} tokens): full={full:.3f} "
        f"4-bit={rates[4]:.3f} 3-bit={rates[3]:.3f}"
    )
    assert full == 1.0
    assert rates[4] > rates[3]
    assert rates[4] > 0.4


def test_full_model_drafter_is_always_accepted(smollm2: LoadedModel, cases: list[Case]) -> None:
    d = HFDrafter(smollm2.model, smollm2.tokenizer, fixed_policy(), name="hf:smollm2")
    for prompt, target in cases[:LOOP_CASES]:
        rounds = speculate(d, prompt, target)
        assert all(acc == min(len(p), len(target) - base) for base, p, acc in rounds)
    assert d.stats.acceptance_rate == 1.0
    print(
        f"\nfull-model drafter: {d.stats.accepted}/{d.stats.proposed} accepted, "
        f"{d.stats.mean_accepted:.2f} per round"
    )


def test_quantized_drafter_kv_reuse_matches_teacher_forcing(
    smollm2: LoadedModel, cases: list[Case]
) -> None:
    """With rollbacks on every rejection, each draft token that follows the target's
    prefix equals the quantized model's from-scratch prediction there."""
    d = QuantizedDrafter(smollm2.model, 4, smollm2.tokenizer, fixed_policy())
    mismatches = 0
    for case in cases[:LOOP_CASES]:
        preds = teacher_forced_preds(d.model, case)
        for base, tokens, acc in speculate(d, *case):
            for j in range(min(acc + 1, len(tokens), len(preds) - base)):
                mismatches += tokens[j] != preds[base + j]
    print(
        f"\n4-bit drafter in the loop: acceptance {d.stats.acceptance_rate:.3f}, "
        f"{d.stats.mean_accepted:.2f} accepted per round, "
        f"{d.fed_tokens} tokens fed in {d.forwards} forwards"
    )
    assert mismatches == 0


def test_full_model_drafter_reproduces_coupled_sampling(
    smollm2: LoadedModel, cases: list[Case]
) -> None:
    """Target-only coupled sampling, token by token from scratch, vs the drafter's picks."""
    params = SamplingParams(mode="coupled", seed=2024, temperature=0.9, top_p=0.95)
    prompt = cases[0][0]
    target: list[int] = []
    with torch.inference_mode():
        for pos in range(16):
            logits = smollm2.model(torch.tensor([prompt + target]), use_cache=False).logits[0, -1]
            target.append(coupled_choice(process_logits(logits, params), params.seed, pos))
    d = HFDrafter(smollm2.model, smollm2.tokenizer, fixed_policy())
    rounds = speculate(d, prompt, target, sampling=params)
    assert all(acc == min(len(p), len(target) - base) for base, p, acc in rounds)
    assert target != cases[0][1][:16]  # sampling, not greedy, was reproduced
