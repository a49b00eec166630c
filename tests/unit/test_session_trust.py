"""Session identity and trust in the verifier (issue 14), driven by raw protocol messages.

Committed tokens in an open are a claim: the verifier keeps what it committed
itself, what a valid commit tag vouches for, and what re-verifying proves
(greedy, coupled); the rest is rolled back and the ``opened`` verdict says the
truth.  Each test compares with the target model alone.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from middleware.errors import BusError
from middleware.protocol import Draft, OpenSession, SamplingParams, SessionState, Verdict, decode
from middleware.protocol.session import commit_tag, session_instance, tokens_digest
from middleware.verifier.engine import TargetEngine, VerifyItem
from middleware.verifier.opening import plan_open
from middleware.verifier.reference import reference_greedy, reference_sample
from middleware.verifier.service import VerifierConfig
from tests.unit.membus import InMemoryBus
from tests.unit.test_verifier_robustness import PROMPT, Harness, T, config, h, model, running
from tests.unit.tiny import EOS, VOCAB

__all__ = ["config", "h", "model"]  # fixtures used here

KEY = b"k" * 32


def open_msg(sid: str = "s1", epoch: int = 1, committed: Sequence[int] = (), **kw) -> OpenSession:
    return OpenSession(
        session_id=sid,
        device_id="dev",
        epoch=epoch,
        seq=0,
        tokenizer="tiny",
        prompt=kw.pop("prompt", PROMPT),
        committed=tuple(committed),
        **{"max_new_tokens": 32, "stop_ids": (EOS,), **kw},
    )


async def opened(h: Harness, msg: OpenSession) -> Verdict:
    await h.send(msg)
    return await h.verdict(msg.session_id)


def apply(claim: Sequence[int], v: Verdict) -> list[int]:
    """What a device holds after an ``opened`` verdict (the contract devices follow)."""
    out = list(claim[: v.base]) + list(v.tokens) if v.tokens else list(claim)
    return out[: v.committed_len]


async def retained_state(h: Harness, sid: str) -> SessionState:
    async with h.bus.subscribe(T.session("dev", sid, "state")) as sub:
        return decode((await sub.get(5)).payload, expect=SessionState)


# --- the pure decision --------------------------------------------------------------


def test_plan_open_rules() -> None:
    assert plan_open([], None, tag_ok=False, mode="greedy").how == "none"
    p = plan_open([1, 2, 3], None, tag_ok=False, mode="greedy")
    assert (p.trusted, p.to_prove, p.how) == ((), (1, 2, 3), "prove")
    p = plan_open([1, 2, 3], None, tag_ok=False, mode="rejection")
    assert (p.trusted, p.how) == ((), "rollback")
    p = plan_open([1, 2, 3], None, tag_ok=True, mode="rejection")
    assert (p.trusted, p.how) == ((1, 2, 3), "tag")
    # what this process committed stands; a claim beyond it is proven, one against it dropped
    p = plan_open([1, 2, 3, 4], [1, 2], tag_ok=False, mode="coupled")
    assert (p.trusted, p.to_prove, p.how) == ((1, 2), (3, 4), "prove")
    p = plan_open([1, 9, 9, 9], [1, 2, 3], tag_ok=True, mode="greedy")
    assert (p.trusted, p.to_prove, p.how) == ((1, 2, 3), (), "held")
    p = plan_open([1], [1, 2, 3], tag_ok=False, mode="greedy")
    assert (p.trusted, p.how) == ((1, 2, 3), "held")


# --- claims in opens (scenario 3: a raw open with made-up committed tokens) ---------


async def test_forged_committed_in_an_open_is_corrected_not_kept(h: Harness, model) -> None:
    ref = reference_greedy(model, PROMPT, 32, (EOS,))
    forged = [(t + 1) % VOCAB for t in ref[:12]]
    v = await opened(h, open_msg(committed=forged))
    assert v.kind == "opened"
    assert v.base == 0 and v.committed_len == 1 and v.tokens == (ref[0],)
    assert h.verifier.sessions["dev/s1"].committed == [ref[0]]
    state = await retained_state(h, "s1")
    assert list(state.committed) == [ref[0]]  # the retained state never held the forgery
    assert state.instance == session_instance(open_msg(committed=forged))
    assert h.rejected("claim_rolled_back") == 0  # greedy: proven, not rolled back blindly


async def test_true_claim_after_a_restart_is_proven_and_kept(h: Harness, model) -> None:
    """A verifier that never saw the session (restart, failover) proves the claim by
    re-verifying it; a true claim comes back unchanged and generation continues exactly."""
    ref = reference_greedy(model, PROMPT, 32, (EOS,))
    claim = ref[:10]
    v = await opened(h, open_msg(epoch=4, committed=claim))
    assert (v.kind, v.committed_len, v.tokens) == ("opened", 10, ())
    assert apply(claim, v) == claim
    await h.send(Draft("s1", 4, 1, 10, tuple(ref[10:13])))
    v = await h.verdict("s1")
    assert (v.kind, v.accepted, v.tokens) == ("accept", 3, tuple(ref[10:14]))
    assert v.instance == session_instance(open_msg(epoch=4, committed=claim))


async def test_claim_wrong_from_a_position_keeps_the_prefix_and_the_target_token(
    h: Harness, model
) -> None:
    ref = reference_greedy(model, PROMPT, 32, (EOS,))
    claim = [*ref[:6], (ref[6] + 1) % VOCAB, *ref[7:9]]
    v = await opened(h, open_msg(committed=claim))
    assert (v.base, v.tokens, v.committed_len) == (6, (ref[6],), 7)
    assert apply(claim, v) == ref[:7]


async def test_long_claim_is_proven_in_chunks(h: Harness, model) -> None:
    ref = reference_greedy(model, PROMPT, 200, ())
    claim = ref[:150]  # more than one proof chunk (64)
    v = await opened(h, open_msg(committed=claim, max_new_tokens=200, stop_ids=()))
    assert (v.committed_len, v.tokens) == (150, ())


async def test_coupled_claims_are_proven_like_greedy(h: Harness, model) -> None:
    sp = SamplingParams(mode="coupled", temperature=1.0, seed=7)
    ref = reference_sample(model, PROMPT, 32, (EOS,), sp)
    assert len(ref) > 8
    v = await opened(h, open_msg(committed=ref[:8], sampling=sp))
    assert (v.committed_len, v.tokens) == (8, ())
    bad = [*ref[:3], (ref[3] + 1) % VOCAB, *ref[4:8]]
    v = await opened(h, open_msg(sid="s2", committed=bad, sampling=sp))
    assert (v.base, v.tokens, v.committed_len) == (3, (ref[3],), 4)


@pytest.mark.parametrize(
    "config", [VerifierConfig(verifier_id="v1", max_draft=16, tag_key=KEY)], indirect=False
)
async def test_rejection_claims_need_a_valid_tag(h: Harness, model) -> None:
    """Rejection-sampled tokens cannot be re-derived: a claim counts only with the commit tag
    a verifier sharing the key issued; without one (or with a wrong one) it is rolled back."""
    sp = SamplingParams(mode="rejection", temperature=1.0, seed=3)
    claim = [4, 8, 15, 16]
    base = open_msg(committed=claim, sampling=sp)
    inst = session_instance(base)
    good = commit_tag(KEY, inst, len(claim), tokens_digest(claim))
    v = await opened(h, open_msg(committed=claim, sampling=sp, tag=good))
    assert (v.committed_len, v.tokens, v.instance) == (4, (), inst)
    assert v.tag == good  # the verifier's own tag for the same tokens
    wrong_key = commit_tag(b"x" * 32, inst, len(claim), tokens_digest(claim))
    for sid, tag in (("s2", ""), ("s3", wrong_key), ("s4", good)):  # s4: another instance
        v = await opened(h, open_msg(sid=sid, committed=claim, sampling=sp, tag=tag))
        assert (v.kind, v.base, v.committed_len, v.tokens) == ("opened", 0, 0, ())
    assert h.rejected("claim_rolled_back") == 3


async def test_reopen_of_a_held_session_answers_with_what_was_committed(h: Harness, model) -> None:
    ref = reference_greedy(model, PROMPT, 32, (EOS,))
    await opened(h, open_msg())
    await h.send(Draft("s1", 1, 1, 0, tuple(ref[:4])))
    assert (await h.verdict("s1")).committed_len == 5
    # the device lost the last verdict and re-opens with 2 tokens and then with a forgery
    v = await opened(h, open_msg(epoch=2, committed=ref[:2]))
    assert (v.base, v.tokens, v.committed_len) == (2, tuple(ref[2:5]), 5)
    forged = [*ref[:5], (ref[5] + 1) % VOCAB, 2, 3]
    v = await opened(h, open_msg(epoch=3, committed=forged))
    # held tokens stand; the extension is proven: wrong at once, so the target's token follows
    assert (v.base, v.tokens, v.committed_len) == (5, (ref[5],), 6)
    assert h.verifier.sessions["dev/s1"].committed == ref[:6]


# --- instances (scenario 1: a reused session id) ------------------------------------


async def test_reused_session_id_is_refused_while_live_and_replaces_once_done(
    h: Harness, model
) -> None:
    ref = reference_greedy(model, PROMPT, 32, (EOS,))
    first = open_msg(nonce="a" * 16)
    await opened(h, first)
    await h.send(Draft("s1", 1, 1, 0, tuple(ref[:3])))
    assert (await h.verdict("s1")).committed_len == 4
    other = open_msg(nonce="b" * 16, prompt=(1, 2, 3), committed=ref[:4])
    v = await opened(h, other)
    assert v.kind == "refused" and "in use" in v.reason
    assert v.instance == session_instance(other)
    assert h.verifier.sessions["dev/s1"].instance == session_instance(first)
    # the first generation ends; the id may now serve the new one, from nothing
    h.verifier.sessions["dev/s1"].finish_reason = "stop"
    v = await opened(h, other)
    ref2 = reference_greedy(model, (1, 2, 3), 32, (EOS,))
    assert v.kind == "opened" and v.instance == session_instance(other)
    assert apply(other.committed, v) == ref2[: v.committed_len]


@pytest.mark.parametrize(
    "config", [VerifierConfig(verifier_id="v1", max_draft=16, reuse_idle_s=0.0)], indirect=False
)
async def test_idle_session_of_another_instance_is_replaced(h: Harness, model) -> None:
    await opened(h, open_msg(nonce="a" * 16))
    await asyncio.sleep(0.01)
    v = await opened(h, open_msg(nonce="b" * 16))
    assert v.kind == "opened" and v.instance == session_instance(open_msg(nonce="b" * 16))


# --- admission ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "config", [VerifierConfig(verifier_id="v1", max_draft=16, max_prompt_tokens=8)], indirect=False
)
async def test_prompt_longer_than_the_limit_is_refused_with_the_reason(h: Harness) -> None:
    v = await opened(h, open_msg(prompt=tuple(range(1, 10))))
    assert v.kind == "refused" and "9 tokens exceeds" in v.reason and "8" in v.reason
    assert h.rejected("prompt_too_long") == 1
    assert (await opened(h, open_msg(sid="s2", prompt=tuple(range(1, 9))))).kind == "opened"


async def _open_as(bus: InMemoryBus, device: str, sid: str) -> None:
    msg = OpenSession(
        session_id=sid, device_id=device, epoch=1, seq=0, tokenizer="tiny", prompt=PROMPT
    )
    await bus.publish(T.session(device, sid, "open"), msg.encode())


@pytest.mark.parametrize(
    "config",
    [VerifierConfig(verifier_id="v1", max_draft=16, max_sessions=6, reuse_idle_s=3600.0)],
    indirect=False,
)
async def test_a_full_verifier_admits_a_new_device_by_evicting_the_heaviest(
    h: Harness,
) -> None:
    """Capacity is shared between devices: one device holding every slot yields its least
    recently active session to a device that holds none; a device that already holds its
    share is refused with a reason."""
    for i in range(6):
        await _open_as(h.bus, "hog", f"h{i}")
    for _ in range(200):
        if len(h.verifier.sessions) == 6 and not any(
            s.opening for s in h.verifier.sessions.values()
        ):
            break
        await asyncio.sleep(0.02)
    assert len(h.verifier.sessions) == 6
    v = await opened(h, open_msg())
    assert v.kind == "opened"
    assert "dev/s1" in h.verifier.sessions and "hog/h0" not in h.verifier.sessions
    assert len(h.verifier.sessions) == 6


@pytest.mark.parametrize(
    "config",
    [VerifierConfig(verifier_id="v1", max_draft=16, max_sessions=4, reuse_idle_s=3600.0)],
    indirect=False,
)
async def test_a_full_verifier_of_equal_devices_refuses_with_a_reason(h: Harness) -> None:
    for i in range(4):
        await _open_as(h.bus, f"d{i}", "x")
    for _ in range(200):
        if len(h.verifier.sessions) == 4:
            break
        await asyncio.sleep(0.02)
    v = await opened(h, open_msg())
    assert v.kind == "refused" and "session limit" in v.reason
    assert h.rejected("too_many_sessions") == 1


# --- chunked prefill ----------------------------------------------------------------


class GateEngine(TargetEngine):
    """Holds the long session's second prefill step until a verify round has run: a
    verifier that prefilled a prompt in one piece (or never between rounds) times out."""

    def __init__(self, model: object) -> None:
        super().__init__(model)
        self.calls: list[str] = []
        self.verified = threading.Event()

    def prefill(self, session_key, context, max_tokens):  # type: ignore[no-untyped-def]
        if session_key == "dev/long" and self.calls.count("prefill:long") == 1:
            assert self.verified.wait(30), "no verify round ran between prefill steps"
        self.calls.append("prefill:long" if session_key == "dev/long" else "prefill")
        return super().prefill(session_key, context, max_tokens)

    def verify_batch(self, items: Sequence[VerifyItem]):  # type: ignore[no-untyped-def]
        out = super().verify_batch(items)
        self.calls.append("verify")
        self.verified.set()
        return out


async def test_a_long_prompt_is_prefilled_between_other_sessions_rounds(model) -> None:
    ref = reference_greedy(model, PROMPT, 32, (EOS,))
    long_prompt = tuple((i * 7) % 60 + 1 for i in range(300))
    engine = GateEngine(model)
    config = VerifierConfig(verifier_id="v1", max_draft=16, prefill_chunk=32)
    async with running(engine, config) as hh:
        assert (await hh.open("short")).kind == "opened"
        await hh.send(open_msg(sid="long", prompt=long_prompt))
        for _ in range(3000):  # the long open's first prefill step has run
            if "prefill:long" in engine.calls:
                break
            await asyncio.sleep(0.01)
        assert "prefill:long" in engine.calls, "the open was not prefilled step by step"
        await hh.send(Draft("short", 1, 1, 0, tuple(ref[:3])))
        order = []
        while len(order) < 2:
            v = decode((await hh.verdicts.get(30)).payload, expect=Verdict)
            order.append((v.session_id, v.kind))
    assert order == [("short", "accept"), ("long", "opened")]
    first_long = engine.calls.index("prefill:long")
    last_long = len(engine.calls) - 1 - engine.calls[::-1].index("prefill:long")
    assert "verify" in engine.calls[first_long:last_long]
    assert engine.calls.count("prefill:long") >= 300 // 32


# --- retained state: bounded and bound to its instance ------------------------------


async def test_retained_state_carries_an_expiry_and_the_instance(h: Harness, model) -> None:
    """Issue 15: retained messages grew without bound (every session's state, forever);
    the state now carries an MQTT 5 message expiry (``state_expiry_s``, 24 h default)."""
    msg = open_msg()
    await opened(h, msg)
    broker = h.bus.broker
    state = broker.retained[T.session("dev", "s1", "state")]
    assert state.expiry == h.verifier.config.state_expiry_s == 86_400.0
    assert decode(state.payload, expect=SessionState).instance == session_instance(msg)


async def test_a_state_publish_that_fails_is_published_once_the_broker_is_back(
    h: Harness, model
) -> None:
    """The state loop re-queues a state whose publish failed (BusError: the broker is away)
    and publishes it on a later tick; it used to re-queue it under the bare session id,
    which the loop then skipped as no longer live, so the retained state stayed behind."""
    ref = reference_greedy(model, PROMPT, 32, (EOS,))
    await opened(h, open_msg())
    vbus = h.verifier.bus
    carry = vbus._carry
    away = True
    failed = asyncio.Event()

    async def flaky(msg, timeout=None):  # type: ignore[no-untyped-def]
        if away and msg.topic.endswith("/state"):
            failed.set()
            raise BusError("broker away")
        await carry(msg, timeout)

    vbus._carry = flaky  # type: ignore[method-assign]
    await h.send(Draft("s1", 1, 1, 0, tuple(ref[:3])))
    assert (await h.verdict("s1")).committed_len == 4
    await asyncio.wait_for(failed.wait(), 30)
    async with h.bus.subscribe(T.session("dev", "s1", "state")) as states:
        away = False
        while True:  # the retained copy first, then the retried publish
            state = decode((await states.get(30)).payload, expect=SessionState)
            if len(state.committed) == 4:
                break
