"""Target-only decoding: the no-speculation mode and the definition lossless output must equal.

Both decoders run the model step by step with a ``DynamicCache``, exactly as
``model.generate`` does (prefill the prompt, then one token per forward, logits
of the last position only).

- :func:`reference_greedy`: argmax at every step; equals
  ``model.generate(do_sample=False)``.
- :func:`reference_sample`: generated token ``i`` (0-based among generated
  tokens) is ``coupled_choice(process_logits(logits_i, params), seed, i)``.  The
  coupled speculative mode must reproduce it token for token.

Decoding stops after ``max_new_tokens`` or after emitting a token in
``stop_ids`` (the stop token is part of the output, as with ``generate``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch

from middleware.protocol.session import SamplingParams
from middleware.sampling import coupled_choice, greedy_choice, process_logits

TokenSink = Callable[[int], None]
Choose = Callable[[torch.Tensor, int], int]  # (logits [V], generated index) -> token


def _decode(
    model: Any,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    stop_ids: Collection[int],
    choose: Choose,
    on_token: TokenSink | None,
) -> list[int]:
    from transformers import DynamicCache

    if not prompt_ids:
        raise ValueError("prompt_ids must not be empty")
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    stops = frozenset(int(t) for t in stop_ids)
    out: list[int] = []
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        feed = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)  # [1, T]
        while len(out) < max_new_tokens:
            logits = model(input_ids=feed, past_key_values=cache, use_cache=True, **kwargs).logits
            token = choose(logits[0, -1].float(), len(out))
            out.append(token)
            if on_token is not None:
                on_token(token)
            if token in stops:
                break
            feed = torch.tensor([[token]], dtype=torch.long, device=device)
    return out


def reference_greedy(
    model: Any,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    stop_ids: Collection[int] = (),
    on_token: TokenSink | None = None,
) -> list[int]:
    """Greedy target-only decoding: the tokens ``model.generate(do_sample=False)`` produces."""
    return _decode(
        model,
        prompt_ids,
        max_new_tokens,
        stop_ids,
        lambda logits, _i: greedy_choice(logits),
        on_token,
    )


def reference_sample(
    model: Any,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    stop_ids: Collection[int],
    params: SamplingParams,
    on_token: TokenSink | None = None,
    start_position: int = 0,
) -> list[int]:
    """Seeded target-only sampling with Gumbel-max noise fixed by ``(params.seed, position)``.

    Token ``i`` uses position ``start_position + i`` (non-zero when resuming
    after already generated tokens).  ``params.mode == "greedy"`` decodes greedily.
    """
    if params.mode == "greedy":
        return reference_greedy(model, prompt_ids, max_new_tokens, stop_ids, on_token)

    def choose(logits: torch.Tensor, i: int) -> int:
        return coupled_choice(process_logits(logits, params), params.seed, start_position + i)

    return _decode(model, prompt_ids, max_new_tokens, stop_ids, choose, on_token)
