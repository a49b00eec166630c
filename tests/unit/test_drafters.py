"""Drafters: policy, n-gram lookup, KV-cache reuse, token choice per mode, quantization."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from middleware.errors import ConfigError
from middleware.models.loading import LoadedModel
from middleware.nodes.drafters import DrafterSpec, make_drafter
from middleware.nodes.drafters.base import DraftStats, Proposal, common_prefix
from middleware.nodes.drafters.hf import HFDrafter, sparse_topk
from middleware.nodes.drafters.ngram import NGramDrafter, NGramIndex
from middleware.nodes.drafters.policy import DraftPolicy, PolicyConfig, confidence_from_probs
from middleware.nodes.drafters.quantized import QuantizedDrafter, quantize_model, quantize_tensor
from middleware.protocol.session import SamplingParams
from middleware.sampling import coupled_choice, process_logits

PROMPT = [1, 5, 9, 12, 7, 3, 44, 2]
GREEDY = SamplingParams()
COUPLED = SamplingParams(mode="coupled", seed=1234, temperature=0.8, top_k=40)
REJECTION = SamplingParams(mode="rejection", seed=99, temperature=1.0)


def fixed(max_len: int = 6) -> DraftPolicy:
    """A policy that always drafts ``max_len`` tokens (threshold 0, no adaptation)."""
    return DraftPolicy(PolicyConfig(threshold=0.0, min_len=1, max_len=max_len, adaptive=False))


@pytest.fixture(scope="module")
def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    # A large init range makes the random model's distributions peaked, so
    # argmax ties (which float reordering could flip) do not occur.
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.5,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval()


def full_logits(model: LlamaForCausalLM, ids: list[int]) -> torch.Tensor:
    """Next-token logits [V] after ``ids``, computed from scratch without a cache."""
    with torch.inference_mode():
        return model(torch.tensor([ids]), use_cache=False).logits[0, -1].float()


# --- policy -------------------------------------------------------------------------------


def test_policy_stops_below_threshold_only_after_min_len() -> None:
    pol = DraftPolicy(PolicyConfig(threshold=0.5, min_len=2, max_len=6, adaptive=False))
    assert not pol.should_stop(0, 0.1)  # below threshold but min_len not reached
    assert pol.should_stop(1, 0.1)
    assert not pol.should_stop(1, 0.9)
    assert not pol.should_stop(4, 0.9)
    assert pol.should_stop(5, 0.9)  # max_len reached


def test_policy_limit_and_hint() -> None:
    pol = DraftPolicy(PolicyConfig(max_len=8))
    assert pol.limit(100) == 8
    assert pol.limit(3) == 3
    assert pol.limit(0) == 0
    pol.hint(2)
    assert pol.limit(100) == 2
    assert pol.should_stop(1, 1.0)
    pol.hint(0)
    assert pol.limit(100) == 8


def test_policy_adapts_within_bounds() -> None:
    cfg = PolicyConfig(
        threshold=0.4,
        min_len=1,
        max_len=4,
        max_len_cap=6,
        threshold_min=0.2,
        threshold_max=0.6,
        threshold_step=0.1,
        ema_alpha=0.5,
    )
    pol = DraftPolicy(cfg)
    for _ in range(10):
        pol.observe(4, 4)
    assert pol.max_len == 6 and pol.threshold == pytest.approx(0.2)
    assert pol.ema == pytest.approx(1.0)
    for _ in range(20):
        pol.observe(4, 0)
    assert pol.max_len == 1 and pol.threshold == pytest.approx(0.6)
    assert pol.ema is not None and pol.ema < cfg.low
    pol.observe(0, 0)  # an empty round teaches nothing
    assert pol.max_len == 1
    pol.reset()
    assert (pol.max_len, pol.threshold, pol.ema) == (4, 0.4, None)


def test_policy_not_adaptive_keeps_settings() -> None:
    pol = DraftPolicy(PolicyConfig(adaptive=False))
    for _ in range(5):
        pol.observe(8, 0)
    assert (pol.max_len, pol.threshold) == (8, 0.4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"metric": "nope"},
        {"min_len": 0},
        {"min_len": 5, "max_len": 4},
        {"max_len": 20, "max_len_cap": 16},
        {"threshold": 1.5},
        {"ema_alpha": 0.0},
        {"low": 0.9, "high": 0.5},
    ],
)
def test_policy_config_rejects_bad_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        PolicyConfig(**kwargs)  # type: ignore[arg-type]


def test_confidence_metrics() -> None:
    probs = [0.7, 0.2, 0.1]
    assert confidence_from_probs(probs, "max_prob") == pytest.approx(0.7)
    assert confidence_from_probs(probs, "margin") == pytest.approx(0.5)
    h = -sum(p * math.log(p) for p in probs)
    assert confidence_from_probs(probs, "entropy") == pytest.approx(math.exp(-h))
    assert confidence_from_probs([1.0], "entropy") == pytest.approx(1.0)
    assert confidence_from_probs([0.25] * 4, "entropy") == pytest.approx(0.25)
    assert confidence_from_probs([], "max_prob") == 0.0


def test_stats_and_observe() -> None:
    d = NGramDrafter(3, DraftPolicy(PolicyConfig(adaptive=False)))
    d.observe(4, 3)
    d.observe(2, 0)
    d.observe(3, 9)  # clamped: cannot accept more than proposed
    assert (d.stats.rounds, d.stats.proposed, d.stats.accepted) == (3, 9, 6)
    assert d.stats.acceptance_rate == pytest.approx(6 / 9)
    assert d.stats.mean_accepted == pytest.approx(2.0)
    assert DraftStats().acceptance_rate == 0.0


def test_proposal_validates() -> None:
    with pytest.raises(ValueError):
        Proposal((1, 2), (0.5,))
    assert len(Proposal((1, 2), (0.5, 0.5))) == 2


@given(st.lists(st.integers(0, 3), max_size=8), st.lists(st.integers(0, 3), max_size=8))
def test_common_prefix(a: list[int], b: list[int]) -> None:
    n = common_prefix(a, b)
    assert a[:n] == b[:n]
    assert n == min(len(a), len(b)) or a[n] != b[n]


# --- n-gram ---------------------------------------------------------------------------------


def test_ngram_finds_repeats() -> None:
    d = NGramDrafter(3, fixed(4))
    d.start([10, 11, 12, 13, 14, 99, 10, 11], GREEDY)
    p = d.propose([], [], 8, 0)
    assert p.tokens == (12, 13, 14, 99)
    assert all(0.0 < c <= 1.0 for c in p.confidences)
    assert p.q == ()
    # Committed and speculative tokens are part of the context.
    p = d.propose([12, 13], [14], 8, 3)
    assert p.tokens == (99, 10, 11, 12)


def test_ngram_prefers_longest_and_most_recent_match() -> None:
    d = NGramDrafter(3, fixed(1))
    # "5 6" is followed by 7 once and by 8 later; "4 5 6" only by 7.
    d.start([4, 5, 6, 7, 0, 5, 6, 8, 0, 4, 5, 6], GREEDY)
    assert d.propose([], [], 1, 0).tokens == (7,)
    d.start([4, 5, 6, 7, 0, 5, 6, 8, 0, 9, 5, 6], GREEDY)
    p = d.propose([], [], 1, 0)
    assert p.tokens == (8,)  # the most recent "5 6" continuation
    assert p.confidences[0] == pytest.approx(0.5 * 2 / 3)  # 1 of 2 agree, n = 2 of 3


def test_ngram_rolls_back_with_context() -> None:
    d = NGramDrafter(2, fixed(3), bigram=False)
    d.start([1, 2, 3, 1, 2, 4, 1], GREEDY)
    first = d.propose([], [], 3, 0)
    assert first.tokens == (2, 4, 1)
    fresh = NGramDrafter(2, fixed(3), bigram=False)
    fresh.start([1, 2, 3, 1, 2, 4, 1], GREEDY)
    assert d.propose([2, 3], [], 3, 2) == fresh.propose([2, 3], [], 3, 2)


def test_ngram_nothing_to_propose_and_bigram_fallback() -> None:
    d = NGramDrafter(3, fixed(4), bigram=False)
    d.start([1, 2, 3], GREEDY)
    assert d.propose([], [], 4, 0) == Proposal()
    b = NGramDrafter(3, fixed(1))
    b.start([7, 8, 7, 8, 9], GREEDY)  # teaches the bigram table 8 -> {7: 1, 9: 1}, 9 -> {}
    b.start([5, 8], GREEDY)  # "8" never occurred in this session's context before
    p = b.propose([], [], 1, 0)
    assert p.tokens in ((7,), (9,))
    assert 0.0 < p.confidences[0] < 0.2


def test_ngram_rejection_mode_reports_point_masses() -> None:
    d = NGramDrafter(3, fixed(3))
    d.start([1, 2, 3, 1, 2], REJECTION)
    p = d.propose([], [], 3, 0)
    assert p.tokens and len(p.q) == len(p.tokens)
    assert all(q.ids == (t,) and q.probs == (1.0,) for q, t in zip(p.q, p.tokens, strict=True))


def test_ngram_respects_max_tokens_and_policy_threshold() -> None:
    d = NGramDrafter(
        3, DraftPolicy(PolicyConfig(threshold=0.9, min_len=1, max_len=8, adaptive=False))
    )
    d.start([1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6, 9, 1], GREEDY)
    # Only the 1-gram "1" matches: confidence 1/3, below the threshold, so one token.
    p = d.propose([], [], 8, 0)
    assert p.tokens == (2,) and p.confidences[0] == pytest.approx(1 / 3)
    d.start([1, 2, 3, 4, 5, 6, 1, 2, 3], GREEDY)
    assert len(d.propose([], [], 2, 0).tokens) == 2


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 4), max_size=12), min_size=1, max_size=6))
def test_ngram_index_sync_matches_fresh_build(contexts: list[list[int]]) -> None:
    index = NGramIndex(3)
    for ctx in contexts:
        index.sync(ctx)
        fresh = NGramIndex(3)
        fresh.sync(ctx)
        assert index.tokens == fresh.tokens == ctx
        assert index._ends == fresh._ends


# --- HF drafter -------------------------------------------------------------------------------


def test_hf_kv_reuse_after_rollback_matches_scratch(tiny: LlamaForCausalLM) -> None:
    d = HFDrafter(tiny, policy=fixed(6))
    d.start(PROMPT, GREEDY)
    first = d.propose([], [], 6, 0)
    assert len(first.tokens) == 6
    # The verifier took 2 draft tokens and corrected the 3rd; 1 more is in flight.
    committed = [*first.tokens[:2], (first.tokens[2] + 1) % 128]
    cases = [(committed, [17]), (committed, []), (committed[:1], []), ([], [5, 6])]
    for com, spec in cases:
        got = d.propose(com, spec, 6, len(com) + len(spec))
        scratch = HFDrafter(tiny, policy=fixed(6))
        scratch.start(PROMPT, GREEDY)
        want = scratch.propose(com, spec, 6, len(com) + len(spec))
        assert got.tokens == want.tokens
        assert got.confidences == pytest.approx(want.confidences, abs=1e-5)


def test_hf_reuses_cache_instead_of_refeeding(tiny: LlamaForCausalLM) -> None:
    d = HFDrafter(tiny, policy=fixed(4))
    d.start(PROMPT, GREEDY)
    p = d.propose([], [], 4, 0)
    assert d.fed_tokens == len(PROMPT) + 3  # the last draft token is never fed
    before = d.fed_tokens
    d.propose(list(p.tokens[:2]), [], 4, 2)  # cache already holds prompt + 3 drafts
    # Crop to prompt + 1 draft; feed the 2nd draft token, then 3 new drafts.
    assert d.fed_tokens - before == 1 + 3
    before = d.fed_tokens
    d.propose(list(p.tokens[:2]), [], 4, 2)  # the same context again: only its last token
    assert d.fed_tokens - before == 1 + 3


def test_hf_greedy_matches_scratch_argmax(tiny: LlamaForCausalLM) -> None:
    d = HFDrafter(tiny, policy=fixed(5))
    d.start(PROMPT, GREEDY)
    p = d.propose([3], [4], 5, 2)
    ctx = [*PROMPT, 3, 4]
    for tok in p.tokens:
        assert tok == int(torch.argmax(full_logits(tiny, ctx)))
        ctx.append(tok)


def test_hf_coupled_matches_coupled_choice_on_full_logits(tiny: LlamaForCausalLM) -> None:
    d = HFDrafter(tiny, policy=fixed(6))
    d.start(PROMPT, COUPLED)
    committed, position = [7, 8, 9], 3
    p = d.propose(committed, [], 6, position)
    assert len(p.tokens) == 6 and p.q == ()
    ctx = [*PROMPT, *committed]
    for i, tok in enumerate(p.tokens):
        lp = process_logits(full_logits(tiny, ctx), COUPLED)
        assert tok == coupled_choice(lp, COUPLED.seed, position + i)
        ctx.append(tok)
    # The noise is keyed by position: shifting it changes the picks somewhere.
    other = HFDrafter(tiny, policy=fixed(6))
    other.start(PROMPT, COUPLED)
    assert other.propose(committed, [], 6, position + 100).tokens != p.tokens


def test_hf_rejection_reports_exact_sparse_q(tiny: LlamaForCausalLM) -> None:
    d = HFDrafter(tiny, policy=fixed(4))
    d.start(PROMPT, REJECTION)
    p = d.propose([], [], 4, 0)
    assert len(p.q) == len(p.tokens) == 4
    ctx = list(PROMPT)
    for tok, q in zip(p.tokens, p.q, strict=True):
        assert tok in q.ids and len(q.ids) == 16
        assert sum(q.probs) == pytest.approx(1.0, abs=1e-5)
        lp = process_logits(full_logits(tiny, ctx), REJECTION)
        ids, probs = sparse_topk(lp, 16)
        assert q.ids == tuple(int(i) for i in ids)
        assert q.probs == pytest.approx([float(x) for x in probs], abs=1e-5)
        ctx.append(tok)
    again = HFDrafter(tiny, policy=fixed(4))
    again.start(PROMPT, REJECTION)
    assert again.propose([], [], 4, 0) == p  # seeded by (seed, position): reproducible


def test_hf_rejection_samples_follow_q(tiny: LlamaForCausalLM) -> None:
    d = HFDrafter(tiny, policy=fixed(1))
    counts: dict[int, int] = {}
    q = None
    trials = 600
    for seed in range(trials):
        d.start(PROMPT, SamplingParams(mode="rejection", seed=seed, temperature=2.0))
        p = d.propose([], [], 1, 0)
        q = p.q[0]
        counts[p.tokens[0]] = counts.get(p.tokens[0], 0) + 1
    assert q is not None
    for tok, prob in zip(q.ids, q.probs, strict=True):
        sigma = math.sqrt(trials * prob * (1 - prob))
        assert abs(counts.get(tok, 0) - trials * prob) <= 4.5 * sigma + 1


def test_hf_top_k_sampling_never_drafts_filtered_tokens(tiny: LlamaForCausalLM) -> None:
    params = SamplingParams(mode="rejection", seed=5, temperature=1.0, top_k=3)
    d = HFDrafter(tiny, policy=fixed(4))
    d.start(PROMPT, params)
    p = d.propose([], [], 4, 0)
    assert all(len(q.ids) == 3 for q in p.q)


def test_hf_policy_threshold_stops_early(tiny: LlamaForCausalLM) -> None:
    d = HFDrafter(
        tiny,
        policy=DraftPolicy(
            PolicyConfig(threshold=1.0, min_len=2, max_len=8, threshold_max=1.0, adaptive=False)
        ),
    )
    d.start(PROMPT, GREEDY)
    assert len(d.propose([], [], 8, 0).tokens) == 2  # nothing is certain: stop at min_len
    d.hint(1)
    assert len(d.propose([], [], 8, 0).tokens) == 1
    assert d.propose([], [], 0, 0) == Proposal()


def test_hf_respects_max_context(tiny: LlamaForCausalLM) -> None:
    d = HFDrafter(tiny, policy=fixed(8))
    d.start(list(range(1, 100)) * 2 + [5] * 55, GREEDY)  # 253 of 256 positions used
    assert len(d.propose([], [], 8, 0).tokens) == 3


# --- quantization -------------------------------------------------------------------------------


def test_quantization_error_decreases_with_bits() -> None:
    torch.manual_seed(1)
    w = torch.randn(64, 100)  # 100 is not a multiple of the group size: exercises padding
    for symmetric in (True, False):
        errors = [
            float((quantize_tensor(w, b, 32, symmetric=symmetric) - w).pow(2).mean())
            for b in (2, 3, 4, 8)
        ]
        assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 100


def test_quantize_tensor_levels_per_group() -> None:
    torch.manual_seed(2)
    w = torch.randn(4, 64)
    q = quantize_tensor(w, 3, 32, symmetric=False)
    for row in q.reshape(-1, 32):
        assert len(torch.unique(row)) <= 8
    assert q.shape == w.shape and q.dtype == torch.float32


def test_quantize_model_copies_and_keeps_untied_head(tiny: LlamaForCausalLM) -> None:
    original = {k: v.clone() for k, v in tiny.state_dict().items()}
    q = quantize_model(tiny, 4)
    for k, v in tiny.state_dict().items():
        assert torch.equal(v, original[k])  # the base model is untouched
    qs = q.state_dict()
    assert torch.equal(qs["lm_head.weight"], original["lm_head.weight"])
    assert torch.equal(qs["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    w = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(qs[w], original[w])
    assert torch.equal(qs[w], quantize_tensor(original[w], 4, 32))


def test_quantize_model_tied_head_follows_embeddings() -> None:
    torch.manual_seed(3)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    emb = model.get_input_embeddings().weight.detach().clone()
    keep = quantize_model(model, 4)
    assert torch.equal(keep.get_output_embeddings().weight, emb)
    both = quantize_model(model, 4, embeddings=True)
    assert both.get_output_embeddings().weight is both.get_input_embeddings().weight
    assert torch.equal(both.get_input_embeddings().weight, quantize_tensor(emb, 4, 32))


def test_quantized_drafter_drafts(tiny: LlamaForCausalLM) -> None:
    d = QuantizedDrafter(tiny, 4, policy=fixed(4))
    assert d.model is not tiny and d.bits == 4
    d.start(PROMPT, GREEDY)
    assert len(d.propose([], [], 4, 0).tokens) == 4


# --- specs and factory ------------------------------------------------------------------------


def test_spec_parse_round_trip() -> None:
    for text in ("ngram", "ngram:4", "hf:smollm2", "quant4:smollm2", "quant3:/path/to/dir"):
        assert str(DrafterSpec.parse(text)) == text
    spec = DrafterSpec.parse("quant3:/path/to/dir")
    assert (spec.kind, spec.model, spec.bits) == ("quant", "/path/to/dir", 3)
    for bad in ("", "hf", "hf:", "quant:smollm2", "quant7:smollm2", "magic:x", "ngram:x"):
        with pytest.raises(ConfigError):
            DrafterSpec.parse(bad)


def test_make_drafter_shares_a_loaded_model(tiny: LlamaForCausalLM) -> None:
    base = LoadedModel(model=tiny, tokenizer=None, name="tiny", fingerprint="0")
    models = {"tiny": base}
    hf = make_drafter("hf:tiny", models=models, policy=PolicyConfig(max_len=3))
    assert isinstance(hf, HFDrafter) and hf.model is tiny and hf.name == "hf:tiny"
    assert hf.policy.max_len == 3
    q4 = make_drafter("quant4:tiny", base=base)
    q3 = make_drafter(DrafterSpec("quant", "tiny", bits=3), models=models)
    assert isinstance(q4, QuantizedDrafter) and isinstance(q3, QuantizedDrafter)
    assert q4.model is not tiny and q3.model is not q4.model and q3.bits == 3
    ng = make_drafter("ngram:2")
    assert isinstance(ng, NGramDrafter) and ng.max_n == 2
