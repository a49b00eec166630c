"""Hostile traffic for the abuse test: fuzzed payloads and crafted attacks, each with the
verifier's expected reaction.

:func:`fuzz_corpus` mutates valid ``open``/``draft``/``close`` encodings with
knowledge of their structure (drop, add or retype a field; extreme, negative,
huge or wrongly typed values; token lists that are too long, out of range or
not ints; foreign type tags and schema versions; deep nesting), adds random
msgpack values and byte-level damage (truncation, bit flips, splices), and
publishes each on an open or draft topic of the hostile device.

:func:`expected` is the oracle: what the verifier must do with a message it
receives on a topic, for sessions it does not know (every fuzzed session id is
fresh): the rejection reason it counts, ``None`` when it must ignore the message
silently, or :data:`OPENS` when the message is a valid open that would create a
session (such mutants are left out of the corpus, so the outcome of every
message sent is known in advance).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack

from middleware.errors import ProtocolError, TopicError
from middleware.protocol import (
    CloseSession,
    Draft,
    Limits,
    OpenSession,
    SamplingParams,
    Topics,
    decode,
)
from middleware.protocol.session import SparseDist

OPENS = "opens-a-session"


@dataclass(frozen=True, slots=True)
class Hostile:
    topic: str
    payload: bytes
    kind: str  # which generator made it
    expect: str | None  # the rejection reason the verifier must count; None: ignored silently


def expected(
    topics: Topics, topic: str, payload: bytes, *, limits: Limits, vocab: int, fingerprint: str
) -> str | None:
    """The verifier's reaction to ``payload`` on ``topic`` for a session it does not know."""
    try:
        ref = topics.parse(topic)
    except TopicError:
        return "bad_topic"
    value: Any
    try:
        value = decode(payload, limits, expect=(OpenSession, Draft, CloseSession))
    except ProtocolError:
        return "malformed"
    if value.session_id != ref.ident:
        return "malformed"
    if isinstance(value, OpenSession) and ref.leaf == "open":
        if value.device_id != ref.device:
            return "malformed"
        if value.tokenizer != fingerprint:
            return "tokenizer_mismatch"
        if any(t >= vocab for t in (*value.prompt, *value.committed)):
            return "token_out_of_range"
        return OPENS
    if ref.leaf == "draft" and isinstance(value, Draft):
        return "unknown_session"
    if ref.leaf == "draft" and isinstance(value, CloseSession):
        return None  # a close of an unknown session is a no-op
    return "malformed"


# --- valid seeds -----------------------------------------------------------------------
def seeds(
    rng: random.Random, device: str, sid: str, fingerprint: str, vocab: int
) -> list[tuple[str, Any]]:
    """Valid messages of one fresh session, as (leaf, message)."""
    prompt = tuple(rng.randrange(3, vocab) for _ in range(rng.randrange(1, 12)))
    toks = tuple(rng.randrange(vocab) for _ in range(rng.randrange(0, 8)))
    sampling = rng.choice(
        [
            SamplingParams(),
            SamplingParams("coupled", seed=7, temperature=0.8, top_k=20),
            SamplingParams("rejection", seed=3, top_p=0.9),
        ]
    )
    return [
        (
            "open",
            OpenSession(
                session_id=sid,
                device_id=device,
                epoch=rng.randrange(1, 9),
                seq=1,
                tokenizer=fingerprint,
                prompt=prompt,
                committed=toks[:3],
                sampling=sampling,
                max_new_tokens=rng.randrange(1, 200),
                stop_ids=(2,),
                drafter="fuzz",
                sent_at=1.7e12,
            ),
        ),
        (
            "draft",
            Draft(
                sid,
                rng.randrange(1, 9),
                rng.randrange(1, 1000),
                rng.randrange(0, 40),
                toks,
                sent_at=1.7e12,
            ),
        ),
        (
            "draft",
            Draft(
                sid, 1, 2, 0, toks[:2], q=tuple(SparseDist((t, 5), (0.6, 0.3)) for t in toks[:2])
            ),
        ),
        ("draft", CloseSession(sid, 1, 9, reason="done")),
    ]


