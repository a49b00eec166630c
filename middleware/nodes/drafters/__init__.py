"""Drafters: the device-side proposers of speculative tokens.

Specs (``make_drafter``)::

    ngram            prompt lookup, n = 3 (``ngram:4`` for n = 4); no model
    hf:MODEL         a small causal LM, e.g. ``hf:smollm2`` or ``hf:/path/to/dir``
    quant4:MODEL     a 4-bit copy of MODEL made here (``quant3:``... likewise)
    llamacpp:GGUF    llama.cpp on a ``.gguf`` file or ``smollm2`` (``llamacpp@2:`` = 2 threads)

``MODEL`` is anything :func:`middleware.models.load_causal_lm` accepts.  The
model stack (torch, transformers) is imported only for model drafters.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from middleware.errors import ConfigError
from middleware.nodes.drafters.base import Drafter, DraftStats, Proposal
from middleware.nodes.drafters.ngram import NGramDrafter
from middleware.nodes.drafters.policy import METRICS, DraftPolicy, Metric, PolicyConfig

if TYPE_CHECKING:
    from middleware.models.loading import LoadedModel

Kind = Literal["ngram", "hf", "quant", "llamacpp"]

__all__ = [
    "METRICS",
    "DraftPolicy",
    "DraftStats",
    "Drafter",
    "DrafterSpec",
    "Metric",
    "NGramDrafter",
    "PolicyConfig",
    "Proposal",
    "make_drafter",
]


@dataclass(frozen=True, slots=True)
class DrafterSpec:
    """What drafter to build: ``kind``, the model spec it drafts with, bits, policy settings."""

    kind: Kind = "ngram"
    model: str = ""  # load_causal_lm spec; empty for ngram
    bits: int = 0  # quant only
    n: int = 3  # ngram only: longest n-gram looked up
    group_size: int = 32
    symmetric: bool = True
    embeddings: bool = False  # quant: also quantize the embedding (and a tied head)
    threads: int = 1  # llamacpp only: llama.cpp n_threads
    policy: PolicyConfig = field(default_factory=PolicyConfig)

    def __post_init__(self) -> None:
        if self.kind not in ("ngram", "hf", "quant", "llamacpp"):
            raise ConfigError(f"drafter kind {self.kind!r} not one of ngram, hf, quant, llamacpp")
        if self.threads < 1:
            raise ConfigError("llamacpp drafter: threads must be >= 1")
        if self.kind != "ngram" and not self.model:
            raise ConfigError(f"drafter {self.kind!r} needs a model spec")
        if self.kind == "quant" and self.bits not in (2, 3, 4, 5, 6, 8):
            raise ConfigError(f"quant drafter: unsupported bits {self.bits}")
        if self.n < 1:
            raise ConfigError("ngram drafter: n must be >= 1")

    @classmethod
    def parse(cls, text: str, policy: PolicyConfig | None = None) -> DrafterSpec:
        """Parse ``ngram``, ``ngram:4``, ``hf:MODEL`` or ``quantB:MODEL``."""
        head, sep, rest = text.strip().partition(":")
        pol = policy or PolicyConfig()
        if head == "ngram":
            try:
                n = int(rest) if sep else 3
            except ValueError as exc:
                raise ConfigError(f"drafter spec {text!r}: ngram order must be an int") from exc
            return cls("ngram", n=n, policy=pol)
        if not sep or not rest:
            raise ConfigError(f"drafter spec {text!r}: expected KIND:MODEL")
        if head == "hf":
            return cls("hf", rest, policy=pol)
        if head == "llamacpp" or head.startswith("llamacpp@"):
            threads = head.partition("@")[2] or "1"
            if not threads.isdigit():
                raise ConfigError(f"drafter spec {text!r}: llamacpp@N needs an int N")
            return cls("llamacpp", rest, threads=int(threads), policy=pol)
        if head.startswith("quant") and head[5:].isdigit():
            return cls("quant", rest, bits=int(head[5:]), policy=pol)
        raise ConfigError(f"drafter spec {text!r}: unknown kind {head!r}")

    def __str__(self) -> str:
        if self.kind == "ngram":
            return "ngram" if self.n == 3 else f"ngram:{self.n}"
        if self.kind == "llamacpp":
            return f"llamacpp{'' if self.threads == 1 else f'@{self.threads}'}:{self.model}"
        return f"{self.kind}{self.bits if self.kind == 'quant' else ''}:{self.model}"


def make_drafter(
    spec: DrafterSpec | str,
    *,
    base: LoadedModel | None = None,
    models: dict[str, LoadedModel] | None = None,
    device: str = "cpu",
    policy: PolicyConfig | None = None,
    name: str | None = None,
) -> Drafter:
    """Build the drafter ``spec`` describes.

    Model drafters draft with ``base`` when given (an ``hf`` drafter shares
    its weights; a ``quant`` drafter makes its own quantized copy of them), else
    with ``models[spec.model]``, else load it (float32) and, when ``models`` is
    given, store it there, so several drafters in one process load each model once.
    ``policy`` overrides the spec's policy settings.
    """
    if isinstance(spec, str):
        spec = DrafterSpec.parse(spec, policy)
    elif policy is not None:
        spec = replace(spec, policy=policy)
    label = name or str(spec)
    if spec.kind == "ngram":
        return NGramDrafter(spec.n, DraftPolicy(spec.policy), name=label)
    if spec.kind == "llamacpp":
        from middleware.nodes.drafters.llamacpp import LlamaCppDrafter, load_llama

        llama = load_llama(spec.model, n_threads=spec.threads)
        return LlamaCppDrafter(llama, DraftPolicy(spec.policy), name=label)
    loaded = base or _load(spec.model, device, models)
    if spec.kind == "hf":
        from middleware.nodes.drafters.hf import HFDrafter

        return HFDrafter(loaded.model, loaded.tokenizer, DraftPolicy(spec.policy), name=label)
    from middleware.nodes.drafters.quantized import QuantizedDrafter

    return QuantizedDrafter(
        loaded.model,
        spec.bits,
        loaded.tokenizer,
        DraftPolicy(spec.policy),
        group_size=spec.group_size,
        symmetric=spec.symmetric,
        embeddings=spec.embeddings,
        name=label,
    )


def _load(model: str, device: str, models: dict[str, LoadedModel] | None) -> LoadedModel:
    if models is not None and model in models:
        return models[model]
    from middleware.models.loading import load_causal_lm

    loaded = load_causal_lm(model, device, "float32")
    if models is not None:
        models[model] = loaded
    return loaded
