"""The whole system over a real Mosquitto with the real SmolLM2 target: lossless and batched.

Committed output is compared token for token with target-only decoding.
"""

from __future__ import annotations

import pytest

from middleware.nodes.drafters import make_drafter
from middleware.nodes.drafters.hf import HFDrafter
from middleware.nodes.service import encode_prompt, stop_ids_of
from middleware.nodes.session import SessionConfig
from middleware.protocol import SamplingParams
from middleware.verifier.reference import reference_greedy, reference_sample
from tests.integration.harness import Device, run_system

pytestmark = [pytest.mark.integration, pytest.mark.model]

PROMPTS = [
    "What is MQTT?",
    "Name three planets of the solar system.",
    "Write one sentence about the sea.",
    "How do I boil an egg?",
    "What is 12 times 12?",
    "Give a short definition of latency.",
    "Why is the sky blue?",
    "Say hello in French.",
]
MAX_NEW = 32


@pytest.fixture(scope="module")
def prompt_ids(smollm2):
    return [encode_prompt(smollm2.tokenizer, p) for p in PROMPTS]


@pytest.fixture(scope="module")
def references(smollm2, prompt_ids):
    stops = stop_ids_of(smollm2.tokenizer)
    return [reference_greedy(smollm2.model, ids, MAX_NEW, stops) for ids in prompt_ids]


def test_reference_greedy_equals_generate(smollm2, prompt_ids, references) -> None:
    import torch

    ids = prompt_ids[0]
    out = smollm2.model.generate(
        torch.tensor([ids]),
        max_new_tokens=MAX_NEW,
        do_sample=False,
        eos_token_id=list(stop_ids_of(smollm2.tokenizer)),
    )
    assert out[0, len(ids) :].tolist() == references[0]


async def test_greedy_lossless_heterogeneous_fleet_shares_batches(
    mosquitto, unique_prefix, smollm2, quant4, prompt_ids, references
) -> None:
    tok = smollm2.tokenizer
    devices = [
        Device("pi-4bit", lambda: HFDrafter(quant4, tok)),
        Device("jetson-full", lambda: HFDrafter(smollm2.model, tok)),
        Device("esp-ngram", lambda: make_drafter("ngram")),
    ]
    jobs = [(devices[i % 3].device_id, ids) for i, ids in enumerate(prompt_ids)]
    session = SessionConfig(max_new_tokens=MAX_NEW, stop_ids=stop_ids_of(tok))
    run = await run_system(
        mosquitto.host, mosquitto.port, unique_prefix, smollm2, devices, jobs, session
    )
    for i, o in enumerate(run.outcomes):
        assert list(o.tokens) == references[i], f"prompt {i} ({jobs[i][0]}) differs"
        assert o.text == tok.decode(references[i], skip_special_tokens=True)
    m = run.verifier.metrics
    print(
        f"\nbatch sizes: mean {m.batch_size.mean:.2f} max {max(m.batch_size._recent)}; "
        f"forwards {m.forwards.total():.0f} for {m.committed.total():.0f} tokens; "
        f"acceptance {m.accepted.total() / max(1, m.proposed.total()):.2f}"
    )
    for o in run.outcomes:
        print(
            o.session_id,
            {
                k: round(v, 2)
                for k, v in o.stats.items()
                if k in ("acceptance_rate", "mean_accepted", "tokens_per_s")
            },
        )
    assert max(m.batch_size._recent) >= 2  # drafts of different sessions really shared forwards
    assert m.forwards.total() < m.committed.total()
    full = [o for o, (dev, _) in zip(run.outcomes, jobs, strict=True) if dev == "jetson-full"]
    assert all(o.stats["acceptance_rate"] > 0.9 for o in full)  # drafter == target: near 100%


async def test_coupled_sampling_lossless(
    mosquitto, unique_prefix, smollm2, quant4, prompt_ids
) -> None:
    tok = smollm2.tokenizer
    sp = SamplingParams(mode="coupled", seed=42, temperature=0.7, top_k=50, top_p=0.95)
    stops = stop_ids_of(tok)
    devices = [Device("pi-4bit", lambda: HFDrafter(quant4, tok))]
    jobs = [("pi-4bit", ids) for ids in prompt_ids[:3]]
    session = SessionConfig(max_new_tokens=MAX_NEW, stop_ids=stops, sampling=sp)
    run = await run_system(
        mosquitto.host, mosquitto.port, unique_prefix, smollm2, devices, jobs, session
    )
    for (_, ids), o in zip(jobs, run.outcomes, strict=True):
        assert list(o.tokens) == reference_sample(smollm2.model, ids, MAX_NEW, stops, sp)
    assert run.verifier.metrics.accepted.total() > 0