# --- mutations -------------------------------------------------------------------------
def _weird(rng: random.Random) -> Any:
    """A value of a surprising type or size."""
    return rng.choice(
        [
            None,
            True,
            False,
            0,
            -1,
            -(2**63),
            2**64 - 1,
            2**31,
            1.5,
            float("nan"),
            float("inf"),
            -0.0,
            "",
            "x" * rng.randrange(1, 5000),
            "\u0000\ud7ff\uffff",
            "../../#",
            b"\x00\xff" * 10,
            [],
            [None],
            [[1, 2], [3]],
            {},
            {"a": 1},
            {1: 2},
            list(range(rng.randrange(0, 600))),
            [rng.randrange(-5, 2**25) for _ in range(rng.randrange(1, 20))],
            [1.0, 2.5],
            ["1", "2"],
            [True, False],
        ]
    )


def _mutate_map(rng: random.Random, d: dict[str, Any]) -> dict[str, Any]:
    d = dict(d)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(8)
        keys = list(d)
        if op == 0 and keys:
            d.pop(rng.choice(keys))
        elif op == 1:
            d[rng.choice(["zzz", "extra", "t2", "v2", ""])] = _weird(rng)
        elif op == 2 and keys:
            d[rng.choice(keys)] = _weird(rng)
        elif op == 3:
            d["t"] = rng.choice(
                [
                    "verdict",
                    "state",
                    "text",
                    "result",
                    "device_status",
                    "open",
                    "draft",
                    "close",
                    "nope",
                    "",
                    "x" * 40,
                ]
            )
        elif op == 4:
            d["v"] = rng.choice([0, 2, -1, True, 1.0, "1", None, 2**40])
        elif op == 5:
            k = rng.choice(["prompt", "committed", "tokens", "stop"])
            d[k] = rng.choice(
                [
                    list(range(rng.choice([257, 5000, 40000]))),
                    [2**24],
                    [-1],
                    [96, 97, 10**6],
                    ["a"],
                    [[1]],
                    7,
                    None,
                    [1.0],
                    [True],
                ]
            )
        elif op == 6:
            k = rng.choice(["epoch", "seq", "base", "max_new", "ts", "sid", "dev"])
            d[k] = rng.choice(
                [
                    -1,
                    2**62,
                    2**31,
                    10**9,
                    1e300,
                    "s",
                    None,
                    [],
                    "bad id!",
                    "x" * 65,
                    "ok-id",
                    "s" * 64,
                ]
            )
        else:
            d["sampling"] = rng.choice(
                [
                    {"mode": "evil"},
                    {"temperature": 0},
                    {"top_p": 0},
                    {"top_k": -1},
                    [],
                    "greedy",
                    {"seed": -1},
                    {"mode": "greedy"},
                ]
            )
    return d


def _damage(rng: random.Random, b: bytes) -> bytes:
    op = rng.randrange(4)
    if op == 0 and len(b) > 1:
        return b[: rng.randrange(1, len(b))]  # truncated
    if op == 1:
        out = bytearray(b)
        for _ in range(rng.randrange(1, 6)):
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        return bytes(out)
    if op == 2:
        i = rng.randrange(len(b) + 1)
        return b[:i] + rng.randbytes(rng.randrange(1, 32)) + b[i:]
    i, j = sorted(rng.randrange(len(b) + 1) for _ in range(2))
    return b[:i] + b[i:j] * rng.randrange(2, 5) + b[j:]


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    if depth > 3 or rng.random() < 0.4:
        return _weird(rng)
    if rng.random() < 0.5:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    return {
        str(rng.randrange(100)): _random_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))
    }


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True, strict_types=False)


