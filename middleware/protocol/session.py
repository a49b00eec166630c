"""Session messages (msgpack): open, draft, verdict, retained state, close.

Semantics (see README "Protocol semantics"):

- The verifier's truth for a session is its committed token sequence
  (generated tokens after the prompt).  ``committed_len`` counts those tokens.
- Every draft names the committed length it extends (``base``) and carries the
  session ``epoch`` and a per-session request ``seq``.
- A draft whose base is behind the committed length is answered with the
  tokens committed since that base (``catchup``), so a lost verdict heals itself.
- A duplicate (same epoch and seq) gets the same verdict again.
- A draft for an unknown session, a stale epoch or a base ahead of the
  committed length gets ``resync``: the device re-opens with its committed
  tokens and a higher epoch.

Identity and trust (docs/threat-model.md):

- A session is ``(device, session id, instance)``.  The instance is derived by
  both sides from the open's content (:func:`session_instance`: a nonce the
  device draws per generation, the prompt, sampling, limits and tokenizer), so a
  reused session id, or a different prompt under the same id, is a different
  instance.  Verdicts, retained state, text chunks and results carry it; a
  device ignores anything of another instance.
- Committed tokens in an open are a *claim*.  The verifier keeps only what it
  committed itself in this process or can prove: greedy and coupled tokens by
  re-verifying them with the target during the re-open prefill, rejection-sampled
  tokens by a MAC (``tag``) that it or a verifier sharing its key issued.  The
  ``opened`` verdict carries the proven truth from the first position where it
  differs from the claim (``base``/``tokens``), so the device rolls back what
  failed and shows a correction.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Self

import msgpack

from middleware.errors import ProtocolError
from middleware.protocol.codec import DEFAULT_LIMITS, Fields, Limits, check_id, pack

Mode = Literal["greedy", "coupled", "rejection"]
MODES: tuple[str, ...] = ("greedy", "coupled", "rejection")

VerdictKind = Literal["opened", "accept", "catchup", "resync", "refused", "closed"]
VERDICT_KINDS: tuple[str, ...] = ("opened", "accept", "catchup", "resync", "refused", "closed")

MAX_SEQ = (1 << 62) - 1
MAX_EPOCH = (1 << 31) - 1
MAX_MS = 3_600_000.0  # bound of the latency fields (ms)


def trace_id(session_id: str, epoch: int, seq: int) -> str:
    """The MQTT 5 user property ``trace`` of a request and of the verdict answering it."""
    return f"{session_id}/{epoch}/{seq}"


INSTANCE_LEN = 16  # hex chars (64 bits)
TAG_LEN = 32  # hex chars (128 bits of HMAC-SHA256)


def session_instance(open_: OpenSession) -> str:
    """The instance id of the generation an open describes (hex, both sides compute it).

    Bound to everything that determines the target's output: a generation
    with another prompt, sampling, limit or tokenizer is another instance even
    under the same session id, and the device's nonce separates two
    generations of the same prompt.
    """
    body = [
        1,
        open_.device_id,
        open_.session_id,
        open_.nonce,
        open_.tokenizer,
        list(open_.prompt),
        open_.sampling.to_wire(),
        open_.max_new_tokens,
        sorted(set(open_.stop_ids)),
    ]
    return hashlib.sha256(msgpack.packb(body)).hexdigest()[:INSTANCE_LEN]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences (an ``opened`` verdict's
    ``base`` is this between the truth and the claim)."""
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):  # the common case, compared at C speed
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def tokens_digest(tokens: Sequence[int], start: Any = None) -> Any:
    """A running SHA-256 over token ids (``start``: a digest object to continue)."""
    h = start if start is not None else hashlib.sha256()
    if tokens:
        h.update(struct.pack(f"<{len(tokens)}I", *tokens))
    return h


