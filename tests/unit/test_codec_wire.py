"""The MessagePack bytes on the wire are unchanged by the codec swap (msgspec for msgpack).

Devices in the field run older builds: every message this build packs must be the
exact bytes msgpack-python packed, and every envelope msgpack-python packed must read
back to the same value.
"""

from __future__ import annotations

import random
from typing import Any

import msgpack
import pytest

from middleware.errors import ProtocolError
from middleware.protocol import (
    CloseSession,
    Draft,
    OpenSession,
    SamplingParams,
    SessionState,
    Verdict,
    decode,
)
from middleware.protocol.codec import SCHEMA_VERSION, pack, unpack

MESSAGES = [
    OpenSession(
        "s-1",
        "pi-1",
        3,
        0,
        "fp:abc",
        (1, 2, 300, 70_000, 2**24 - 1),
        stop_ids=(2,),
        max_new_tokens=128,
        sampling=SamplingParams(mode="coupled", seed=2**40, temperature=0.7, top_k=40, top_p=0.9),
    ),
    Draft("s-1", 3, 7, 120, (11, 12, 13, 14)),
    Draft("s-1", 3, 8, 124, tuple(range(200, 456))),
    Verdict(
        session_id="s-1",
        epoch=3,
        seq=7,
        kind="accept",
        base=120,
        accepted=4,
        tokens=(11, 12, 13, 14, 15),
        committed_len=125,
        verifier_id="v1",
    ),
    Verdict(session_id="s-1", epoch=3, seq=9, kind="refused", reason="é" * 40, committed_len=0),
    SessionState("s-1", "pi-1", 3, "v1", "open", tuple(range(1000))),
    CloseSession("s-1", 3, 10),
]


def _old_pack(env: dict[str, Any]) -> bytes:
    return msgpack.packb(env, use_bin_type=True)


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_packs_to_the_bytes_msgpack_python_packed(msg: Any) -> None:
    wire = msg.encode()
    env = msgpack.unpackb(wire, raw=False)
    assert _old_pack(env) == wire
    assert decode(wire) == msg


def _value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["int", "bigint", "neg", "float", "str", "bytes", "bool", "none"]
    if depth < 3:
        kinds += ["list", "map"]
    k = rng.choice(kinds)
    if k == "int":
        return rng.choice([0, 1, 127, 128, 255, 256, 65_535, 65_536, 2**32 - 1, 2**32])
    if k == "bigint":
        return rng.randrange(2**32, 2**64)
    if k == "neg":
        return -rng.choice([1, 32, 33, 128, 129, 32_768, 32_769, 2**31, 2**63])
    if k == "float":
        return rng.choice([0.0, -1.5, 1e300, 3.141592653589793, float("inf")])
    if k == "str":
        n = rng.choice([0, 5, 31, 32, 255, 256, 65_536])  # str8/str16/str32 boundaries
        return "".join(rng.choice("aé€𝄞z ") for _ in range(min(n, 300))) + "a" * max(0, n - 300)
    if k == "bytes":
        return bytes(rng.randrange(256) for _ in range(rng.choice([0, 3, 255, 256])))
    if k == "bool":
        return rng.random() < 0.5
    if k == "none":
        return None
    if k == "list":
        return [_value(rng, depth + 1) for _ in range(rng.choice([0, 2, 15, 16, 17]))]
    return {f"k{i}": _value(rng, depth + 1) for i in range(rng.choice([0, 1, 15, 16, 17]))}


def test_random_envelopes_have_identical_bytes_both_ways() -> None:
    rng = random.Random(16)
    for _ in range(300):
        body = {f"f{i}": _value(rng) for i in range(rng.randrange(1, 6))}
        env = {"v": SCHEMA_VERSION, "t": "x", **body}
        wire = pack("x", body)
        assert wire == _old_pack(env)
        if len(wire) <= 1 << 20:  # the protocol's payload bound
            assert unpack(_old_pack(env)) == msgpack.unpackb(wire, raw=False)


def test_non_string_envelope_keys_are_refused_as_before() -> None:
    with pytest.raises(ProtocolError):
        unpack(msgpack.packb({"v": 1, "t": "draft", 5: 1}))
