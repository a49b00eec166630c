"""The llama.cpp drafter on the packaged SmolLM2 GGUF: same vocabulary as the target's
tokenizer, KV cache kept and rolled back correctly, and lossless against the torch verifier.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest

from middleware.nodes.drafters import make_drafter
from middleware.nodes.drafters.policy import PolicyConfig
from middleware.nodes.service import encode_prompt, stop_ids_of
from middleware.protocol.session import SamplingParams

pytest.importorskip("llama_cpp")
pytestmark = [pytest.mark.model]

CLI = [sys.executable, "-m", "middleware.cli.main"]
PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.")
MAX_NEW = 24
TEXTS = ("Hello, world!", "naïve café 東京 🚀", "<|im_start|>user\nhi<|im_end|>", "x  = 3.14\n\t")


def test_gguf_vocab_matches_the_hf_tokenizer(smollm2) -> None:
    from middleware.nodes.drafters.llamacpp import load_gguf

    llm = load_gguf("smollm2")
    tok = smollm2.tokenizer
    assert llm.n_vocab() == len(tok.get_vocab())
    for text in TEXTS:
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert ids == tok.encode(text), text
    chat = encode_prompt(tok, PROMPTS[0])
    assert llm.detokenize(chat, special=True).decode() == tok.decode(chat)


def test_kv_cache_rollback_equals_a_fresh_context(smollm2) -> None:
    """After a rejected 6-token draft, the next round equals a fresh context that evaluated
    the same chunks (prompt at once, then the correction) bit for bit, and feeds only the
    correction: the rejected cells are gone and the prompt is not evaluated again.

    Chunking is kept equal on purpose: llama.cpp's sums depend on the batch split (a
    prompt at once vs. token by token gives logits up to 0.75 apart here, which flips
    near-ties), so only equal splits can be compared exactly.
    """
    import numpy as np

    pol = PolicyConfig(threshold=0.0, max_len=6, adaptive=False)
    prompt = encode_prompt(smollm2.tokenizer, PROMPTS[1])
    d = make_drafter("llamacpp:smollm2", policy=pol)
    d.start(prompt, SamplingParams())
    first = d.propose([], [], 6, 0)
    assert len(first) == 6
    wrong = (first.tokens[0] + 1) % 1000  # the verifier's correction: not the draft
    fed = d.fed_tokens
    logits = d._advance([*prompt, wrong])
    assert d.fed_tokens - fed == 1  # only the correction

    fresh = make_drafter("llamacpp:smollm2", policy=pol)
    fresh.start(prompt, SamplingParams())
    fresh._advance(list(prompt))
    expected = fresh._advance([*prompt, wrong])
    assert np.array_equal(logits, expected)

    d.start(prompt, SamplingParams())  # a new session drops everything
    again = d.propose([], [], 6, 0)
    assert again.tokens == first.tokens


@pytest.fixture
def services(mosquitto, tmp_path: Path) -> Iterator[list[str]]:
    prefix = f"mw/test-llamacpp-{uuid.uuid4().hex[:8]}"
    common = ["--host", mosquitto.host, "--port", str(mosquitto.port), "--prefix", prefix]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "verifier.log", "w")
    verifier = subprocess.Popen(
        [*CLI, "verifier", *common, "--id", "v-llama", "--model", "smollm2"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        yield common
    finally:
        verifier.terminate()
        try:
            verifier.wait(15)
        except subprocess.TimeoutExpired:
            verifier.kill()
        log.close()


@pytest.mark.integration
def test_llamacpp_device_is_lossless(services, smollm2) -> None:
    """`mw-cli node --drafter llamacpp:smollm2 --prompt ...` prints the target's own greedy text."""
    from middleware.verifier.reference import reference_greedy

    args = [*CLI, "node", *services, "--id", "pi-llama", "--drafter", "llamacpp:smollm2"]
    args += ["--max-new-tokens", str(MAX_NEW)]
    for p in PROMPTS:
        args += ["--prompt", p]
    node = subprocess.run(args, capture_output=True, text=True, timeout=400)
    assert node.returncode == 0, node.stderr[-3000:]
    tok = smollm2.tokenizer
    expected = [
        tok.decode(
            reference_greedy(smollm2.model, encode_prompt(tok, p), MAX_NEW, stop_ids_of(tok)),
            skip_special_tokens=True,
        )
        for p in PROMPTS
    ]
    assert node.stdout == "".join(f"{text}\n" for text in expected), node.stderr[-3000:]
    assert "acceptance" in node.stderr


def test_loading_leaves_stdout_and_stderr_alone(monkeypatch) -> None:
    """Sessions create drafters in worker threads at once: loading must never redirect file
    descriptors 1 and 2 (llama_cpp.Llama(verbose=False) did, and overlapping loads left a
    node with both pointing at /dev/null: it exited 0 having printed nothing)."""
    import threading

    from middleware.nodes.drafters import llamacpp

    def no_dup2(*args: object) -> None:
        raise AssertionError("os.dup2 called while loading a llama.cpp drafter")

    monkeypatch.setattr(llamacpp, "_models", {})  # load the weights again, in this test
    drafters: list[object] = []
    errors: list[BaseException] = []

    def make() -> None:
        try:
            drafters.append(make_drafter("llamacpp:smollm2"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=make) for _ in range(3)]
    with mock.patch.object(os, "dup2", no_dup2):  # not monkeypatch: pytest's capture dup2s
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    assert len({id(d.llama.model) for d in drafters}) == 1  # weights shared by the sessions


def test_lower_bit_copy_is_made_once_with_llama_cpp_and_cached(
    smollm2, tmp_path, monkeypatch
) -> None:
    import gguf

    from middleware.errors import ModelError
    from middleware.nodes.drafters.llamacpp import gguf_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = gguf_path("smollm2-q4_0")
    assert path.parent == tmp_path / "edge-specdec-middleware" / "gguf"
    made = path.stat().st_mtime_ns
    assert gguf_path("smollm2-q4_0") == path and path.stat().st_mtime_ns == made  # cached
    field = gguf.GGUFReader(path).fields["general.file_type"]
    assert int(field.parts[field.data[0]][0]) == 2  # LLAMA_FTYPE_MOSTLY_Q4_0
    d = make_drafter("llamacpp:smollm2-q4_0", policy=PolicyConfig(threshold=0.0, max_len=4))
    d.start(encode_prompt(smollm2.tokenizer, PROMPTS[0]), SamplingParams())
    assert len(d.propose([], [], 4, 0)) == 4
    with pytest.raises(ModelError, match="smollm2-q3_k"):
        gguf_path("smollm2-q9_9")