def commit_tag(key: bytes, instance: str, n_tokens: int, digest: Any) -> str:
    """MAC over (instance, committed tokens): verifiers sharing ``key`` can check a claim.

    ``digest`` is :func:`tokens_digest` of exactly ``n_tokens`` committed tokens.
    """
    msg = f"mw-commit/1|{instance}|{n_tokens}|".encode() + digest.copy().digest()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()[:TAG_LEN]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How tokens are chosen.  ``greedy`` ignores the rest."""

    mode: Mode = "greedy"
    seed: int = 0
    temperature: float = 1.0
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1.0 disables

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ProtocolError(f"sampling.mode: {self.mode!r} not one of {MODES}")
        if not 0 <= self.seed < (1 << 63):
            raise ProtocolError("sampling.seed out of range")
        if not 1e-4 <= self.temperature <= 100.0:
            raise ProtocolError("sampling.temperature outside [1e-4, 100]")
        if not 0 <= self.top_k <= 1 << 20:
            raise ProtocolError("sampling.top_k out of range")
        if not 0.0 < self.top_p <= 1.0:
            raise ProtocolError("sampling.top_p outside (0, 1]")

    def to_wire(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "seed": self.seed,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
        }

    @classmethod
    def from_wire(cls, d: Any, limits: Limits = DEFAULT_LIMITS) -> Self:
        if not isinstance(d, dict):
            raise ProtocolError("sampling: expected a map")
        f = Fields(d, "sampling", limits)
        return cls(
            mode=f.choice("mode", MODES, "greedy"),  # type: ignore[arg-type]
            seed=f.int("seed", 0, (1 << 63) - 1, 0),
            temperature=f.float("temperature", 1e-4, 100.0, 1.0),
            top_k=f.int("top_k", 0, 1 << 20, 0),
            top_p=f.float("top_p", 0.0, 1.0, 1.0),  # 0 is refused by __post_init__
        )


@dataclass(frozen=True, slots=True)
class OpenSession:
    """Device -> verifiers: open (or re-open) a session.

    ``committed`` carries tokens already committed in an earlier epoch, so a
    verifier that never saw the session (or lost it) rebuilds it by prefill.
    """

    TYPE: ClassVar[str] = "open"

    session_id: str
    device_id: str
    epoch: int
    seq: int
    tokenizer: str  # fingerprint; must equal the verifier's
    prompt: tuple[int, ...]
    committed: tuple[int, ...] = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 128
    stop_ids: tuple[int, ...] = ()
    drafter: str = ""  # free-text description, for metrics
    sent_at: float = 0.0  # sender's clock, ms; echoed back for RTT
    nonce: str = ""  # drawn by the device per generation; part of the instance id
    tag: str = ""  # MAC of ``committed`` from a verdict (rejection mode's proof), or ""

    def __post_init__(self) -> None:
        check_id(self.session_id, "open.session_id")
        if len(self.nonce) > 64 or len(self.tag) > 64:
            raise ProtocolError("open: nonce or tag too long")
        check_id(self.device_id, "open.device_id")
        if not 0 <= self.epoch <= MAX_EPOCH or not 0 <= self.seq <= MAX_SEQ:
            raise ProtocolError("open: epoch or seq out of range")
        if not self.prompt:
            raise ProtocolError("open.prompt: empty")
        if not 1 <= self.max_new_tokens <= DEFAULT_LIMITS.max_context_tokens:
            raise ProtocolError("open.max_new_tokens out of range")

    def encode(self) -> bytes:
        return pack(
            self.TYPE,
            {
                "sid": self.session_id,
                "dev": self.device_id,
                "epoch": self.epoch,
                "seq": self.seq,
                "tok": self.tokenizer,
                "prompt": list(self.prompt),
                "committed": list(self.committed),
                "sampling": self.sampling.to_wire(),
                "max_new": self.max_new_tokens,
                "stop": list(self.stop_ids),
                "drafter": self.drafter,
                "ts": self.sent_at,
                "nonce": self.nonce,
                "tag": self.tag,
            },
        )

    @classmethod
    def from_wire(cls, d: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> Self:
        f = Fields(d, cls.TYPE, limits)
        prompt = f.tokens("prompt", limits.max_context_tokens)
        committed = f.tokens("committed", limits.max_context_tokens, ())
        if len(prompt) + len(committed) > limits.max_context_tokens:
            raise ProtocolError("open: prompt + committed exceed max_context_tokens")
        return cls(
            session_id=f.id("sid"),
            device_id=f.id("dev"),
            epoch=f.int("epoch", 0, MAX_EPOCH),
            seq=f.int("seq", 0, MAX_SEQ),
            tokenizer=f.str("tok"),
            prompt=prompt,
            committed=committed,
            sampling=SamplingParams.from_wire(f.raw("sampling", {}), limits),
            max_new_tokens=f.int("max_new", 1, limits.max_context_tokens, 128),
            stop_ids=f.tokens("stop", 64, ()),
            drafter=f.str("drafter", ""),
            sent_at=f.float("ts", 0.0, 1e16, 0.0),
            nonce=f.str("nonce", "", 64),
            tag=f.str("tag", "", 64),
        )


@dataclass(frozen=True, slots=True)
class SparseDist:
    """A draft token's distribution as sparse top-k (ids, probabilities)."""

    ids: tuple[int, ...]
    probs: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.probs) or not self.ids:
            raise ProtocolError("draft.q: ids and probs must be non-empty and of equal length")
        if sum(self.probs) > 1.0 + 1e-3:
            raise ProtocolError("draft.q: probabilities sum above 1")