def fuzz_corpus(
    n: int,
    *,
    topics: Topics,
    device: str,
    fingerprint: str,
    vocab: int,
    limits: Limits,
    seed: int = 0,
) -> tuple[list[Hostile], int]:
    """``n`` fuzzed messages with a known outcome, and how many valid opens were left out."""
    rng = random.Random(seed)
    out: list[Hostile] = []
    left_out = 0
    k = 0
    while len(out) < n:
        k += 1
        sid = f"fz-{k}"
        leaf, msg = rng.choice(seeds(rng, device, sid, fingerprint, vocab))
        base = msg.encode()
        r = rng.random()
        if r < 0.45:
            kind = "mutated-fields"
            payload = _pack(_mutate_map(rng, msgpack.unpackb(base, raw=False)))
        elif r < 0.75:
            kind = "damaged-bytes"
            payload = _damage(rng, base)
        elif r < 0.9:
            kind = "random-msgpack"
            payload = _pack(_random_value(rng))
        elif r < 0.95:
            kind = "deep-nesting"
            payload = b"\x91" * rng.choice([100, 1000, 100_000]) + b"\xc0"
        else:
            kind = "random-bytes"
            payload = rng.randbytes(rng.randrange(1, 300))
        if not payload:
            continue
        if rng.random() < 0.1:  # the wrong leaf for the message
            leaf = "draft" if leaf == "open" else "open"
        topic = topics.session(device, sid, leaf)  # type: ignore[arg-type]
        if rng.random() < 0.01:  # a level that is not a valid id
            topic = f"{topics.prefix}/session/{rng.choice(['bad id', 'x' * 70, 'ü'])}/{sid}/{leaf}"
        exp = expected(topics, topic, payload, limits=limits, vocab=vocab, fingerprint=fingerprint)
        if exp == OPENS:
            left_out += 1
            continue
        out.append(Hostile(topic, payload, kind, exp))
    return out, left_out


Make = Callable[[int], Hostile]


