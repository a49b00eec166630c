"""Tiny random models and a trivial tokenizer for fast unit tests."""

from __future__ import annotations

from collections.abc import Sequence

import torch

VOCAB = 96
EOS = 2


def tiny_llama(seed: int = 0, vocab: int = VOCAB, layers: int = 2) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=EOS,
        bos_token_id=1,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg)
    # Larger weights than the default init make logits far apart: no greedy near-ties
    # to blur what these unit tests check (the real model's numerics are tested separately).
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    return model.eval()


class TinyTokenizer:
    """Token ``i`` <-> word ``w{i}``; enough for text streams in unit tests."""

    eos_token_id = EOS
    chat_template = None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" w{i}" for i in ids if not (skip_special_tokens and i == EOS))

    def encode(self, text: str) -> list[int]:
        return [int(w[1:]) % VOCAB for w in text.split() if w[1:].isdigit()] or [1]


def noisy_copy(seed: int = 0, noise: float = 0.35, noise_seed: int = 7) -> torch.nn.Module:
    """``tiny_llama(seed)`` with noisy weights: a drafter that agrees often, not always."""
    model = tiny_llama(seed=seed)
    gen = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise * p.abs().mean())
    return model