@dataclass(frozen=True, slots=True)
class Draft:
    """Device -> owning verifier: draft tokens extending ``base`` committed tokens."""

    TYPE: ClassVar[str] = "draft"

    session_id: str
    epoch: int
    seq: int
    base: int
    tokens: tuple[int, ...]
    q: tuple[SparseDist, ...] = ()  # rejection mode only: one per draft token
    sent_at: float = 0.0
    # For the verifier's latency model (0 = unknown): ms between the verdict this draft
    # follows and its sending, and the device's drafting time per token in ms.
    think_ms: float = 0.0
    token_ms: float = 0.0

    def __post_init__(self) -> None:
        check_id(self.session_id, "draft.session_id")
        if not 0.0 <= self.think_ms <= MAX_MS or not 0.0 <= self.token_ms <= MAX_MS:
            raise ProtocolError("draft: think/tms out of range")
        if not 0 <= self.epoch <= MAX_EPOCH or not 0 <= self.seq <= MAX_SEQ:
            raise ProtocolError("draft: epoch or seq out of range")
        if self.base < 0:
            raise ProtocolError("draft.base: negative")
        if self.q and len(self.q) != len(self.tokens):
            raise ProtocolError("draft.q: one distribution per draft token required")

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "sid": self.session_id,
            "epoch": self.epoch,
            "seq": self.seq,
            "base": self.base,
            "tokens": list(self.tokens),
            "ts": self.sent_at,
        }
        if self.think_ms:
            body["think"] = self.think_ms
        if self.token_ms:
            body["tms"] = self.token_ms
        if self.q:
            body["q"] = [[list(d.ids), list(d.probs)] for d in self.q]
        return pack(self.TYPE, body)

    @classmethod
    def from_wire(cls, d: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> Self:
        f = Fields(d, cls.TYPE, limits)
        tokens = f.tokens("tokens", limits.max_draft_tokens)
        q_raw = f.raw("q", [])
        if not isinstance(q_raw, list) or len(q_raw) > limits.max_draft_tokens:
            raise ProtocolError("draft.q: expected a list")
        q = []
        for item in q_raw:
            if not isinstance(item, list) or len(item) != 2:
                raise ProtocolError("draft.q: each entry is [ids, probs]")
            qf = Fields({"ids": item[0], "probs": item[1]}, "draft.q", limits)
            q.append(
                SparseDist(
                    qf.tokens("ids", limits.max_topk), qf.floats("probs", limits.max_topk, 0.0, 1.0)
                )
            )
        return cls(
            session_id=f.id("sid"),
            epoch=f.int("epoch", 0, MAX_EPOCH),
            seq=f.int("seq", 0, MAX_SEQ),
            base=f.int("base", 0, limits.max_context_tokens),
            tokens=tokens,
            q=tuple(q),
            sent_at=f.float("ts", 0.0, 1e16, 0.0),
            think_ms=f.float("think", 0.0, MAX_MS, 0.0),
            token_ms=f.float("tms", 0.0, MAX_MS, 0.0),
        )


@dataclass(frozen=True, slots=True)
class Verdict:
    """Verifier -> device: the answer to an open or a draft.

    ``tokens`` are committed tokens starting at committed position ``base``;
    after applying them the device's committed length is ``committed_len``.
    For ``accept``, ``accepted`` draft tokens were taken and the last token of
    ``tokens`` is the target's own (correction or bonus).  For ``opened``,
    ``base``/``tokens`` give the proven truth where it differs from the open's
    claim: committed tokens from ``base`` on are ``tokens`` (a device whose
    committed tokens go past ``base`` rolls them back).  ``inst`` is the
    session instance; ``tag`` the MAC of the ``committed_len`` committed tokens
    (all modes; the only proof rejection-sampled tokens have).
    """

    TYPE: ClassVar[str] = "verdict"

    session_id: str
    epoch: int
    seq: int
    kind: VerdictKind
    base: int = 0
    accepted: int = 0
    tokens: tuple[int, ...] = ()
    committed_len: int = 0
    done: bool = False
    finish_reason: str = ""  # "stop" | "length" when done
    reason: str = ""  # human-readable, for resync/refused
    next_len: int = 0  # speculation-length hint for the next round, 0 = none
    verifier_id: str = ""
    echo_ts: float = 0.0  # the request's sent_at, for RTT
    lossy: bool = False  # true only in the opt-in relaxed acceptance mode
    instance: str = ""
    tag: str = ""

    def __post_init__(self) -> None:
        check_id(self.session_id, "verdict.session_id")
        if self.kind not in VERDICT_KINDS:
            raise ProtocolError(f"verdict.kind: {self.kind!r}")
        if self.accepted < 0 or self.base < 0 or self.committed_len < 0:
            raise ProtocolError("verdict: negative counter")
        if (
            self.kind in ("accept", "catchup") or (self.kind == "opened" and self.tokens)
        ) and self.base + len(self.tokens) != self.committed_len:
            raise ProtocolError("verdict: base + len(tokens) != committed_len")

    def encode(self) -> bytes:
        return pack(
            self.TYPE,
            {
                "sid": self.session_id,
                "epoch": self.epoch,
                "seq": self.seq,
                "kind": self.kind,
                "base": self.base,
                "acc": self.accepted,
                "tokens": list(self.tokens),
                "clen": self.committed_len,
                "done": self.done,
                "fin": self.finish_reason,
                "reason": self.reason,
                "next": self.next_len,
                "vid": self.verifier_id,
                "ts": self.echo_ts,
                "lossy": self.lossy,
                "inst": self.instance,
                "tag": self.tag,
            },
        )

    @classmethod
    def from_wire(cls, d: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> Self:
        f = Fields(d, cls.TYPE, limits)
        vid = f.str("vid", "", 64)
        return cls(
            session_id=f.id("sid"),
            epoch=f.int("epoch", 0, MAX_EPOCH),
            seq=f.int("seq", 0, MAX_SEQ),
            kind=f.choice("kind", VERDICT_KINDS),  # type: ignore[arg-type]
            base=f.int("base", 0, limits.max_context_tokens, 0),
            accepted=f.int("acc", 0, limits.max_draft_tokens, 0),
            tokens=f.tokens("tokens", limits.max_context_tokens, ()),
            committed_len=f.int("clen", 0, limits.max_context_tokens, 0),
            done=f.bool("done", False),
            finish_reason=f.str("fin", "", 32),
            reason=f.str("reason", ""),
            next_len=f.int("next", 0, limits.max_draft_tokens, 0),
            verifier_id=vid,
            echo_ts=f.float("ts", 0.0, 1e16, 0.0),
            lossy=f.bool("lossy", False),
            instance=f.str("inst", "", 64),
            tag=f.str("tag", "", 64),
        )


@dataclass(frozen=True, slots=True)
class SessionState:
    """Verifier -> retained ``session/{device}/{id}/state``: the committed tokens, as a hint.

    Anyone who may write the topic could have written it, so nobody trusts it:
    a re-opening device of the same ``instance`` adds the tokens it missed to
    its open's claim, and the verifier proves them before they count.
    """

    TYPE: ClassVar[str] = "state"

    session_id: str
    device_id: str
    epoch: int
    owner: str  # verifier id
    status: Literal["open", "done", "closed"]
    committed: tuple[int, ...]
    prompt_len: int = 0
    finish_reason: str = ""
    updated_at: float = 0.0  # unix seconds
    instance: str = ""
    tag: str = ""  # MAC of ``committed`` (all modes)

    def __post_init__(self) -> None:
        check_id(self.session_id, "state.session_id")
        if self.status not in ("open", "done", "closed"):
            raise ProtocolError(f"state.status: {self.status!r}")

    def encode(self) -> bytes:
        return pack(
            self.TYPE,
            {
                "sid": self.session_id,
                "dev": self.device_id,
                "epoch": self.epoch,
                "owner": self.owner,
                "status": self.status,
                "committed": list(self.committed),
                "plen": self.prompt_len,
                "fin": self.finish_reason,
                "at": self.updated_at,
                "inst": self.instance,
                "tag": self.tag,
            },
        )

    @classmethod
    def from_wire(cls, d: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> Self:
        f = Fields(d, cls.TYPE, limits)
        return cls(
            session_id=f.id("sid"),
            device_id=f.id("dev"),
            epoch=f.int("epoch", 0, MAX_EPOCH),
            owner=f.str("owner", "", 64),
            status=f.choice("status", ("open", "done", "closed")),  # type: ignore[arg-type]
            committed=f.tokens("committed", limits.max_context_tokens),
            prompt_len=f.int("plen", 0, limits.max_context_tokens, 0),
            finish_reason=f.str("fin", "", 32),
            updated_at=f.float("at", 0.0, 1e12, 0.0),
            instance=f.str("inst", "", 64),
            tag=f.str("tag", "", 64),
        )


@dataclass(frozen=True, slots=True)
class CloseSession:
    """Device -> verifier: the device is finished with the session; free its cache."""

    TYPE: ClassVar[str] = "close"

    session_id: str
    epoch: int
    seq: int
    reason: str = ""

    def __post_init__(self) -> None:
        check_id(self.session_id, "close.session_id")

    def encode(self) -> bytes:
        return pack(
            self.TYPE,
            {"sid": self.session_id, "epoch": self.epoch, "seq": self.seq, "reason": self.reason},
        )

    @classmethod
    def from_wire(cls, d: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> Self:
        f = Fields(d, cls.TYPE, limits)
        return cls(
            session_id=f.id("sid"),
            epoch=f.int("epoch", 0, MAX_EPOCH),
            seq=f.int("seq", 0, MAX_SEQ),
            reason=f.str("reason", ""),
        )
