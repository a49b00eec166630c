"""The GGUF tokenizer built without transformers matches transformers' own on SmolLM2."""

from __future__ import annotations

import pytest

from middleware.models.loading import smollm2_gguf_path, tokenizer_fingerprint

pytest.importorskip("tokenizers")
pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello, world!",
    "  leading spaces and\ttabs\nnewlines\r\n",
    "naïve café — ünïcödé 東京 🚀 emoji",
    "<|im_start|>user\nspecial tokens inline<|im_end|><|endoftext|>",
    "def f(x):\n    return x ** 2  # code 12345 3.14159",
    "",
]


@pytest.fixture(scope="module")
def pair():
    from middleware.models.light_tokenizer import load_gguf_tokenizer

    path = smollm2_gguf_path()
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return load_gguf_tokenizer(path), reference


def test_fingerprint_and_special_ids_match(pair):
    light, ref = pair
    assert tokenizer_fingerprint(light) == tokenizer_fingerprint(ref)
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(light, f"{name}_token_id") == getattr(ref, f"{name}_token_id")


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match(pair, text):
    light, ref = pair
    ids = light.encode(text)
    assert ids == ref.encode(text)
    for skip in (True, False):
        assert light.decode(ids, skip_special_tokens=skip) == ref.decode(
            ids, skip_special_tokens=skip
        )


def test_chat_prompt_matches(pair):
    from middleware.nodes.service import encode_prompt

    light, ref = pair
    for prompt in ("What is the capital of France?", "Write a haiku\nabout MQTT."):
        assert encode_prompt(light, prompt) == encode_prompt(ref, prompt)
        assert encode_prompt(light, prompt, chat=False) == encode_prompt(ref, prompt, chat=False)


def test_load_tokenizer_uses_the_light_path_for_gguf():
    from middleware.models.light_tokenizer import GGUFTokenizer
    from middleware.models.loading import load_tokenizer

    tok, fp = load_tokenizer("smollm2")
    assert isinstance(tok, GGUFTokenizer)
    assert fp == tokenizer_fingerprint(tok)