def attacks(
    topics: Topics,
    *,
    attacker: str,
    victim: str,
    victim_sessions: list[str],
    victim_epoch: int,
    fingerprint: str,
    vocab: int,
    max_draft: int,
    per_kind: int,
    seed: int = 0,
) -> Iterator[Hostile]:
    """Crafted attacks, ``per_kind`` of each, against a victim device whose sessions are open at
    ``victim_epoch`` with nothing committed (and none of which the attacker may touch)."""
    rng = random.Random(seed)

    def vs() -> str:
        return rng.choice(victim_sessions)

    def on(device: str, sid: str, leaf: str) -> str:
        return topics.session(device, sid, leaf)  # type: ignore[arg-type]

    def open_(sid: str, device: str, **kw: Any) -> bytes:
        args: dict[str, Any] = {
            "session_id": sid,
            "device_id": device,
            "epoch": 1,
            "seq": 1,
            "tokenizer": fingerprint,
            "prompt": (1, 5, 9),
        }
        return OpenSession(**{**args, **kw}).encode()

    kinds: list[tuple[str, str | None, Make]] = [
        # oversized: just under the broker's 1 MiB packet limit, beyond every decode bound
        (
            "oversized-draft",
            "malformed",
            lambda i: Hostile(
                on(attacker, f"big-{i}", "draft"),
                _pack(
                    {
                        "v": 1,
                        "t": "draft",
                        "sid": f"big-{i}",
                        "epoch": 1,
                        "seq": 1,
                        "base": 0,
                        "tokens": [7] * 400_000,
                    }
                ),
                "",
                None,
            ),
        ),
        (
            "oversized-bytes",
            "malformed",
            lambda i: Hostile(on(attacker, f"big-{i}", "open"), rng.randbytes(900_000), "", None),
        ),
        (
            "oversized-string",
            "malformed",
            lambda i: Hostile(
                on(attacker, f"big-{i}", "open"),
                _pack(
                    {
                        "v": 1,
                        "t": "open",
                        "sid": f"big-{i}",
                        "dev": attacker,
                        "epoch": 1,
                        "seq": 1,
                        "tok": "x" * 900_000,
                        "prompt": [1],
                    }
                ),
                "",
                None,
            ),
        ),
        # token ids the vocabulary does not have (but the protocol's id range does)
        (
            "out-of-vocab-draft",
            "token_out_of_range",
            lambda i: Hostile(
                on(victim, (s := vs()), "draft"),
                Draft(
                    s, victim_epoch, 10_000 + i, 0, (3, vocab + rng.randrange(0, 2**20))
                ).encode(),
                "",
                None,
            ),
        ),
        (
            "out-of-vocab-open",
            "token_out_of_range",
            lambda i: Hostile(
                on(attacker, f"oov-{i}", "open"),
                open_(f"oov-{i}", attacker, prompt=(1, vocab + i)),
                "",
                None,
            ),
        ),
        (
            "token-id-beyond-protocol",
            "malformed",
            lambda i: Hostile(
                on(victim, (s := vs()), "draft"),
                _pack(
                    {
                        "v": 1,
                        "t": "draft",
                        "sid": s,
                        "epoch": victim_epoch,
                        "seq": 1,
                        "base": 0,
                        "tokens": [1, 2**24 + i],
                    }
                ),
                "",
                None,
            ),
        ),
        # absurd lengths and positions
        (
            "draft-too-long",
            "draft_too_long",
            lambda i: Hostile(
                on(victim, (s := vs()), "draft"),
                Draft(
                    s, victim_epoch, 20_000 + i, 0, tuple([3] * rng.randrange(max_draft + 1, 257))
                ).encode(),
                "",
                None,
            ),
        ),
        (
            "draft-beyond-protocol",
            "malformed",
            lambda i: Hostile(
                on(victim, (s := vs()), "draft"),
                _pack(
                    {
                        "v": 1,
                        "t": "draft",
                        "sid": s,
                        "epoch": victim_epoch,
                        "seq": 1,
                        "base": 0,
                        "tokens": [3] * rng.randrange(257, 20_000),
                    }
                ),
                "",
                None,
            ),
        ),
        (
            "base-far-ahead",
            "ahead",
            lambda i: Hostile(
                on(victim, (s := vs()), "draft"),
                Draft(s, victim_epoch, 30_000 + i, rng.randrange(1, 32_768), (3,)).encode(),
                "",
                None,
            ),
        ),
        # sessions that do not exist, epochs that are over
        (
            "unknown-session",
            "unknown_session",
            lambda i: Hostile(
                on(attacker, f"ghost-{i}", "draft"),
                Draft(f"ghost-{i}", 1, 1, 0, (3,)).encode(),
                "",
                None,
            ),
        ),
        (
            "stale-epoch-draft",
            "stale_epoch",
            lambda i: Hostile(
                on(victim, (s := vs()), "draft"),
                Draft(s, rng.randrange(0, victim_epoch), 1, 0, (3,)).encode(),
                "",
                None,
            ),
        ),
        (
            # an open with an older epoch and another prompt (another instance): the victim's
            # session is live, so it is refused as "in use", never applied
            "stale-epoch-open",
            "session_taken",
            lambda i: Hostile(
                on(victim, (s := vs()), "open"),
                open_(s, victim, epoch=rng.randrange(0, victim_epoch)),
                "",
                None,
            ),
        ),
        (
            "future-epoch-draft",
            None,
            lambda i: Hostile(  # ignored: in scale-out another verifier owns it
                on(victim, (s := vs()), "draft"),
                Draft(s, victim_epoch + 1 + i, 1, 0, (3,)).encode(),
                "",
                None,
            ),
        ),
        # another device's session ids, from the attacker's own topics: session ids are per
        # device, so these name the attacker's own (unknown) sessions and touch nothing of the
        # victim's.  (An open there would simply open a session of the attacker's own.)
        (
            "foreign-draft",
            "unknown_session",
            lambda i: Hostile(
                on(attacker, (s := vs()), "draft"),
                Draft(s, victim_epoch, 40_000 + i, 0, (3,)).encode(),
                "",
                None,
            ),
        ),
        (
            "foreign-close",
            None,
            lambda i: Hostile(
                on(attacker, (s := vs()), "draft"),
                CloseSession(s, victim_epoch, 1, "evil").encode(),
                "",
                None,
            ),
        ),
        (
            "tokenizer-mismatch",
            "tokenizer_mismatch",
            lambda i: Hostile(
                on(attacker, f"tok-{i}", "open"),
                open_(f"tok-{i}", attacker, tokenizer="other-tokenizer"),
                "",
                None,
            ),
        ),
        (
            "device-id-mismatch",
            "malformed",
            lambda i: Hostile(on(attacker, f"dm-{i}", "open"), open_(f"dm-{i}", victim), "", None),
        ),
    ]
    for name, reason, make in kinds:
        for i in range(per_kind):
            h = make(i)
            yield Hostile(h.topic, h.payload, name, reason)
