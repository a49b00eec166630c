"""A drafter running a GGUF model with llama.cpp (llama-cpp-python), as Pi users do.

The torch ``quant4`` drafter de-quantizes into float32 and runs at full-model speed;
llama.cpp runs the quantized kernels themselves (issue 17: 86 tok/s greedy against
16.4 tok/s for torch float32 on 1 thread, SmolLM2-135M Q4_1).

State: the weights are loaded once per process (:func:`load_gguf`, mmapped); each
drafter (one per session, as every drafter) has its own llama.cpp context, whose KV
cache is kept across rounds: each ``propose`` reuses the longest common prefix of the
tokens already evaluated and the new context, so a round feeds only the verifier's
correction and the new draft tokens; a rejection rolls back by removing the KV cells
past that prefix (``llama_memory_seq_rm``).  Confidence comes from the
drafter's own next-token logits (numpy), as the policy's metric asks.

Greedy only: the coupled and rejection modes need the target's torch sampling code on
the device; they are refused in :meth:`start` with a ModelError.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from middleware.errors import ModelError
from middleware.nodes.drafters.base import Drafter, Proposal
from middleware.nodes.drafters.policy import DraftPolicy
from middleware.protocol.session import SamplingParams

# Lower-bit copies of the packaged file (``smollm2-q3_k``...), made with llama.cpp's own
# quantizer.  SmolLM2-135M is 576 wide, and K-quants need rows divisible by 256: llama.cpp
# falls back to Q4_0/Q5_0 for 180 of 272 tensors (only the 1536-wide rows get K-quants),
# so the files stay large: Q4_0 87.5 MiB, Q3_K_M 89.2, Q2_K 84.1 against 93.8 for the
# packaged Q4_1.  Q2_0 (blocks of 32) applies to all but one tensor: 59.0 MiB, but has no
# fast CPU kernel here.  Figures: bench/results/drafters.json.
REQUANT_TYPES: dict[str, str] = {
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q3_k": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
    "q2_0": "LLAMA_FTYPE_MOSTLY_Q2_0",
}


def cache_dir() -> Path:
    """Where requantized files go: ``$XDG_CACHE_HOME/edge-specdec-middleware/gguf``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edge-specdec-middleware" / "gguf"


def requantized(src: Path, qtype: str) -> Path:
    """``src`` requantized to ``qtype`` (a key of REQUANT_TYPES), made once and cached.

    Written to a temporary name and renamed, so concurrent makers never see half a file.
    """
    import llama_cpp

    ftype = getattr(llama_cpp, REQUANT_TYPES[qtype], None)
    if ftype is None:
        raise ModelError(f"llamacpp drafter: this llama.cpp has no {REQUANT_TYPES[qtype]}")
    st = src.stat()
    out = cache_dir() / f"{src.stem}-{st.st_size:x}-{qtype}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 1
    params.allow_requantize = True  # the source is already Q4_1
    _route_llama_logs()
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise ModelError(f"llamacpp drafter: quantizing {src.name} to {qtype} failed ({rc})")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def gguf_path(spec: str) -> Path:
    """``smollm2`` (the packaged Q4_1 file), ``smollm2-q3_k`` etc. (a lower-bit copy of it,
    made here once; see REQUANT_TYPES) or a path to a ``.gguf`` file."""
    head, _, qtype = spec.partition("-")
    if head == "smollm2":
        from middleware.models.loading import smollm2_gguf_path

        if not qtype:
            return smollm2_gguf_path()
        if qtype in REQUANT_TYPES:
            return requantized(smollm2_gguf_path(), qtype)
        raise ModelError(
            f"llamacpp drafter: {spec!r}: unknown type {qtype!r}; "
            f"known: {', '.join(f'smollm2-{t}' for t in REQUANT_TYPES)}"
        )
    path = Path(spec).expanduser()
    if path.suffix != ".gguf" or not path.is_file():
        raise ModelError(
            f"llamacpp drafter: {spec!r} is not a .gguf file, 'smollm2' or 'smollm2-TYPE'"
        )
    return path


# llama.cpp's own log lines (model loading, context creation) go to the ``llama_cpp``
# logger (structlog's stdlib bridge), at debug level.  Kept referenced: ctypes would
# free a temporary callback while llama.cpp still holds its pointer.
_LOG = logging.getLogger("llama_cpp")
_log_callback: Any = None
_models: dict[Path, Any] = {}
_models_lock = threading.Lock()


