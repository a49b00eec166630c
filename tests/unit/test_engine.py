"""TargetEngine, reference decoders and model loading on a tiny random Llama.

The speculative loop below is the verifier's round in miniature (draft ->
verify_batch -> accept -> commit) with a drafter that knows the reference
output and corrupts part of it, so every acceptance length occurs.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from middleware.errors import ModelError
from middleware.models.loading import load_causal_lm, tokenizer_fingerprint
from middleware.protocol.session import SamplingParams
from middleware.sampling import process_logits
from middleware.verifier.acceptance import coupled_accept, greedy_accept
from middleware.verifier.engine import TargetEngine, VerifyItem
from middleware.verifier.reference import reference_greedy, reference_sample

VOCAB = 128


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matmuls are dominated by thread wake-ups; one intra-op thread is ~50x faster."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    # A wide init spreads the logits, so greedy picks are not near-ties of a
    # uniform distribution (which would make any comparison meaningless).
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.3,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


def random_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PROMPTS = [random_tokens(n, seed) for seed, n in enumerate((5, 17, 9, 30, 1, 12))]


def assert_same_logits(got: torch.Tensor, want: torch.Tensor) -> float:
    """Equal argmax, and float32-rounding-level differences; returns max |diff|.

    Measured on this model: about 1e-6 of the largest logit (a few ulps); the
    bound is 1e-5 of it.
    """
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    diff = float((got - want).abs().max())
    assert diff <= 1e-5 * float(want.abs().max())
    return diff


def full_forward_logits(model: LlamaForCausalLM, tokens: list[int], rows: int) -> torch.Tensor:
    """Logits of the last ``rows`` positions from one uncached forward: [rows, V]."""
    with torch.inference_mode():
        return model(torch.tensor([tokens])).logits[0, -rows:].float()


# -- a miniature verifier round ----------------------------------------------------


@dataclass
class Sess:
    key: str
    prompt: list[int]
    target: list[int]  # the reference output the drafter peeks at
    generated: list[int] = field(default_factory=list)
    done: bool = False


def noisy_drafter(s: Sess, rnd: random.Random) -> list[int]:
    """Proposes the true continuation with random corruptions and random length 0..6."""
    pos = len(s.generated)
    draft = []
    for i in range(rnd.randint(0, 6)):
        true = s.target[pos + i] if pos + i < len(s.target) else rnd.randrange(VOCAB)
        draft.append(true if rnd.random() < 0.75 else rnd.randrange(VOCAB))
    return draft


def speculative_decode(
    engine: TargetEngine,
    sessions: list[Sess],
    params: SamplingParams,
    max_new: int,
    stop_ids: frozenset[int],
    seed: int = 0,
) -> int:
    """Run rounds over random subsets of live sessions until all finish; returns the rounds."""
    rnd = random.Random(seed)
    rounds = 0
    while live := [s for s in sessions if not s.done]:
        batch = rnd.sample(live, rnd.randint(1, len(live)))
        drafts = [noisy_drafter(s, rnd) for s in batch]
        items = [
            VerifyItem(s.key, s.prompt + s.generated, d)
            for s, d in zip(batch, drafts, strict=False)
        ]
        logits = engine.verify_batch(items)
        for s, d, lg in zip(batch, drafts, logits, strict=True):
            assert lg.shape == (len(d) + 1, VOCAB) and lg.dtype == torch.float32
            if params.mode == "greedy":
                n, nxt = greedy_accept(d, lg.argmax(-1).tolist())
            else:
                n, nxt = coupled_accept(
                    d, process_logits(lg, params), params.seed, len(s.generated)
                )
            for token in [*d[:n], nxt]:
                s.generated.append(token)
                if token in stop_ids or len(s.generated) == max_new:
                    s.done = True
                    break
            if s.done:
                engine.close(s.key)
            else:
                engine.commit(s.key, len(s.prompt) + len(s.generated))
                assert engine.cached_len(s.key) in (0, len(s.prompt) + len(s.generated) - 1)
        rounds += 1
    return rounds


# -- numerics -----------------------------------------------------------------------


def test_batched_verify_matches_unbatched_and_plain_forward(model: LlamaForCausalLM) -> None:
    drafts = [random_tokens(k, 100 + k) for k in (3, 0, 5, 2, 6, 1)]
    batched = TargetEngine(model).verify_batch(
        [VerifyItem(i, p, d) for i, (p, d) in enumerate(zip(PROMPTS, drafts, strict=False))]
    )
    worst_alone = worst_full = 0.0
    for i, (p, d) in enumerate(zip(PROMPTS, drafts, strict=False)):
        alone = TargetEngine(model).verify_batch([VerifyItem(i, p, d)])[0]
        full = full_forward_logits(model, p + d, len(d) + 1)
        worst_alone = max(worst_alone, assert_same_logits(batched[i], alone))
        worst_full = max(worst_full, assert_same_logits(alone, full))
    print(
        f"tiny llama: max|batched - alone| = {worst_alone:.3g}, "
        f"max|alone - full forward| = {worst_full:.3g}"
    )


def test_verify_matches_step_by_step_decoding_logits(model: LlamaForCausalLM) -> None:
    """The k+1 verify rows equal what generate sees when it feeds those tokens one by one."""
    from transformers import DynamicCache

    prompt, draft = PROMPTS[3], random_tokens(5, 7)
    verify = TargetEngine(model).verify_batch([VerifyItem("s", prompt, draft)])[0]
    rows = []
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        logits = model(torch.tensor([prompt]), past_key_values=cache, use_cache=True).logits
        rows.append(logits[0, -1])
        for t in draft:
            out = model(torch.tensor([[t]]), past_key_values=cache, use_cache=True)
            rows.append(out.logits[0, -1])
    steps = torch.stack(rows).float()
    print(f"tiny llama: max|verify - step-by-step| = {assert_same_logits(verify, steps):.3g}")


def test_small_max_batch_tokens_chunks_prefill_and_splits_batches(model: LlamaForCausalLM) -> None:
    items = [VerifyItem(i, p, random_tokens(4, i)) for i, p in enumerate(PROMPTS)]
    wide = TargetEngine(model).verify_batch(items)
    narrow_engine = TargetEngine(model, max_batch_tokens=8)
    narrow = narrow_engine.verify_batch(items)
    assert narrow_engine.forward_passes > 2
    for a, b in zip(wide, narrow, strict=True):
        assert_same_logits(b, a)


def test_mixed_draft_lengths_split_into_forwards_by_width(model: LlamaForCausalLM) -> None:
    """Rows are grouped by draft length when that saves more padding than a forward costs;
    the logits come back in the items' order, equal to one padded forward's."""
    lengths = (1, 12, 0, 11, 1, 12)
    items = [
        VerifyItem(i, PROMPTS[i % len(PROMPTS)], random_tokens(k, 50 + i))
        for i, k in enumerate(lengths)
    ]
    one = TargetEngine(model, forward_overhead_tokens=10_000)  # never splits
    split = TargetEngine(model, forward_overhead_tokens=4)
    for engine in (one, split):
        engine.verify_batch(items)  # prefill (its forwards batch by prompt length)
        engine.forward_passes = engine.padded_tokens = 0
    a, b = one.verify_batch(items), split.verify_batch(items)  # caches warm: verify only
    assert one.padded_tokens == sum(13 - (k + 1) for k in lengths)
    assert split.padded_tokens < one.padded_tokens / 4
    assert split.forward_passes == 2 and one.forward_passes == 1
    for x, y, k in zip(a, b, lengths, strict=True):
        assert x.shape == y.shape == (k + 1, VOCAB)
        assert_same_logits(y, x)


# -- lossless decoding --------------------------------------------------------------


def generate_greedy(
    model: LlamaForCausalLM, prompt: list[int], max_new: int, eos: int | None
) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new,
        eos_token_id=eos,
        pad_token_id=eos or 0,
    )
    return out[0, len(prompt) :].tolist()


def test_reference_greedy_equals_generate(model: LlamaForCausalLM) -> None:
    for prompt in PROMPTS[:4]:
        ours = reference_greedy(model, prompt, 24)
        assert ours == generate_greedy(model, prompt, 24, None)
        stop = ours[len(ours) // 2]
        stopped = reference_greedy(model, prompt, 24, stop_ids={stop})
        assert stopped == ours[: ours.index(stop) + 1]
        assert stopped == generate_greedy(model, prompt, 24, stop)


def test_reference_sample_follows_coupled_choice_and_is_seeded(model: LlamaForCausalLM) -> None:
    params = SamplingParams(mode="coupled", seed=11, temperature=0.8)
    a = reference_sample(model, PROMPTS[0], 16, (), params)
    assert a == reference_sample(model, PROMPTS[0], 16, (), params)
    assert a != reference_sample(
        model, PROMPTS[0], 16, (), SamplingParams(mode="coupled", seed=12, temperature=0.8)
    )
    assert reference_sample(model, PROMPTS[0], 16, (), SamplingParams()) == reference_greedy(
        model, PROMPTS[0], 16
    )
    # Resuming at a generated position continues the same sequence.
    assert reference_sample(model, PROMPTS[0] + a[:5], 11, (), params, start_position=5) == a[5:]


@pytest.mark.parametrize("budget", [100_000, 40])
def test_speculative_greedy_equals_reference(model: LlamaForCausalLM, budget: int) -> None:
    max_new = 24
    stop = frozenset({reference_greedy(model, PROMPTS[1], max_new)[10]})
    refs = [reference_greedy(model, p, max_new, stop) for p in PROMPTS]
    assert len(refs[1]) <= 11  # at least one session ends early on the stop token
    sessions = [Sess(f"s{i}", p, r) for i, (p, r) in enumerate(zip(PROMPTS, refs, strict=False))]
    engine = TargetEngine(model, memory_budget_tokens=budget)
    rounds = speculative_decode(engine, sessions, SamplingParams(), max_new, stop)
    assert [s.generated for s in sessions] == refs
    stats = engine.stats()
    assert stats.sessions == 0  # every session closed
    assert rounds > len(PROMPTS)
    if budget < 100:
        assert stats.evictions > 0 and stats.prefills > len(PROMPTS)
    else:  # one prefill per session, except the 1-token prompt which needs none
        assert stats.evictions == 0 and stats.prefills == len(PROMPTS) - 1


@pytest.mark.parametrize("budget", [100_000, 40])
def test_speculative_coupled_equals_reference_sample(model: LlamaForCausalLM, budget: int) -> None:
    params = SamplingParams(mode="coupled", seed=2024, temperature=0.9, top_k=40, top_p=0.95)
    max_new = 20
    refs = [reference_sample(model, p, max_new, (), params) for p in PROMPTS]
    sessions = [Sess(f"s{i}", p, r) for i, (p, r) in enumerate(zip(PROMPTS, refs, strict=False))]
    engine = TargetEngine(model, memory_budget_tokens=budget)
    speculative_decode(engine, sessions, params, max_new, frozenset(), seed=5)
    assert [s.generated for s in sessions] == refs
    assert (engine.evictions > 0) == (budget < 100)


# -- cache bookkeeping ---------------------------------------------------------------


def test_cache_follows_the_authoritative_context(model: LlamaForCausalLM) -> None:
    engine = TargetEngine(model)
    p = PROMPTS[3]
    engine.verify_batch([VerifyItem("a", p, [1, 2, 3])])  # no commit: draft KV still cached
    assert engine.cached_len("a") == len(p) + 3
    cases = [
        ([*p, 1, 2, 9], [4]),  # diverges inside the cached draft
        (p[:10], [5, 6]),  # context went back (a resync to an older state)
        (p[:10] + [7] * 15, []),  # longer than the cache: prefill of the missing part
    ]
    for context, draft in cases:
        got = engine.verify_batch([VerifyItem("a", context, draft)])[0]
        fresh = TargetEngine(model).verify_batch([VerifyItem("a", context, draft)])[0]
        assert_same_logits(got, fresh)
        assert engine.cached_len("a") == len(context) + len(draft)


def test_commit_open_close_and_counters(model: LlamaForCausalLM) -> None:
    engine = TargetEngine(model)
    engine.open("a", PROMPTS[1])
    assert "a" in engine and engine.cached_len("a") == 0 and engine.prefills == 0
    engine.verify_batch([VerifyItem("a", PROMPTS[1], [1, 2, 3, 4])])
    assert engine.prefills == 1 and engine.forward_passes == 2 and engine.last_batch_size == 1
    engine.commit("a", len(PROMPTS[1]) + 2)  # accepted d1, then the target's token
    assert engine.cached_len("a") == len(PROMPTS[1]) + 1
    engine.commit("unknown", 5)
    engine.close("a")
    engine.close("a")
    assert "a" not in engine and engine.cached_tokens == 0
    assert engine.stats().forward_time_s > 0


def test_eviction_is_lru_and_spares_pinned_sessions(model: LlamaForCausalLM) -> None:
    engine = TargetEngine(model, memory_budget_tokens=50)
    items = {k: VerifyItem(k, random_tokens(20, i), [1]) for i, k in enumerate("abc")}
    for k in "abc":
        engine.verify_batch([items[k]])
        engine.commit(k, 20)  # each holds 19 tokens
    # a (oldest) was evicted when c pushed the total to 57 > 50.
    assert [engine.cached_len(k) for k in "abc"] == [0, 19, 19] and engine.evictions == 1
    # A batch larger than the budget: pinned sessions survive until their commit.
    engine.verify_batch([items["a"], items["b"], items["c"]])
    assert [engine.cached_len(k) for k in "abc"] == [21, 21, 21] and engine.evictions == 1
    engine.commit("a", 20)  # 61 tokens: a is the only unpinned session, so it goes
    assert [engine.cached_len(k) for k in "abc"] == [0, 21, 21] and engine.evictions == 2
    engine.commit("b", 20)
    engine.commit("c", 20)
    assert [engine.cached_len(k) for k in "abc"] == [0, 19, 19] and engine.evictions == 2


def qwen2(**kw: Any) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.3,
        **kw,
    )
    return Qwen2ForCausalLM(config).eval()


def test_another_family_batches_exactly_and_sliding_windows_are_refused() -> None:
    model = qwen2()
    items = [VerifyItem(i, p, random_tokens(3, i)) for i, p in enumerate(PROMPTS[:4])]
    for item, got in zip(items, TargetEngine(model).verify_batch(items), strict=True):
        assert_same_logits(got, full_forward_logits(model, [*item.context, *item.draft], 4))
    with pytest.raises(ModelError, match="sliding_attention"):
        TargetEngine(qwen2(use_sliding_window=True, sliding_window=8, max_window_layers=1))


def test_verify_batch_rejects_bad_items(model: LlamaForCausalLM) -> None:
    engine = TargetEngine(model)
    assert engine.verify_batch([]) == [] and engine.forward_passes == 0
    with pytest.raises(ValueError):
        engine.verify_batch([VerifyItem("a", [1, 2], []), VerifyItem("a", [1, 2], [])])
    with pytest.raises(ValueError):
        engine.verify_batch([VerifyItem("a", [1, 2], [VOCAB])])
    with pytest.raises(ValueError):
        engine.verify_batch([VerifyItem("a", [VOCAB, 2], [])])
    with pytest.raises(ValueError):
        engine.verify_batch([VerifyItem("a", [], [1])])


# -- loading -------------------------------------------------------------------------


def make_tokenizer(words: Sequence[str]) -> Any:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", *words])}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
        unk_token="<unk>",
        eos_token="<eos>",
    )


def test_tokenizer_fingerprint_is_stable_and_vocab_sensitive() -> None:
    a = tokenizer_fingerprint(make_tokenizer(["hello", "world"]))
    assert a == tokenizer_fingerprint(make_tokenizer(["hello", "world"]))
    assert a != tokenizer_fingerprint(make_tokenizer(["hello", "there"]))
    assert len(a) == 16 and int(a, 16) >= 0


def test_load_errors_are_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        load_causal_lm(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelError):
        load_causal_lm(str(tmp_path))  # a directory without a checkpoint
    with pytest.raises(ModelError, match="hub id"):
        load_causal_lm("no-such-org/no-such-model", local_files_only=True)
    with pytest.raises(ModelError, match="dtype"):
        load_causal_lm(str(tmp_path), dtype="float77")
