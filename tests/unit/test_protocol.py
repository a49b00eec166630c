"""Round trips and wire shape of every protocol message (property tests)."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from middleware.errors import ProtocolError
from middleware.protocol import (
    DEFAULT_LIMITS,
    MESSAGE_TYPES,
    SCHEMA_VERSION,
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
from middleware.protocol.session import MAX_EPOCH, MAX_SEQ, MODES, VERDICT_KINDS
from middleware.protocol.status import STATES
from middleware.protocol.text import CHUNK_KINDS

L = DEFAULT_LIMITS
PROPS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- strategies for valid values -------------------------------------------------------

ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}\Z")
# any Unicode but lone surrogates, which no UTF-8 encoder (msgpack or JSON) can carry
chars = st.characters(blacklist_categories=("Cs",))
short_text = st.text(chars, max_size=40)
token = st.integers(0, L.max_token_id)
epochs = st.integers(0, MAX_EPOCH)
seqs = st.integers(0, MAX_SEQ)
ctx = st.integers(0, L.max_context_tokens)


def tokens(max_size: int, min_size: int = 0) -> st.SearchStrategy[tuple[int, ...]]:
    return st.lists(token, min_size=min_size, max_size=max_size).map(tuple)


def floats(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


stats = st.dictionaries(
    st.text(chars, max_size=64), st.floats(allow_nan=False, allow_infinity=False), max_size=8
)

sampling = st.builds(
    SamplingParams,
    mode=st.sampled_from(MODES),
    seed=st.integers(0, (1 << 63) - 1),
    temperature=floats(1e-4, 100.0),
    top_k=st.integers(0, 1 << 20),
    top_p=floats(0.0, 1.0).filter(lambda p: p > 0.0),
)

opens = st.builds(
    OpenSession,
    session_id=ids,
    device_id=ids,
    epoch=epochs,
    seq=seqs,
    tokenizer=short_text,
    prompt=tokens(64, min_size=1),
    committed=tokens(64),
    sampling=sampling,
    max_new_tokens=st.integers(1, L.max_context_tokens),
    stop_ids=tokens(64),
    drafter=short_text,
    sent_at=floats(0.0, 1e16),
)


@st.composite
def sparse_dist(draw: st.DrawFn) -> SparseDist:
    n = draw(st.integers(1, L.max_topk))
    ids_ = draw(st.lists(token, min_size=n, max_size=n).map(tuple))
    raw = draw(st.lists(floats(0.0, 1.0), min_size=n, max_size=n))
    total = sum(raw)
    probs = tuple(p / total for p in raw) if total > 1.0 else tuple(raw)
    if sum(probs) > 1.0 + 1e-3:  # rounding after the division; keep the value valid
        probs = tuple(p / 2 for p in probs)
    return SparseDist(ids_, probs)


@st.composite
def drafts(draw: st.DrawFn) -> Draft:
    toks = draw(tokens(L.max_draft_tokens))
    q: tuple[SparseDist, ...] = ()
    if toks and len(toks) <= 8 and draw(st.booleans()):
        q = tuple(draw(sparse_dist()) for _ in toks)
    return Draft(
        session_id=draw(ids),
        epoch=draw(epochs),
        seq=draw(seqs),
        base=draw(ctx),
        tokens=toks,
        q=q,
        sent_at=draw(floats(0.0, 1e16)),
        think_ms=draw(floats(0.0, 3.6e6)),
        token_ms=draw(floats(0.0, 3.6e6)),
    )


@st.composite
def verdicts(draw: st.DrawFn) -> Verdict:
    kind = draw(st.sampled_from(VERDICT_KINDS))
    toks = draw(tokens(64))
    base = draw(st.integers(0, L.max_context_tokens - len(toks)))
    clen = base + len(toks) if kind in ("accept", "catchup", "opened") else draw(ctx)
    return Verdict(
        session_id=draw(ids),
        epoch=draw(epochs),
        seq=draw(seqs),
        kind=kind,
        base=base,
        accepted=draw(st.integers(0, L.max_draft_tokens)),
        tokens=toks,
        committed_len=clen,
        done=draw(st.booleans()),
        finish_reason=draw(st.sampled_from(("", "stop", "length"))),
        reason=draw(short_text),
        next_len=draw(st.integers(0, L.max_draft_tokens)),
        verifier_id=draw(st.text(chars, max_size=64)),
        echo_ts=draw(floats(0.0, 1e16)),
        lossy=draw(st.booleans()),
        instance=draw(st.text("0123456789abcdef", max_size=16)),
        tag=draw(st.text("0123456789abcdef", max_size=32)),
    )


states = st.builds(
    SessionState,
    session_id=ids,
    device_id=ids,
    epoch=epochs,
    owner=st.text(chars, max_size=64),
    status=st.sampled_from(("open", "done", "closed")),
    committed=tokens(128),
    prompt_len=ctx,
    finish_reason=st.text(chars, max_size=32),
    updated_at=floats(0.0, 1e12),
)
closes = st.builds(CloseSession, session_id=ids, epoch=epochs, seq=seqs, reason=short_text)
device_statuses = st.builds(
    DeviceStatus,
    device_id=ids,
    state=st.sampled_from(STATES),
    drafter=short_text,
    tokenizer=short_text,
    sessions=st.lists(ids, max_size=8).map(tuple),
    stats=stats,
    at=floats(0.0, 1e12),
)
verifier_statuses = st.builds(
    VerifierStatus,
    verifier_id=ids,
    state=st.sampled_from(STATES),
    model=short_text,
    tokenizer=short_text,
    sessions=st.integers(0, 1 << 30),
    stats=stats,
    at=floats(0.0, 1e12),
)
text_chunks = st.builds(
    TextChunk,
    session_id=ids,
    device_id=ids,
    seq=st.integers(0, 1 << 62),
    kind=st.sampled_from(CHUNK_KINDS),
    pos=ctx,
    n_tokens=ctx,
    text=st.text(chars, max_size=200),
    final=st.booleans(),
    lossy=st.booleans(),
)
results = st.builds(
    Result,
    session_id=ids,
    device_id=ids,
    text=st.text(chars, max_size=200),
    n_tokens=ctx,
    finish_reason=st.text(chars, max_size=32),
    verified=st.booleans(),
    stats=stats,
    lossy=st.booleans(),
)
prompt_text = st.text(chars, min_size=1, max_size=200).filter(lambda s: s.strip() != "")
prompts = st.builds(
    PromptRequest,
    prompt=prompt_text,
    session_id=st.none() | ids,
    max_new_tokens=st.none() | st.integers(1, L.max_context_tokens),
    chat=st.booleans(),
)

STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "open": opens,
    "draft": drafts(),
    "verdict": verdicts(),
    "state": states,
    "close": closes,
    "device_status": device_statuses,
    "verifier_status": verifier_statuses,
    "text": text_chunks,
    "result": results,
    "prompt": prompts,
}
MSGPACK_TYPES = {"open", "draft", "verdict", "state", "close"}
any_message = st.one_of(*STRATEGIES.values())


def test_every_message_type_has_a_strategy() -> None:
    assert set(STRATEGIES) == set(MESSAGE_TYPES)
    for tag, cls in MESSAGE_TYPES.items():
        assert cls.TYPE == tag


# --- round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("tag", sorted(STRATEGIES))
def test_round_trip_each_type(tag: str) -> None:
    @PROPS
    @given(STRATEGIES[tag])
    def check(msg: Any) -> None:
        data = msg.encode()
        out = decode(data)
        assert type(out) is MESSAGE_TYPES[tag]
        assert out == msg
        assert out.encode() == data  # the encoding is canonical: decode/encode is stable
        assert decode(data, expect=MESSAGE_TYPES[tag]) == msg

    check()


@PROPS
@given(any_message)
def test_framing_and_content_type(msg: Any) -> None:
    data = msg.encode()
    assert len(data) <= L.max_payload
    if msg.TYPE in MSGPACK_TYPES:
        env = msgpack.unpackb(data, raw=False)
        assert data[:1] != b"{"
    else:
        env = json.loads(data.decode("utf-8"))  # strict UTF-8 JSON, readable by any IoT stack
        assert data[:1] == b"{"
    assert env["v"] == SCHEMA_VERSION
    assert env["t"] == msg.TYPE


@PROPS
@given(any_message)
def test_msgpack_types_also_accept_json_and_back(msg: Any) -> None:
    """decode() auto-detects the framing: the same envelope as JSON decodes identically."""
    data = msg.encode()
    env = msgpack.unpackb(data, raw=False) if msg.TYPE in MSGPACK_TYPES else json.loads(data)
    as_json = json.dumps(env, ensure_ascii=False).encode()
    as_msgpack = msgpack.packb(env, use_bin_type=True)
    assert decode(as_json) == msg
    assert decode(as_msgpack) == msg


def test_tuples_not_lists_after_decode() -> None:
    d = Draft("s1", 0, 1, 0, (1, 2, 3), q=(SparseDist((4,), (0.5,)),) * 3)
    out = decode(d.encode())
    assert isinstance(out.tokens, tuple)
    assert isinstance(out.q[0].ids, tuple) and isinstance(out.q[0].probs, tuple)
    o = decode(OpenSession("s1", "d1", 0, 0, "tok", (1,), stop_ids=(2,)).encode())
    assert isinstance(o.prompt, tuple) and isinstance(o.committed, tuple)
    assert isinstance(o.stop_ids, tuple)
    st_ = decode(DeviceStatus("d1", "online", sessions=("a", "b")).encode())
    assert st_.sessions == ("a", "b")


def test_json_integers_for_float_fields_compare_equal() -> None:
    """JSON writes 5.0 as 5.0 but other producers may write 5: both decode to 5.0."""
    raw = b'{"v":1,"t":"verifier_status","verifier":"v1","state":"online","at":5,"stats":{"x":2}}'
    out = decode(raw)
    assert out == VerifierStatus("v1", "online", stats={"x": 2.0}, at=5.0)
    assert isinstance(out.at, float) and isinstance(out.stats["x"], float)


# --- wire field names (the AsyncAPI document mirrors these) --------------------------

WIRE_KEYS = {
    "open": {
        "v",
        "t",
        "sid",
        "dev",
        "epoch",
        "seq",
        "tok",
        "prompt",
        "committed",
        "sampling",
        "max_new",
        "stop",
        "drafter",
        "ts",
        "nonce",
        "tag",
    },
    "draft": {"v", "t", "sid", "epoch", "seq", "base", "tokens", "ts"},
    "verdict": {
        "v",
        "t",
        "sid",
        "epoch",
        "seq",
        "kind",
        "base",
        "acc",
        "tokens",
        "clen",
        "done",
        "fin",
        "reason",
        "next",
        "vid",
        "ts",
        "lossy",
        "inst",
        "tag",
    },
    "state": {
        "v",
        "t",
        "sid",
        "dev",
        "epoch",
        "owner",
        "status",
        "committed",
        "plen",
        "fin",
        "at",
        "inst",
        "tag",
    },
    "close": {"v", "t", "sid", "epoch", "seq", "reason"},
    "device_status": {
        "v",
        "t",
        "device",
        "state",
        "online",
        "drafter",
        "tokenizer",
        "sessions",
        "stats",
    },
    "verifier_status": {
        "v",
        "t",
        "verifier",
        "state",
        "online",
        "model",
        "tokenizer",
        "sessions",
        "stats",
    },
    "text": {
        "v",
        "t",
        "session",
        "device",
        "seq",
        "kind",
        "pos",
        "n",
        "text",
        "final",
        "lossy",
        "inst",
    },
    "result": {
        "v",
        "t",
        "session",
        "device",
        "text",
        "n",
        "fin",
        "verified",
        "stats",
        "lossy",
        "inst",
        "request",
    },
    "prompt": {"v", "t", "prompt", "chat"},
}


@PROPS
@given(any_message)
def test_wire_field_names_are_stable(msg: Any) -> None:
    data = msg.encode()
    env = msgpack.unpackb(data, raw=False) if msg.TYPE in MSGPACK_TYPES else json.loads(data)
    optional = {
        "draft": {"q", "think", "tms"},
        "prompt": {"session", "max_new_tokens", "request"},
        "result": {"error"},
        "device_status": {"at"},  # omitted where unknown (the last will)
        "verifier_status": {"at"},
    }.get(msg.TYPE, set())
    assert WIRE_KEYS[msg.TYPE] <= set(env) <= WIRE_KEYS[msg.TYPE] | optional
    if msg.TYPE == "open":
        assert set(env["sampling"]) == {"mode", "seed", "temperature", "top_k", "top_p"}


def test_draft_sparse_q_shape() -> None:
    q = (SparseDist((5, 9), (0.75, 0.25)), SparseDist((6,), (1.0,)))
    d = Draft("s1", 2, 7, 10, (5, 6), q=q)
    env = msgpack.unpackb(d.encode(), raw=False)
    assert env["q"] == [[[5, 9], [0.75, 0.25]], [[6], [1.0]]]
    assert "q" not in msgpack.unpackb(Draft("s1", 2, 7, 10, (5, 6)).encode(), raw=False)


def test_status_online_flag_follows_state() -> None:
    for state, online in (("online", True), ("degraded", True), ("offline", False)):
        env = json.loads(DeviceStatus("pi-1", state).encode())  # type: ignore[arg-type]
        assert env["online"] is online
        env = json.loads(VerifierStatus("v-1", state).encode())  # type: ignore[arg-type]
        assert env["online"] is online


# --- defaults for optional fields -------------------------------------------------------


def test_open_defaults_when_optional_fields_absent() -> None:
    raw = msgpack.packb(
        {
            "v": 1,
            "t": "open",
            "sid": "s",
            "dev": "d",
            "epoch": 0,
            "seq": 0,
            "tok": "fp",
            "prompt": [1, 2],
        }
    )
    out = decode(raw)
    assert out == OpenSession("s", "d", 0, 0, "fp", (1, 2))
    assert out.sampling == SamplingParams()


def test_sampling_mode_defaults_to_greedy() -> None:
    assert SamplingParams.from_wire({"seed": 3}) == SamplingParams(seed=3)


def test_verdict_minimal() -> None:
    raw = msgpack.packb(
        {"v": 1, "t": "verdict", "sid": "s", "epoch": 1, "seq": 2, "kind": "resync"}
    )
    assert decode(raw) == Verdict("s", 1, 2, "resync")


# --- constructor validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: OpenSession("s", "d", 0, 0, "t", ()),  # empty prompt
        lambda: OpenSession("s/x", "d", 0, 0, "t", (1,)),  # id with '/'
        lambda: OpenSession("s", "d+", 0, 0, "t", (1,)),  # id with '+'
        lambda: OpenSession("s", "d", -1, 0, "t", (1,)),  # negative epoch
        lambda: OpenSession("s", "d", 0, 0, "t", (1,), max_new_tokens=0),
        lambda: Draft("#", 0, 0, 0, (1,)),
        lambda: Draft("s", 0, 0, -1, (1,)),  # negative base
        lambda: Draft("s", 0, 0, 0, (1, 2), q=(SparseDist((1,), (1.0,)),)),  # q per token
        lambda: SparseDist((), ()),
        lambda: SparseDist((1, 2), (0.5,)),
        lambda: SparseDist((1, 2), (0.9, 0.9)),  # sums above 1
        lambda: Verdict("s", 0, 0, "maybe"),  # type: ignore[arg-type]
        lambda: Verdict("s", 0, 0, "accept", base=3, tokens=(1,), committed_len=5),
        lambda: Verdict("s", 0, 0, "catchup", base=-1, tokens=(1,), committed_len=0),
        lambda: SessionState("s", "d", 0, "v", "gone", ()),  # type: ignore[arg-type]
        lambda: CloseSession("", 0, 0),
        lambda: DeviceStatus("d", "asleep"),  # type: ignore[arg-type]
        lambda: VerifierStatus("", "online"),
        lambda: TextChunk("s", "d", 0, "draft", 0, 0, "x"),  # type: ignore[arg-type]
        lambda: Result("s", "d d", "x", 1, "stop", True),
        lambda: PromptRequest("   "),
        lambda: PromptRequest("hi", session_id="a/b"),
        lambda: PromptRequest("hi", max_new_tokens=0),
        lambda: SamplingParams(mode="beam"),  # type: ignore[arg-type]
        lambda: SamplingParams(temperature=0.0),
        lambda: SamplingParams(top_p=0.0),
        lambda: SamplingParams(top_k=-1),
        lambda: SamplingParams(seed=1 << 63),
    ],
)
def test_constructors_validate(make: Any) -> None:
    with pytest.raises(ProtocolError):
        make()


# --- decode-side bounds -----------------------------------------------------------------------


def _draft_env(**over: Any) -> dict[str, Any]:
    env = {"v": 1, "t": "draft", "sid": "s1", "epoch": 0, "seq": 0, "base": 0, "tokens": [1]}
    env.update(over)
    return env


@pytest.mark.parametrize(
    "over",
    [
        {"tokens": list(range(L.max_draft_tokens + 1))},
        {"tokens": [L.max_token_id + 1]},
        {"tokens": [-1]},
        {"tokens": [True]},
        {"tokens": [1.0]},
        {"tokens": "abc"},
        {"sid": "a/b"},
        {"sid": "a+b"},
        {"sid": "a#"},
        {"sid": ""},
        {"sid": "x" * 65},
        {"sid": 5},
        {"epoch": MAX_EPOCH + 1},
        {"epoch": -1},
        {"epoch": 1.5},
        {"epoch": True},
        {"seq": MAX_SEQ + 1},
        {"base": L.max_context_tokens + 1},
        {"ts": float("nan")},
        {"ts": float("inf")},
        {"ts": -1.0},
        {"ts": "now"},
        {"q": [[[1], [0.5]], [[2], [0.5]]]},  # two distributions for one token
        {"q": [[[1], [float("nan")]]]},
        {"q": [[[1], [1.5]]]},
        {"q": [[[1, 2], [0.7, 0.7]]]},
        {"q": [[[1], [0.5], [0.5]]]},
        {"q": "x"},
        {"v": 2},
        {"v": 0},
        {"v": "1"},
        {"v": True},
        {"v": 1.0},
        {"v": None},
        {"t": "nope"},
        {"t": 1},
        {"t": "x" * 33},
    ],
)
def test_draft_decode_rejects(over: dict[str, Any]) -> None:
    env = _draft_env(**over)
    with pytest.raises(ProtocolError):
        decode(msgpack.packb(env, use_bin_type=True))


def test_missing_required_field_and_missing_version() -> None:
    env = _draft_env()
    del env["tokens"]
    with pytest.raises(ProtocolError, match="tokens: missing"):
        decode(msgpack.packb(env))
    env = _draft_env()
    del env["v"]
    with pytest.raises(ProtocolError, match="schema version"):
        decode(msgpack.packb(env))


def test_limits_can_be_tightened() -> None:
    tight = Limits(max_payload=64, max_draft_tokens=4, max_token_id=99)
    assert decode(Draft("s", 0, 0, 0, (1, 2, 3, 4)).encode(), tight).tokens == (1, 2, 3, 4)
    with pytest.raises(ProtocolError, match="exceed"):
        decode(Draft("s", 0, 0, 0, (1, 2, 3, 4, 5)).encode(), tight)
    with pytest.raises(ProtocolError, match="outside"):
        decode(Draft("s", 0, 0, 0, (100,)).encode(), tight)
    with pytest.raises(ProtocolError, match="exceeds 64"):
        decode(Draft("s", 0, 0, 0, tuple(range(40))).encode(), tight)


def test_payload_bounds() -> None:
    with pytest.raises(ProtocolError, match="empty"):
        decode(b"")
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(b"{" + b" " * L.max_payload + b"}")
    with pytest.raises(ProtocolError, match="bytes"):
        decode("not bytes")  # type: ignore[arg-type]
    ok = CloseSession("s", 0, 0).encode()
    assert decode(bytearray(ok)) == decode(memoryview(ok)) == CloseSession("s", 0, 0)


def test_open_context_bound() -> None:
    half = L.max_context_tokens // 2 + 1
    env = {
        "v": 1,
        "t": "open",
        "sid": "s",
        "dev": "d",
        "epoch": 0,
        "seq": 0,
        "tok": "x",
        "prompt": [1] * half,
        "committed": [1] * half,
    }
    with pytest.raises(ProtocolError, match="max_context_tokens"):
        decode(msgpack.packb(env))


def test_expect_filters_types() -> None:
    data = CloseSession("s", 0, 0).encode()
    assert decode(data, expect=(Draft, CloseSession)) == CloseSession("s", 0, 0)
    with pytest.raises(ProtocolError, match="unexpected message type"):
        decode(data, expect=Draft)
    with pytest.raises(ProtocolError, match="unexpected message type"):
        decode(data, expect=(Draft, OpenSession))


def test_stats_must_be_finite_numbers() -> None:
    base = b'{"v":1,"t":"device_status","device":"d","state":"online","stats":'
    for bad in (
        b'{"a":NaN}',
        b'{"a":Infinity}',
        b'{"a":-Infinity}',
        b'{"a":"1"}',
        b'{"a":true}',
        b"[1]",
        b'{"a":1e999}',
        b'{"a":' + b"9" * 400 + b"}",
    ):
        with pytest.raises(ProtocolError):
            decode(base + bad + b"}")


def test_lone_surrogate_in_json_string_is_rejected() -> None:
    raw = (
        b'{"v":1,"t":"text","session":"s","device":"d","seq":0,"kind":"verified",'
        b'"pos":0,"n":0,"text":"\\ud800"}'
    )
    with pytest.raises(ProtocolError, match="Unicode"):
        decode(raw)
    ok = raw.replace(b"\\ud800", b"\\ud83d\\ude00")  # a valid surrogate pair is fine
    assert decode(ok).text == "\U0001f600"


# --- PromptRequest.parse ---------------------------------------------------------------------


@PROPS
@given(prompts)
def test_parse_round_trips_encoded_prompt(msg: PromptRequest) -> None:
    assert PromptRequest.parse(msg.encode()) == msg


@PROPS
@given(prompt_text, st.none() | ids, st.none() | st.integers(1, L.max_context_tokens))
def test_parse_untyped_json(text: str, sid: str | None, mnt: int | None) -> None:
    obj: dict[str, Any] = {"prompt": text}
    if sid is not None:
        obj["session"] = sid
    if mnt is not None:
        obj["max_new_tokens"] = mnt
    for data in (json.dumps(obj).encode(), b"  \n" + json.dumps(obj, ensure_ascii=False).encode()):
        assert PromptRequest.parse(data) == PromptRequest(text, session_id=sid, max_new_tokens=mnt)


@PROPS
@given(prompt_text.filter(lambda s: not s.lstrip().startswith("{")))
def test_parse_plain_text(text: str) -> None:
    assert PromptRequest.parse(text.encode("utf-8")) == PromptRequest(prompt=text)


def test_parse_examples() -> None:
    assert PromptRequest.parse(b"Tell me a joke") == PromptRequest("Tell me a joke")
    assert PromptRequest.parse(b'{"prompt":"hi","chat":false}') == PromptRequest("hi", chat=False)
    assert PromptRequest.parse(b'{"prompt":"hi","max_new_tokens":0}').max_new_tokens is None
    assert PromptRequest.parse("héllo wörld".encode()) == PromptRequest("héllo wörld")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"   \n\t",
        b"\xff\xfe",
        b"{not json",
        b'{"prompt": ""}',
        b'{"prompt": 5}',
        b'{"session": "s"}',
        b'{"prompt": "x", "session": "a/b"}',
        b'{"prompt": "x", "max_new_tokens": -3}',
        b'{"prompt": "x", "max_new_tokens": "7"}',
        b'{"prompt": "x", "chat": "yes"}',
        b'{"prompt": "\\udc00"}',
        b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}",  # deeper than the recursion limit
    ],
)
def test_parse_rejects(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        PromptRequest.parse(data)


def test_parse_size_bounds() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        PromptRequest.parse(b"x" * (L.max_payload + 1))
    small = Limits(max_text=10)
    assert PromptRequest.parse(b"0123456789", small).prompt == "0123456789"
    with pytest.raises(ProtocolError, match="too long"):
        PromptRequest.parse(b"0123456789a", small)
    with pytest.raises(ProtocolError):
        PromptRequest.parse(b'{"prompt":"0123456789a"}', small)