def _route_llama_logs() -> None:
    global _log_callback
    if _log_callback is not None:
        return
    import llama_cpp

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: Any) -> None:
        with contextlib.suppress(Exception):  # never raise into C
            _LOG.log(
                logging.WARNING if level == 4 else logging.DEBUG,  # ggml ERROR; WARN is noise here
                text.decode("utf-8", "replace").rstrip(),
            )

    _log_callback = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def load_gguf(spec: str) -> Any:
    """The weights of ``spec``, loaded once per process and shared by every session's context.

    Not ``llama_cpp.Llama``: with ``verbose=False`` it silences llama.cpp by pointing the
    process's file descriptors 1 and 2 at /dev/null while it loads and restoring them after.
    A node creates its sessions' drafters in worker threads, so two loads overlapped; the
    second saved /dev/null as "the original", restored it last, and the node went on with
    stdout and stderr gone for good: ``mw-cli node --prompt A --prompt B`` under pytest
    exited 0 having printed nothing (the skipped lossless test of issue 17).  Here llama.cpp
    logs through a callback into ``logging``, nothing touches the descriptors, and a
    session costs one context (KV cache) instead of a second copy of the weights.
    """
    try:
        from llama_cpp import _internals, llama_cpp
    except ImportError as exc:
        raise ModelError(
            "llamacpp drafter needs llama-cpp-python: "
            "pip install 'edge-specdec-middleware[llamacpp]'"
        ) from exc
    with _models_lock:
        path = gguf_path(spec).resolve()  # may requantize: once, under the lock
        if path not in _models:
            _route_llama_logs()
            params = llama_cpp.llama_model_default_params()
            params.n_gpu_layers = 0
            try:
                _models[path] = _internals.LlamaModel(
                    path_model=str(path), params=params, verbose=True
                )
            except (ValueError, RuntimeError, OSError) as exc:
                raise ModelError(f"llamacpp drafter: cannot load {spec!r}: {exc}") from exc
        return _models[path]


class LlamaContext:
    """One llama.cpp context (its own KV cache) on shared weights, fed in batches of 512."""

    N_BATCH = 512

    def __init__(self, model: Any, *, n_threads: int = 1, n_ctx: int = 2048) -> None:
        from llama_cpp import _internals, llama_cpp

        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = min(n_ctx, self.N_BATCH)
        params.n_threads = params.n_threads_batch = n_threads
        params.no_perf = True
        try:
            self.ctx = _internals.LlamaContext(model=model, params=params, verbose=True)
            self.batch = _internals.LlamaBatch(
                n_tokens=params.n_batch, embd=0, n_seq_max=1, verbose=True
            )
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"llamacpp drafter: cannot create a context: {exc}") from exc
        self.model = model
        self.n_batch = int(params.n_batch)
        self.n_ctx = n_ctx
        self.n_vocab = int(model.n_vocab())
        self.tokens: list[int] = []  # what the KV cache holds, position by position

    def truncate(self, n: int) -> None:
        """Drop the KV cells from position ``n`` on (a rejected draft's)."""
        self.ctx.kv_cache_seq_rm(0, n, -1)
        del self.tokens[n:]

    def eval(self, tokens: Sequence[int]) -> Any:
        """Feed ``tokens`` after what the cache holds; the logits after the last one."""
        import numpy as np

        if not tokens:
            raise ValueError("nothing to evaluate")
        for i in range(0, len(tokens), self.n_batch):
            chunk = list(tokens[i : i + self.n_batch])
            self.batch.set_batch(batch=chunk, n_past=len(self.tokens), logits_all=False)
            self.ctx.decode(self.batch)
            self.tokens.extend(chunk)
        row = self.ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(row, shape=(self.n_vocab,)).copy()


def load_llama(spec: str, *, n_threads: int = 1, n_ctx: int = 2048) -> LlamaContext:
    """A fresh llama.cpp context on the (shared) weights of ``spec``."""
    return LlamaContext(load_gguf(spec), n_threads=n_threads, n_ctx=n_ctx)


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

    def __init__(
        self, llama: LlamaContext, policy: DraftPolicy | None = None, *, name: str
    ) -> None:
        super().__init__(name, policy)
        self.llama = llama
        self.max_context = llama.n_ctx
        self._prompt: tuple[int, ...] = ()
        self.forwards = 0  # llama.cpp eval calls (for tests)
        self.fed_tokens = 0  # tokens fed through the model

    def start(self, prompt: Sequence[int], sampling: SamplingParams) -> None:
        if sampling.mode != "greedy":
            raise ModelError(f"{self.name}: only greedy sampling (got {sampling.mode!r})")
        self.sampling = sampling
        self._prompt = tuple(int(t) for t in prompt)
        self.llama.truncate(0)

    def propose(
        self, committed: Sequence[int], speculative: Sequence[int], max_tokens: int, position: int
    ) -> Proposal:
        context, limit = self._room(
            self._prompt, committed, speculative, max_tokens, self.max_context
        )
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
        llm = self.llama
        keep = 0
        for a, b in zip(llm.tokens, context[:-1], strict=False):
            if a != b:
                break
            keep += 1
        try:
            llm.truncate(keep)  # rollback: the rejected tokens' KV cells go
            logits = llm.eval(context[keep:])
        except (RuntimeError, ValueError) as exc:
            llm.truncate(0)
            raise ModelError(f"{self.name}: llama.cpp eval failed: {exc}") from exc
        self.forwards += 1
        self.fed_tokens += len(context) - keep
        return logits
