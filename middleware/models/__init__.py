"""Model loading: target and draft causal LMs with their tokenizers."""

from middleware.models.loading import (
    BUILTIN_ALIASES,
    LoadedModel,
    load_causal_lm,
    smollm2_gguf_path,
    tokenizer_fingerprint,
)

__all__ = [
    "BUILTIN_ALIASES",
    "LoadedModel",
    "load_causal_lm",
    "smollm2_gguf_path",
    "tokenizer_fingerprint",
]
