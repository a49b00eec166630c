"""Human-facing session output and prompts (UTF-8 JSON).

``session/{device}/{id}/text`` carries :class:`TextChunk` values.  Every chunk says
whether its text is ``verified`` (committed by the target model),
``provisional`` (released by an offline device, not yet verified) or a
``correction`` (replaces the text from token position ``pos`` on: provisional
text, committed text re-sent after a node restart, or committed tokens an
``opened`` verdict did not confirm).
No output token is ever silently wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Self

from middleware.errors import ProtocolError
from middleware.protocol.codec import DEFAULT_LIMITS, Fields, Limits, check_id, pack_json

ChunkKind = Literal["verified", "provisional", "correction", "confirmed"]
CHUNK_KINDS: tuple[str, ...] = ("verified", "provisional", "correction", "confirmed")


@dataclass(frozen=True, slots=True)
class TextChunk:
    """One piece of a session's text stream.

    ``pos`` is the committed-token position of the chunk's first token and
    ``n_tokens`` how many tokens it covers.  A ``correction`` replaces all
    text from ``pos`` on with ``text``; ``confirmed`` says that the
    provisional tokens up to ``pos + n_tokens`` were verified unchanged.
    """

    TYPE: ClassVar[str] = "text"

    session_id: str
    device_id: str
    seq: int
    kind: ChunkKind
    pos: int
    n_tokens: int
    text: str
    final: bool = False
    lossy: bool = False
    instance: str = ""  # the session instance (a reused session id is another instance)

    def __post_init__(self) -> None:
        check_id(self.session_id, "text.session_id")
        check_id(self.device_id, "text.device_id")
        if self.kind not in CHUNK_KINDS:
            raise ProtocolError(f"text.kind: {self.kind!r}")

    def encode(self) -> bytes:
        return pack_json(
            self.TYPE,
            {
                "session": self.session_id,
                "device": self.device_id,
                "seq": self.seq,
                "kind": self.kind,
                "pos": self.pos,
                "n": self.n_tokens,
                "text": self.text,
                "final": self.final,
                "lossy": self.lossy,
                "inst": self.instance,
            },
        )

    @classmethod
    def from_wire(cls, d: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> Self:
        f = Fields(d, cls.TYPE, limits)
        return cls(
            session_id=f.id("session"),
            device_id=f.id("device"),
            seq=f.int("seq", 0, 1 << 62),
            kind=f.choice("kind", CHUNK_KINDS),  # type: ignore[arg-type]
            pos=f.int("pos", 0, limits.max_context_tokens),
            n_tokens=f.int("n", 0, limits.max_context_tokens),
            text=f.str("text", max_len=limits.max_text),
            final=f.bool("final", False),
            lossy=f.bool("lossy", False),
            instance=f.str("inst", "", 64),
        )


@dataclass(frozen=True, slots=True)
class Result:
    """Retained ``session/{device}/{id}/result``: the final text and per-session figures."""

    TYPE: ClassVar[str] = "result"

    session_id: str
    device_id: str
    text: str
    n_tokens: int
    finish_reason: str
    # True only for a session that ended normally (stop, length) with every token verified;
    # false if text was released unverified, or the session failed (``error`` says why).
    verified: bool
    stats: dict[str, float] = field(default_factory=dict)
    lossy: bool = False
    instance: str = ""  # the session instance the text belongs to
    request: str = ""  # the inbox request's id, when it carried one
    # Why a session failed (finish_reason "refused" or "failed"); empty, and not on the
    # wire, for one that ended normally.
    error: str = ""

    def __post_init__(self) -> None:
        check_id(self.session_id, "result.session_id")
        if len(self.request) > 64:
            raise ProtocolError("result.request: too long")
        check_id(self.device_id, "result.device_id")

    def encode(self) -> bytes:
        return pack_json(
            self.TYPE,
            {
                "session": self.session_id,
                "device": self.device_id,
                "text": self.text,
                "n": self.n_tokens,
                "fin": self.finish_reason,
                "verified": self.verified,
                "stats": self.stats,
                "lossy": self.lossy,
                "inst": self.instance,
                "request": self.request,
                **({"error": self.error} if self.error else {}),
            },
        )

    @classmethod
    def from_wire(cls, d: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> Self:
        from middleware.protocol.status import _stats

        f = Fields(d, cls.TYPE, limits)
        return cls(
            session_id=f.id("session"),
            device_id=f.id("device"),
            text=f.str("text", max_len=limits.max_text),
            n_tokens=f.int("n", 0, limits.max_context_tokens),
            finish_reason=f.str("fin", "", 32),
            verified=f.bool("verified"),
            stats=_stats(f.raw("stats", {})),
            lossy=f.bool("lossy", False),
            instance=f.str("inst", "", 64),
            request=f.str("request", "", 64),
            error=f.str("error", ""),
        )


@dataclass(frozen=True, slots=True)
class PromptRequest:
    """``device/{id}/inbox``: a prompt for a device, from any IoT stack.

    Accepts JSON (``{"prompt": "...", "session": "...", "max_new_tokens": 64,
    "request": "..."}``) or plain UTF-8 text (the whole payload is the prompt).
    ``request`` is echoed in the session's result, so a caller can tell its
    result from an earlier one under the same session id.
    """

    TYPE: ClassVar[str] = "prompt"

    prompt: str
    session_id: str | None = None
    max_new_tokens: int | None = None
    chat: bool = True  # apply the tokenizer's chat template
    request_id: str = ""

    def __post_init__(self) -> None:
        if len(self.request_id) > 64:
            raise ProtocolError("prompt.request: too long")
        if not self.prompt.strip():
            raise ProtocolError("prompt: empty")
        if self.session_id is not None:
            check_id(self.session_id, "prompt.session")
        if self.max_new_tokens is not None and not (
            1 <= self.max_new_tokens <= DEFAULT_LIMITS.max_context_tokens
        ):
            raise ProtocolError("prompt.max_new_tokens out of range")  # 0 would decode as None

    def encode(self) -> bytes:
        body: dict[str, Any] = {"prompt": self.prompt, "chat": self.chat}
        if self.session_id is not None:
            body["session"] = self.session_id
        if self.max_new_tokens is not None:
            body["max_new_tokens"] = self.max_new_tokens
        if self.request_id:
            body["request"] = self.request_id
        return pack_json(self.TYPE, body)

    @classmethod
    def from_wire(cls, d: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> Self:
        f = Fields(d, cls.TYPE, limits)
        mnt = f.raw("max_new_tokens", 0)
        if type(mnt) is int and mnt == 0:  # absent, null or 0: the device's default
            mnt = None
        elif mnt is not None:  # not "or None": false, "" and [] are type errors
            mnt = f.int("max_new_tokens", 1, limits.max_context_tokens)
        return cls(
            prompt=f.str("prompt", max_len=limits.max_text),
            session_id=f.opt_id("session"),
            max_new_tokens=mnt,
            chat=f.bool("chat", True),
            request_id=f.str("request", "", 64),
        )

    @classmethod
    def parse(cls, data: bytes, limits: Limits = DEFAULT_LIMITS) -> Self:
        """Decode an inbox payload: JSON object (typed or not) or plain text."""
        if len(data) > limits.max_payload:
            raise ProtocolError(f"prompt payload of {len(data)} bytes exceeds {limits.max_payload}")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("prompt: not UTF-8") from exc
        if text.lstrip().startswith("{"):
            try:
                obj = json.loads(text)
            except (ValueError, RecursionError) as exc:
                raise ProtocolError(f"prompt: invalid JSON: {exc}") from exc
            if not isinstance(obj, dict):
                raise ProtocolError("prompt: JSON must be an object")
            return cls.from_wire(obj, limits)
        if len(text) > limits.max_text:
            raise ProtocolError("prompt: text too long")
        return cls(prompt=text)
