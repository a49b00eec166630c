"""The open admission rules as a pure function (middleware/verifier/admission.py)."""

from __future__ import annotations

import pytest

from middleware.protocol import OpenSession
from middleware.protocol.session import session_instance
from middleware.verifier.admission import AdmissionLimits, OpenDecision, screen_open, victim
from middleware.verifier.sessions import VerifierSession

LIMITS = AdmissionLimits(
    fingerprint="tok",
    vocab_size=100,
    max_prompt_tokens=16,
    max_sessions=4,
    max_sessions_per_device=2,
    reuse_idle_s=10.0,
)
NOW = 1000.0


def open_(device: str = "d1", sid: str = "s1", **kw: object) -> OpenSession:
    base: dict[str, object] = {
        "session_id": sid,
        "device_id": device,
        "epoch": 1,
        "seq": 0,
        "tokenizer": "tok",
        "prompt": (1, 2, 3),
        "max_new_tokens": 8,
        "nonce": "n-" + sid,
    }
    base.update(kw)
    return OpenSession(**base)  # type: ignore[arg-type]


def held(
    device: str = "d1",
    sid: str = "s1",
    *,
    idle: float = 0.0,
    done: bool = False,
    pending: bool = False,
    opening: bool = False,
    **kw: object,
) -> VerifierSession:
    s = VerifierSession.from_open(open_(device, sid, **kw))
    s.last_active = NOW - idle
    s.pending, s.opening = pending, opening
    if done:
        s.finish_reason = "length"
    return s


def screen(m: OpenSession, *table: VerifierSession) -> OpenDecision:
    old = next((s for s in table if s.key == f"{m.device_id}/{m.session_id}"), None)
    return screen_open(m, session_instance(m), old, table, LIMITS, NOW)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"tokenizer": "other"}, "tokenizer_mismatch"),
        ({"prompt": (1, 100)}, "token_out_of_range"),
        ({"committed": (5, 200)}, "token_out_of_range"),
        ({"prompt": tuple(range(17))}, "prompt_too_long"),
    ],
)
def test_bad_opens_are_refused_with_their_reason(change: dict[str, object], reason: str) -> None:
    d = screen(open_(**change))
    assert (d.action, d.reason) == ("refuse", reason)


def test_a_new_session_is_served() -> None:
    d = screen(open_())
    assert d.action == "serve" and d.replace is None and d.evict is None


def test_another_generation_on_a_live_id_is_refused() -> None:
    live = held(prompt=(9, 9))  # another prompt: another instance
    d = screen(open_(), live)
    assert (d.action, d.reason) == ("refuse", "session_taken")


@pytest.mark.parametrize("state", [{"done": True}, {"idle": 11.0}])
def test_another_generation_replaces_a_finished_or_idle_one(state: dict[str, object]) -> None:
    old = held(prompt=(9, 9), **state)  # type: ignore[arg-type]
    d = screen(open_(), old)
    assert d.action == "serve" and d.replace is old


def test_an_idle_one_with_a_draft_waiting_is_not_replaced() -> None:
    d = screen(open_(), held(prompt=(9, 9), idle=60.0, pending=True))
    assert d.reason == "session_taken"


def test_epochs_of_the_same_instance() -> None:
    old = held(epoch=2)
    old.commit([7, 8], "")
    stale = screen(open_(epoch=1), old)
    assert (stale.action, stale.reason, stale.committed_len) == ("resync", "stale_epoch", 2)
    assert screen(open_(epoch=2), old).action == "duplicate"
    reopen = screen(open_(epoch=3), old)
    assert reopen.action == "serve" and reopen.replace is None


def test_the_device_limit_counts_only_that_device() -> None:
    table = (held("d1", "a"), held("d1", "b"))
    assert screen(open_("d1", "c"), *table).reason == "device_session_limit"
    assert screen(open_("d2", "c"), *table).action == "serve"


def test_a_replaced_session_does_not_count_against_the_limit() -> None:
    table = (held("d1", "a"), held("d1", "s1", prompt=(9,), done=True))
    d = screen(open_("d1", "s1"), *table)
    assert d.action == "serve" and d.replace is table[1]


def test_a_full_verifier_evicts_finished_then_stale_then_the_heaviest_device() -> None:
    busy = [held("d1", "a"), held("d1", "b"), held("d2", "c")]
    done = held("d3", "x", done=True, idle=1.0)
    d = screen(open_("d4", "n"), *busy, done)
    assert d.action == "serve" and d.evict is done
    stale = held("d3", "x", idle=30.0)
    assert screen(open_("d4", "n"), *busy, stale).evict is stale
    fresh = held("d3", "x", idle=1.0)
    d = screen(open_("d4", "n"), *busy, fresh)
    assert d.evict is not None and d.evict.device_id == "d1"


def test_a_full_verifier_refuses_when_nobody_holds_more_than_the_opener() -> None:
    table = [held(f"d{i}", "a") for i in range(4)]
    d = screen(open_("d9", "n"), *table)
    assert (d.action, d.reason) == ("refuse", "too_many_sessions")


def test_sessions_waiting_or_opening_are_never_victims() -> None:
    table = [held("d1", "a", done=True, pending=True), held("d1", "b", done=True, opening=True)]
    assert victim(table, 0, 10.0, NOW) is None
