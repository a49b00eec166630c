"""Low-bit copies of a model, made on the device, as drafters.

:func:`quantize_model` *simulates* a quantized model: it deep-copies the model
and replaces each ``nn.Linear`` weight (optionally the input embedding too)
by its group-wise round-to-nearest quantization at ``bits`` bits, stored
**dequantized in float32**.  The copy therefore has exactly the numerics of a
``bits``-bit model (the drafter's predictions differ from the full model's as
a real low-bit model's would) but neither its memory footprint nor its speed.

Groups run along the input dimension (the last axis of the weight), as in
GGUF/GPTQ.  Symmetric: ``w ~= s * q`` with ``q`` in ``[-2^(b-1), 2^(b-1)-1]``
and ``s = max|w| / (2^(b-1) - 1)``.  Asymmetric: ``w ~= s * q + m`` with ``q``
in ``[0, 2^b - 1]``, ``m = min w``, ``s = (max w - min w) / (2^b - 1)`` (the
GGUF Q4_1 layout).

The output head is left alone unless it is tied to the input embedding and
embeddings are quantized (SmolLM2 ties them, so there ``embeddings=True``
quantizes the head too).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from middleware.errors import ConfigError
from middleware.nodes.drafters.hf import HFDrafter
from middleware.nodes.drafters.policy import DraftPolicy

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)


def quantize_tensor(
    w: torch.Tensor, bits: int, group_size: int = 32, *, symmetric: bool = True
) -> torch.Tensor:
    """Group-wise round-to-nearest quantization of ``w`` [..., in], returned dequantized."""
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"quantize: bits={bits} not in {SUPPORTED_BITS}")
    if group_size < 1:
        raise ConfigError("quantize: group_size must be >= 1")
    shape = w.shape
    x = w.detach().float().reshape(-1, shape[-1])  # [R, in]
    pad = (-shape[-1]) % group_size
    if pad:
        # Replicate the row's last value so padding never widens a group's range.
        x = torch.cat([x, x[:, -1:].expand(-1, pad)], dim=1)
    g = x.reshape(x.shape[0], -1, group_size)  # [R, G, group]
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = g.abs().amax(dim=-1, keepdim=True) / qmax  # [R, G, 1]
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        deq = torch.clamp(torch.round(g / scale), -qmax - 1, qmax) * scale
    else:
        levels = 2**bits - 1
        lo = g.amin(dim=-1, keepdim=True)
        scale = (g.amax(dim=-1, keepdim=True) - lo) / levels
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        deq = torch.clamp(torch.round((g - lo) / scale), 0, levels) * scale + lo
    deq = deq.reshape(x.shape[0], -1)[:, : shape[-1]]
    return deq.reshape(shape).to(torch.float32)


def quantize_model(
    model: nn.Module,
    bits: int,
    group_size: int = 32,
    *,
    symmetric: bool = True,
    embeddings: bool = False,
) -> nn.Module:
    """A float32 copy of ``model`` with ``bits``-bit RTN Linear weights (simulated; see module doc).

    ``model`` itself is not modified.  The untied output head is never
    quantized; a head tied to the embedding follows ``embeddings``.
    """
    q = copy.deepcopy(model).to(torch.float32).eval()
    head = q.get_output_embeddings() if hasattr(q, "get_output_embeddings") else None  # type: ignore[operator]
    emb = q.get_input_embeddings() if hasattr(q, "get_input_embeddings") else None  # type: ignore[operator]
    head_w = head.weight if head is not None else None
    done: set[int] = set()
    with torch.no_grad():
        for module in q.modules():
            if isinstance(module, nn.Linear):
                w = module.weight
                if w is head_w and not (embeddings and emb is not None and w is emb.weight):
                    continue
            elif isinstance(module, nn.Embedding) and embeddings:
                w = module.weight
            else:
                continue
            if id(w) in done:  # tied weights: quantize once
                continue
            w.copy_(quantize_tensor(w, bits, group_size, symmetric=symmetric))
            done.add(id(w))
    return q


class QuantizedDrafter(HFDrafter):
    """An :class:`HFDrafter` over a ``bits``-bit copy of ``base_model`` made here."""

    def __init__(
        self,
        base_model: nn.Module,
        bits: int,
        tokenizer: Any = None,
        policy: DraftPolicy | None = None,
        *,
        group_size: int = 32,
        symmetric: bool = True,
        embeddings: bool = False,
        name: str | None = None,
    ) -> None:
        model = quantize_model(
            base_model, bits, group_size, symmetric=symmetric, embeddings=embeddings
        )
        base_name = getattr(getattr(base_model, "config", None), "name_or_path", "") or "model"
        super().__init__(model, tokenizer, policy, name=name or f"quant{bits}:{base_name}")
        self.bits = bits
        self.group_size = group_size
