"""A GGUF file's tokenizer without transformers (and so without torch), for n-gram devices.

A device that drafts with n-grams needs a tokenizer for four things only: the prompt
through the chat template, ``eos_token_id`` for its stop set, ``decode`` for the text
chunks, and the vocabulary for the fingerprint it compares with the verifier's.
transformers builds exactly this from a GGUF (a byte-level BPE in the ``tokenizers``
library, the chat template rendered by jinja2), but importing it costs seconds and
pulls torch into a Pi install.  Here the same ``tokenizers`` object is built from the
GGUF's own ``tokenizer.ggml.*`` fields, read with the ``gguf`` package.

Only the ``gpt2`` (byte-level BPE) tokenizer model is supported (SmolLM2, Qwen, Llama 3);
other GGUF tokenizers raise :class:`UnsupportedTokenizer`, and the caller falls back to
transformers.  ``tests/unit/test_light_tokenizer.py`` checks ids, decoded text, the chat
prompt and the fingerprint against transformers on the packaged SmolLM2 file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# GGUF token types (llama.cpp's llama_token_type): 3 = control, 4 = user defined.
_ADDED_TYPES = (3, 4)


class UnsupportedTokenizer(Exception):
    """The GGUF's tokenizer is not a byte-level BPE this module can rebuild."""


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


class GGUFTokenizer:
    """The subset of a transformers tokenizer a device uses, over ``tokenizers.Tokenizer``."""

    def __init__(
        self,
        backend: Any,
        *,
        chat_template: str | None,
        bos_token_id: int | None,
        eos_token_id: int | None,
        pad_token_id: int | None,
        unk_token_id: int | None,
    ) -> None:
        self._backend = backend
        self.chat_template = chat_template
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id

    def _token(self, tid: int | None) -> str | None:
        return None if tid is None else self._backend.id_to_token(tid)

    @property
    def bos_token(self) -> str | None:
        return self._token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self._token(self.eos_token_id)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._backend.get_vocab(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return str(self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
    ) -> list[int] | str:
        """Render as transformers does (sandboxed jinja2, trim/lstrip blocks), then encode."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        text = env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text


def load_gguf_tokenizer(path: str | Path) -> GGUFTokenizer:
    """Build the tokenizer of a GGUF file; raises ImportError without ``gguf``/``tokenizers``."""
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    reader = GGUFReader(str(path))
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedTokenizer(f"GGUF tokenizer model {kind!r} (only 'gpt2' BPE)")
    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens"))
    types: list[int] = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    add_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [
            AddedToken(tokens[i], special=True, normalized=False)
            for i, t in enumerate(types)
            if t in _ADDED_TYPES
        ]
    )
    return GGUFTokenizer(
        backend,
        chat_template=_field(reader, "tokenizer.chat_template"),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        unk_token_id=_field(reader, "tokenizer.ggml.unknown_token_id"),
    )
