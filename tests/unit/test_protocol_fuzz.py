"""Fuzzing decode(): untrusted bytes yield a valid message or ProtocolError, nothing else.

Every accepted input must also be a *closed* value: re-encoding it and decoding
again gives the same message (no NaN, no lone surrogates, no out-of-range field
that the encoder would choke on later).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from middleware.errors import ProtocolError
from middleware.protocol import (
    DEFAULT_LIMITS,
    MESSAGE_TYPES,
    CloseSession,
    DeviceStatus,
    Draft,
    Limits,
    OpenSession,
    PromptRequest,
    Result,
    SamplingParams,
    SessionState,
    SparseDist,
    TextChunk,
    Verdict,
    VerifierStatus,
    decode,
)

L = DEFAULT_LIMITS
FUZZ = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

CORPUS: list[Any] = [
    OpenSession("s-1", "pi-1", 0, 0, "sha:abc", (1, 2, 3)),
    OpenSession(
        "sess.2",
        "dev:2",
        3,
        17,
        "fp",
        (5,) * 20,
        committed=(9, 8, 7),
        sampling=SamplingParams("coupled", seed=42, temperature=0.7, top_k=40, top_p=0.9),
        max_new_tokens=64,
        stop_ids=(2,),
        drafter="ngram",
        sent_at=1.7e12,
    ),
    Draft("s-1", 0, 1, 3, (10, 11, 12, 13), sent_at=12.5),
    Draft("s-1", 1, 2, 0, (4, 5), q=(SparseDist((4, 6), (0.6, 0.3)), SparseDist((5,), (0.99,)))),
    Draft("s-1", 0, 0, 0, ()),
    Verdict(
        "s-1",
        0,
        1,
        "accept",
        base=3,
        accepted=2,
        tokens=(10, 11, 99),
        committed_len=6,
        next_len=4,
        verifier_id="v-1",
        echo_ts=12.5,
    ),
    Verdict("s-1", 0, 1, "catchup", base=0, tokens=(1, 2), committed_len=2),
    Verdict("s-1", 0, 1, "resync", reason="unknown session", committed_len=9),
    Verdict(
        "s-1",
        2,
        5,
        "accept",
        base=1,
        tokens=(3,),
        committed_len=2,
        done=True,
        finish_reason="stop",
        lossy=True,
    ),
    SessionState("s-1", "pi-1", 0, "v-1", "open", (1, 2, 3), prompt_len=5, updated_at=1.7e9),
    SessionState("s-1", "pi-1", 4, "v-2", "done", (), finish_reason="length"),
    CloseSession("s-1", 0, 9, reason="done"),
    DeviceStatus(
        "pi-1",
        "online",
        drafter="ngram",
        tokenizer="fp",
        sessions=("s-1", "s-2"),
        stats={"acceptance_rate": 0.75, "rounds": 12.0},
        at=1.7e9,
    ),
    DeviceStatus("pi-1", "offline"),
    VerifierStatus("v-1", "degraded", model="smollm2", sessions=3, stats={"x": -1.5}),
    TextChunk("s-1", "pi-1", 0, "verified", 0, 3, "Hello, wörld \u2603"),
    TextChunk("s-1", "pi-1", 7, "correction", 12, 2, "", final=True, lossy=True),
    Result("s-1", "pi-1", "The end.", 42, "stop", True, stats={"tok_s": 12.0}),
    PromptRequest("Tell me a joke"),
    PromptRequest("{json-looking}", session_id="s-9", max_new_tokens=16, chat=False),
]
SEEDS = [m.encode() for m in CORPUS]


def check_decode(data: bytes, limits: Limits = L) -> Any:
    """decode() must return a closed, valid message or raise ProtocolError; nothing else."""
    try:
        msg = decode(data, limits)
    except ProtocolError:
        return None
    assert type(msg) in MESSAGE_TYPES.values()
    again = msg.encode()
    assert decode(again) == msg
    return msg


def check_parse(data: bytes) -> Any:
    try:
        msg = PromptRequest.parse(data)
    except ProtocolError:
        return None
    assert isinstance(msg, PromptRequest)
    assert PromptRequest.parse(msg.encode()) == msg
    return msg


def test_corpus_is_valid() -> None:
    for m, data in zip(CORPUS, SEEDS, strict=True):
        assert decode(data) == m
    assert {m.TYPE for m in CORPUS} == set(MESSAGE_TYPES)


# --- random bytes ------------------------------------------------------------------------------

_HEADS = [
    b"",
    b"\x80",
    b"\x82",
    b"\x8f",
    b"\xde\x00\x10",
    b"\xdf\x00\x00\x00\x03",
    b"{",
    b'{"v":1,',
    b'{"v":1,"t":"',
    b"\x82\xa1v\x01\xa1t",
    b"\x83\xa1v\x01\xa1t\xa5draft",
]


def test_random_bytes_seeded() -> None:
    rng = random.Random(20240501)
    accepted = 0
    for i in range(12_000):
        head = _HEADS[i % len(_HEADS)]
        data = head + rng.randbytes(rng.randrange(0, 96))
        if check_decode(data) is not None:
            accepted += 1
        check_parse(data)
    # almost all random bytes are garbage; the count is for the log, not a bound
    print(f"random bytes accepted: {accepted}/12000")


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_hypothesis(data: bytes) -> None:
    check_decode(data)
    check_parse(data)


# --- byte-level mutations of valid encodings ----------------------------------------------------


def _bitflip(rng: random.Random, b: bytearray) -> bytearray:
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return b


def _truncate(rng: random.Random, b: bytearray) -> bytearray:
    return b[: rng.randrange(len(b))]


def _insert(rng: random.Random, b: bytearray) -> bytearray:
    i = rng.randrange(len(b) + 1)
    return b[:i] + bytearray(rng.randbytes(rng.randint(1, 8))) + b[i:]


def _delete(rng: random.Random, b: bytearray) -> bytearray:
    i = rng.randrange(len(b))
    return b[:i] + b[i + rng.randint(1, 8) :]


def _byte_set(rng: random.Random, b: bytearray) -> bytearray:
    i = rng.randrange(len(b))
    b[i] = rng.choice(
        [
            0x00,
            0x7F,
            0x80,
            0xC0,
            0xC1,
            0xC4,
            0xCB,
            0xCF,
            0xD3,
            0xDC,
            0xDD,
            0xDE,
            0xDF,
            0xFF,
            ord("{"),
            ord('"'),
            ord("\\"),
        ]
    )
    return b


def _splice(rng: random.Random, b: bytearray) -> bytearray:
    other = rng.choice(SEEDS)
    i, j = rng.randrange(len(b) + 1), rng.randrange(len(other) + 1)
    return b[:i] + bytearray(other[j:])


BYTE_MUTATORS: list[Callable[[random.Random, bytearray], bytearray]] = [
    _bitflip,
    _truncate,
    _insert,
    _delete,
    _byte_set,
    _splice,
]


def test_byte_mutations_seeded() -> None:
    rng = random.Random(7)
    survived = 0
    for _ in range(12_000):
        b = bytearray(rng.choice(SEEDS))
        for _ in range(rng.randint(1, 3)):
            if not b:
                break
            b = rng.choice(BYTE_MUTATORS)(rng, b)
        if check_decode(bytes(b)) is not None:
            survived += 1
        check_parse(bytes(b))
    print(f"byte mutants still valid: {survived}/12000")


@FUZZ
@given(st.sampled_from(SEEDS), st.integers(0, 2**32), st.integers(1, 4))
def test_byte_mutations_hypothesis(seed: bytes, r: int, n: int) -> None:
    rng = random.Random(r)
    b = bytearray(seed)
    for _ in range(n):
        if not b:
            break
        b = rng.choice(BYTE_MUTATORS)(rng, b)
    check_decode(bytes(b))


# --- structure-level mutations (msgpack / JSON values of the wrong type or size) ----------------


def _deep(depth: int, leaf: Any = 0, as_map: bool = False) -> Any:
    v = leaf
    for _ in range(depth):
        v = {"k": v} if as_map else [v]
    return v


NASTY: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2**31,
    2**62,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
    float("nan"),
    float("inf"),
    float("-inf"),
    -0.0,
    1e308,
    5e-324,
    0.5,
    "",
    "x",
    "a/b",
    "a+b",
    "#",
    "+",
    "$share",
    "x" * 65,
    "x" * 5000,
    "\u0000",
    "é" * 70,
    b"",
    b"bytes",
    [],
    [1],
    [-1],
    [2**24],
    [True],
    [1.0],
    ["1"],
    [[1, 2], [0.5, 0.5]],
    {},
    {"a": 1},
    {"": float("nan")},
    {"mode": "greedy"},
    list(range(300)),
    _deep(200),
    _deep(200, as_map=True),
    _deep(400),
    msgpack.ExtType(5, b"xx"),
    msgpack.Timestamp(1, 2),
]


def _env(data: bytes) -> dict[str, Any]:
    return msgpack.unpackb(data, raw=False) if data[:1] != b"{" else json.loads(data)


def _pack(env: dict[str, Any], rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return msgpack.packb(env, use_bin_type=True)
    try:
        return json.dumps(env, allow_nan=True).encode()  # NaN/Infinity tokens on purpose
    except (TypeError, ValueError, RecursionError):  # bytes/ext/too deep: msgpack only
        return msgpack.packb(env, use_bin_type=True)


def _mutate_value(rng: random.Random, v: Any) -> Any:
    """Replace v or something inside it by a nasty value."""
    if isinstance(v, list) and v and rng.random() < 0.5:
        v = list(v)
        v[rng.randrange(len(v))] = _mutate_value(rng, v[rng.randrange(len(v))])
        return v
    if isinstance(v, dict) and v and rng.random() < 0.5:
        v = dict(v)
        k = rng.choice(list(v))
        v[k] = _mutate_value(rng, v[k])
        return v
    return rng.choice(NASTY)


def _mutate_env(rng: random.Random, env: dict[str, Any]) -> dict[str, Any]:
    env = dict(env)
    op = rng.randrange(6)
    key = rng.choice(list(env))
    if op == 0:
        del env[key]
    elif op == 1:
        env[rng.choice(["zz", "q", "committed", "sampling", "stats", "x" * 40])] = rng.choice(NASTY)
    elif op == 2:  # swap the type tag: a valid body under another message type
        env["t"] = rng.choice([*MESSAGE_TYPES, "", "nope", "x" * 40])
    else:
        env[key] = _mutate_value(rng, env[key])
    return env


def test_structure_mutations_seeded() -> None:
    rng = random.Random(11)
    valid = 0
    for _ in range(6_000):
        env = _env(rng.choice(SEEDS))
        for _ in range(rng.randint(1, 3)):
            env = _mutate_env(rng, env)
        if check_decode(_pack(env, rng)) is not None:
            valid += 1
    print(f"structure mutants still valid: {valid}/6000")


@FUZZ
@given(st.sampled_from(SEEDS), st.integers(0, 2**32))
def test_structure_mutations_hypothesis(seed: bytes, r: int) -> None:
    rng = random.Random(r)
    check_decode(_pack(_mutate_env(rng, _env(seed)), rng))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(FUZZ, max_examples=200)
@given(
    st.sampled_from(sorted(MESSAGE_TYPES)),
    st.dictionaries(
        st.sampled_from(
            [
                "sid",
                "dev",
                "device",
                "verifier",
                "session",
                "epoch",
                "seq",
                "base",
                "tokens",
                "q",
                "kind",
                "clen",
                "prompt",
                "committed",
                "stats",
                "sessions",
                "state",
                "status",
                "text",
                "n",
                "pos",
                "sampling",
                "ts",
                "at",
                "tok",
                "acc",
                "verified",
                "max_new_tokens",
                "chat",
                "fin",
                "owner",
            ]
        ),
        json_values,
        max_size=12,
    ),
)
def test_random_bodies_under_every_tag(tag: str, body: dict[str, Any]) -> None:
    env = {"v": 1, "t": tag, **body}
    try:
        as_json = json.dumps(env).encode()
    except ValueError:  # integers beyond the str-conversion limit
        as_json = None
    if as_json is not None:
        check_decode(as_json)
    try:
        as_msgpack = msgpack.packb(env, use_bin_type=True)
    except (OverflowError, ValueError):  # ints beyond 64 bits: msgpack cannot carry them
        return
    check_decode(as_msgpack)


# --- targeted cases from the brief ---------------------------------------------------------------


def _raises(data: bytes, limits: Limits = L) -> None:
    with pytest.raises(ProtocolError):
        decode(data, limits)


def test_deep_nesting() -> None:
    for depth in (10, 500, 1000, 5000, 100_000):
        _raises(b"\x91" * depth + b"\x00")  # bare arrays
        _raises(b"\x82\xa1v\x01\xa1t" + b"\x91" * depth + b"\x00")  # as the type tag
        _raises(b'{"v":1,"t":"draft","tokens":' + b"[" * depth + b"]" * depth + b"}")
        _raises(b'{"v":' + b"[" * depth)  # unterminated
        _raises(
            b'{"v":1,"t":"prompt","prompt":"x","session":'
            + b'{"a":' * depth
            + b"1"
            + b"}" * depth
            + b"}"
        )
    for depth in (100, 500):  # msgpack's packer stops at 512 levels
        for seed, key in (
            (3, "sid"),
            (3, "tokens"),
            (1, "sampling"),
            (3, "q"),
            (3, "v"),
            (3, "t"),
            (12, "stats"),
            (12, "sessions"),
            (1, "prompt"),
        ):
            for leaf in (0, "x", 1.5):
                for value in (_deep(depth, leaf), _deep(depth, leaf, as_map=True)):
                    if key == "sampling":  # unknown keys inside sampling are ignored
                        value = {"mode": value}
                    _raises(msgpack.packb(_env(SEEDS[seed]) | {key: value}))
    # deeper than the packer allows: splice raw nested arrays in as the value of "sid"
    for depth in (1000, 1100, 50_000):
        _raises(b"\x84\xa1v\x01\xa1t\xa5close\xa3seq\x00\xa3sid" + b"\x91" * depth + b"\x00")


def test_huge_ints() -> None:
    for digits in (20, 400, 4300, 5000, 100_000):
        n = b"9" * digits
        _raises(b'{"v":1,"t":"close","sid":"s","epoch":' + n + b',"seq":0}')
        _raises(b'{"v":' + n + b',"t":"close","sid":"s","epoch":0,"seq":0}')
        _raises(b'{"v":1,"t":"verifier_status","verifier":"v","state":"online","at":' + n + b"}")
        if digits > 308:  # beyond float range: no finite stat value
            _raises(
                b'{"v":1,"t":"device_status","device":"d","state":"online","stats":{"a":'
                + n
                + b"}}"
            )
    for big in (2**63, 2**64 - 1, -(2**63)):
        env = _env(SEEDS[2]) | {"seq": big}
        _raises(msgpack.packb(env))
        env = _env(SEEDS[2]) | {"tokens": [big]}
        _raises(msgpack.packb(env))


def test_nan_and_inf() -> None:
    for tok in (b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"):
        _raises(
            b'{"v":1,"t":"draft","sid":"s","epoch":0,"seq":0,"base":0,"tokens":[],"ts":'
            + tok
            + b"}"
        )
        _raises(
            b'{"v":1,"t":"verifier_status","verifier":"v","state":"online","stats":{"a":'
            + tok
            + b"}}"
        )
        _raises(b'{"v":' + tok + b',"t":"close","sid":"s","epoch":0,"seq":0}')
    for x in (float("nan"), float("inf"), float("-inf")):
        for key in ("ts", "epoch", "base"):
            _raises(msgpack.packb(_env(SEEDS[2]) | {key: x}))
        _raises(msgpack.packb(_env(SEEDS[3]) | {"q": [[[4], [x]], [[5], [0.5]]]}))
        sampling = _env(SEEDS[1])["sampling"] | {"temperature": x}
        _raises(msgpack.packb(_env(SEEDS[1]) | {"sampling": sampling}))
        # single-precision floats too
        _raises(msgpack.packb(_env(SEEDS[2]) | {"ts": x}, use_single_float=True))


def test_wrong_schema_version_and_unknown_tag() -> None:
    for data in SEEDS:
        env = _env(data)
        for v in (0, 2, -1, 255, 2**40, "1", 1.0, True, None, [1]):
            _raises(msgpack.packb(env | {"v": v}))
        _raises(msgpack.packb({k: x for k, x in env.items() if k != "v"}))
        for t in ("", "unknown", "DRAFT", "draft ", "x" * 33, 1, None, ["draft"], b"draft"):
            _raises(msgpack.packb(env | {"t": t}, use_bin_type=True))
        _raises(msgpack.packb({k: x for k, x in env.items() if k != "t"}))


def test_oversize_payload() -> None:
    pad = "x" * (L.max_payload + 10)
    _raises(
        TextChunk("s", "d", 0, "verified", 0, 1, "x").encode()[:-1]
        + b',"p":"'
        + pad.encode()
        + b'"}'
    )
    _raises(b"\xc4" + bytes(L.max_payload + 5))
    for data in SEEDS:
        tight = Limits(max_payload=len(data) - 1)
        _raises(data, tight)
        assert check_decode(data, Limits(max_payload=len(data))) is not None
    with pytest.raises(ProtocolError):
        PromptRequest.parse(b"a" * (L.max_payload + 1))


def test_too_many_tokens_and_out_of_range_ids() -> None:
    draft = _env(SEEDS[2])
    _raises(msgpack.packb(draft | {"tokens": [1] * (L.max_draft_tokens + 1)}))
    assert check_decode(msgpack.packb(draft | {"tokens": [1] * L.max_draft_tokens}))
    for bad in (-1, L.max_token_id + 1, 2**32, 2**64 - 1):
        _raises(msgpack.packb(draft | {"tokens": [1, bad]}))
    assert check_decode(msgpack.packb(draft | {"tokens": [0, L.max_token_id]}))
    op = _env(SEEDS[0])
    _raises(msgpack.packb(op | {"prompt": [1] * (L.max_context_tokens + 1)}))
    _raises(msgpack.packb(op | {"stop": list(range(65))}))
    _raises(msgpack.packb(op | {"prompt": []}))
    q = [[list(range(L.max_topk + 1)), [0.001] * (L.max_topk + 1)]]
    _raises(msgpack.packb(_env(SEEDS[3]) | {"tokens": [4], "q": q}))
    _raises(msgpack.packb(_env(SEEDS[3]) | {"q": [[[4], [0.5]]] * (L.max_draft_tokens + 1)}))
    verdict = _env(SEEDS[5])
    _raises(msgpack.packb(verdict | {"tokens": [L.max_token_id + 1] * 3}))
    ds = _env(SEEDS[12])
    _raises(json.dumps(ds | {"sessions": ["s"] * 1025}).encode())
    _raises(json.dumps(ds | {"stats": {str(i): 1 for i in range(65)}}).encode())


@pytest.mark.parametrize(
    "bad",
    ["a/b", "a+b", "a#b", "/", "+", "#", "$SYS", "a b", "", "-x", "x" * 65, "é", "a\u0000", "a\n"],
)
def test_ids_with_topic_characters(bad: str) -> None:
    """Ids land in topic levels: '/', '+', '#' and friends must never pass."""
    for data, keys in (
        (SEEDS[0], ("sid", "dev")),
        (SEEDS[2], ("sid",)),
        (SEEDS[5], ("sid",)),
        (SEEDS[9], ("sid", "dev")),
        (SEEDS[11], ("sid",)),
    ):
        for key in keys:
            _raises(msgpack.packb(_env(data) | {key: bad}))
    for data, key in (
        (SEEDS[12], "device"),
        (SEEDS[14], "verifier"),
        (SEEDS[15], "session"),
        (SEEDS[15], "device"),
        (SEEDS[17], "session"),
        (SEEDS[19], "session"),
    ):
        _raises(json.dumps(_env(data) | {key: bad}).encode())
    _raises(json.dumps(_env(SEEDS[12]) | {"sessions": ["ok", bad]}).encode())
    with pytest.raises(ProtocolError):
        PromptRequest.parse(json.dumps({"prompt": "x", "session": bad}).encode())
