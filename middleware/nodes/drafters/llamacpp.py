"""A drafter running a GGUF model with llama.cpp (llama-cpp-python), as Pi users do.

The torch ``quant4`` drafter de-quantizes into float32 and runs at full-model speed;
llama.cpp runs the quantized kernels themselves (issue 17: 86 tok/s greedy against
16.4 tok/s for torch float32 on 1 thread, SmolLM2-135M Q4_1).

State: one llama.cpp context per drafter (one per session, as every drafter).  Its KV
cache is kept across rounds: each ``propose`` reuses the longest common prefix of the
tokens already evaluated and the new context, so a round feeds only the verifier's
correction and the new draft tokens; a rejection rolls back by truncating ``n_tokens``
(llama-cpp-python's ``eval`` removes the KV cells past it).  Confidence comes from the
drafter's own next-token logits (numpy), as the policy's metric asks.

Greedy only: the coupled and rejection modes need the target's torch sampling code on
the device; they are refused in :meth:`start` with a ModelError.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from middleware.errors import ModelError
from middleware.nodes.drafters.base import Drafter, Proposal
from middleware.nodes.drafters.policy import DraftPolicy
from middleware.protocol.session import SamplingParams


def gguf_path(spec: str) -> Path:
    """``smollm2`` (the packaged Q4_1 file) or a path to a ``.gguf`` file."""
    if spec == "smollm2":
        from middleware.models.loading import smollm2_gguf_path

        return smollm2_gguf_path()
    path = Path(spec).expanduser()
    if path.suffix != ".gguf" or not path.is_file():
        raise ModelError(f"llamacpp drafter: {spec!r} is not a .gguf file or 'smollm2'")
    return path


def load_llama(spec: str, *, n_threads: int = 1, n_ctx: int = 2048) -> Any:
    """A llama.cpp context for ``spec`` (greedy drafting needs only the last logits)."""
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        raise ModelError(
            "llamacpp drafter needs llama-cpp-python: "
            "pip install 'edge-specdec-middleware[llamacpp]'"
        ) from exc
    try:
        return Llama(
            model_path=str(gguf_path(spec)),
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            n_batch=512,
            logits_all=False,
            verbose=False,
        )
    except (ValueError, RuntimeError, OSError) as exc:
        raise ModelError(f"llamacpp drafter: cannot load {spec!r}: {exc}") from exc


def _confidence(logits: Any, metric: str) -> float:
    import numpy as np

    z = logits - logits.max()
    p = np.exp(z)
    p /= p.sum()
    if metric == "max_prob":
        return float(p.max())
    if metric == "margin":
        top2 = np.partition(p, -2)[-2:]
        return float(top2[1] - top2[0])
    nz = p[p > 0]
    return float(np.exp((nz * np.log(nz)).sum()))  # entropy: exp(-H)


class LlamaCppDrafter(Drafter):
    """Greedy drafts from a llama.cpp context, KV cache kept across rounds."""

    def __init__(self, llama: Any, policy: DraftPolicy | None = None, *, name: str) -> None:
        super().__init__(name, policy)
        self.llama = llama
        self.max_context = int(llama.n_ctx())
        self._prompt: tuple[int, ...] = ()
        self.forwards = 0  # llama.cpp eval calls (for tests)
        self.fed_tokens = 0  # tokens fed through the model

    def start(self, prompt: Sequence[int], sampling: SamplingParams) -> None:
        if sampling.mode != "greedy":
            raise ModelError(f"{self.name}: only greedy sampling (got {sampling.mode!r})")
        self.sampling = sampling
        self._prompt = tuple(int(t) for t in prompt)
        self.llama.n_tokens = 0  # the next eval drops every KV cell

    def propose(
        self, committed: Sequence[int], speculative: Sequence[int], max_tokens: int, position: int
    ) -> Proposal:
        context = [*self._prompt, *(int(t) for t in committed), *(int(t) for t in speculative)]
        if not context:
            raise ModelError(f"{self.name}: propose() before start() or with an empty prompt")
        limit = min(self.policy.limit(max_tokens), self.max_context - len(context))
        if limit <= 0:
            return Proposal()
        tokens: list[int] = []
        confs: list[float] = []
        logits = self._advance(context)
        for i in range(limit):
            tok = int(logits.argmax())
            conf = _confidence(logits, self.policy.metric)
            tokens.append(tok)
            confs.append(conf)
            if i + 1 >= limit or self.policy.should_stop(i, conf):
                break
            logits = self._advance([*context, *tokens])
        return Proposal(tuple(tokens), tuple(confs))

    def _advance(self, context: list[int]) -> Any:
        """Keep the evaluated common prefix (at most ``context[:-1]``), eval the rest."""
        import numpy as np

        llm = self.llama
        done = llm.input_ids[: llm.n_tokens].tolist()
        keep = 0
        for a, b in zip(done, context[:-1], strict=False):
            if a != b:
                break
            keep += 1
        llm.n_tokens = keep  # rollback: eval() removes the KV cells from n_tokens on
        try:
            llm.eval(context[keep:])
        except (RuntimeError, ValueError) as exc:
            llm.n_tokens = 0
            raise ModelError(f"{self.name}: llama.cpp eval failed: {exc}") from exc
        self.forwards += 1
        self.fed_tokens += len(context) - keep
        n_vocab = llm.n_vocab()
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).copy()
