"""The controller feeding the latency model from protocol fields and planning batches."""

from __future__ import annotations

import pytest

from middleware.protocol import Draft
from middleware.verifier.batcher import Pending
from middleware.verifier.control import Controller
from middleware.verifier.planner import JointPlanner, PlannerConfig, UniformPlanner


def test_round_trip_is_gap_minus_think_time_and_drafting_time_is_reported() -> None:
    c = Controller(JointPlanner())
    c.on_answer("s1", now=10.0)
    c.on_draft("s1", Draft("s1", 1, 1, 0, (1, 2, 3, 4), think_ms=30.0, token_ms=5.0), now=10.050)
    est = c.model.device("s1")
    assert est.rtt_s == pytest.approx(0.020, abs=1e-9)  # 50 ms gap - 30 ms thinking
    assert est.draft_s == pytest.approx(0.005, rel=1e-6)
    c.on_round("s1", proposed=4, accepted=4, now=11.0)
    assert c.model.device("s1").alpha > c.model.priors.alpha  # all accepted: alpha goes up
    c.forget("s1")
    assert "s1" not in c.model and c.hint("s1") == 0


def test_lone_waiting_draft_goes_now_and_every_session_gets_a_hint() -> None:
    c = Controller(JointPlanner(PlannerConfig(k_max=8)))
    waiting = [Pending("s1", Draft("s1", 1, 1, 0, (1, 2)), arrived=99.0)]
    take, wait = c.decide(waiting, now=100.0, idle=[])
    assert list(take) == ["s1"] and wait == 0.0
    assert 1 <= c.hint("s1") <= 8


def test_waits_for_a_session_about_to_arrive_but_never_past_the_bound() -> None:
    c = Controller(JointPlanner(PlannerConfig(max_wait_s=0.05)))
    for sid in ("a", "b"):  # two fast sessions, known round trips of ~2 ms
        for t in range(20):
            c.on_answer(sid, now=t)
            c.on_draft(sid, Draft(sid, 1, t + 1, 0, (1, 2), token_ms=0.1), now=t + 0.002)
    c.on_answer("b", now=100.0)  # b's verdict just left: its draft is ~2 ms away
    waiting = [Pending("a", Draft("a", 1, 99, 0, (1, 2)), arrived=100.0)]
    take, wait = c.decide(waiting, now=100.0, idle=["b"])
    assert not take and 0 < wait <= 0.05  # batching b with a is worth ~2 ms of waiting
    assert c.plans == 1
    # Told it drafts slowly (20 ms a token), b is far off: a goes alone, now.
    for t in range(20):
        c.on_draft("b", Draft("b", 1, 50 + t, 0, (1, 2), token_ms=20.0), now=100.0)
    take, wait = c.decide(waiting, now=100.0, idle=["b"])
    assert list(take) == ["a"] and wait == 0.0


def test_a_round_holding_a_sessions_first_draft_is_left_out_of_the_forward_fit() -> None:
    """That round also timed the prefill of the session's prompt: no verify cost of its shape."""
    c = Controller(JointPlanner())
    c.on_forward(rows=2, tokens_per_row=3, seconds=5.0)  # s1's first round: prompt prefill
    c.on_round("s1", proposed=2, accepted=2, now=1.0)
    c.on_round("s2", proposed=2, accepted=1, now=1.0)
    c.on_forward(rows=2, tokens_per_row=3, seconds=0.1)  # both verified before: a verify cost
    c.on_round("s1", proposed=2, accepted=2, now=2.0)
    c.on_round("s2", proposed=2, accepted=2, now=2.0)
    c.decide([], now=3.0, idle=[])  # a plan takes in the last round's observation
    assert len(c.model.forward) == 1
    assert c.model.forward.predict(2, 3) == pytest.approx(0.1, rel=1e-2)  # not ~2.5 s
    c.forget("s1")  # a session opened again under the same id prefills again
    c.on_forward(rows=1, tokens_per_row=3, seconds=4.0)
    c.on_round("s1", proposed=2, accepted=0, now=4.0)
    c.on_forward(rows=1, tokens_per_row=3, seconds=0.05)
    assert len(c.model.forward) == 1


def test_split_threshold_follows_the_fitted_forward_cost() -> None:
    """overhead_tokens = fixed cost / per-token cost of the fitted forward model."""
    c = Controller(JointPlanner())
    assert c.overhead_tokens() is None  # nothing observed yet
    a, b, per_token = 0.120, 0.002, 0.006  # s: fixed, per row, per row-token
    for rows, tokens in ((1, 1), (4, 3), (8, 5), (16, 2), (2, 9), (12, 4), (1, 1)):
        c.on_forward(rows, tokens, a + b * rows + per_token * rows * tokens)
    c.on_forward(1, 1, a + b + per_token)  # flushes the held observation
    assert c.overhead_tokens() == round(a / per_token)


def test_a_devices_next_session_starts_from_what_its_last_one_taught() -> None:
    c = Controller(JointPlanner(PlannerConfig(k_max=8)), default_k=4)
    c.bind("d1-s1", "d1")
    for t in range(30):  # a slow link, a drafter the target rarely agrees with
        c.on_answer("d1-s1", now=float(t))
        c.on_draft("d1-s1", Draft("d1-s1", 1, t + 1, 0, (1, 2), token_ms=2.0), now=t + 0.080)
        c.on_round("d1-s1", proposed=2, accepted=0, now=t + 0.5)
    learnt = c.model.device("d1-s1")
    assert learnt.device_id == "d1-s1" and learnt.rtt_s > 0.05 and learnt.alpha < 0.2
    c.decide([Pending("d1-s1", Draft("d1-s1", 1, 31, 0, (1, 2)), arrived=40.0)], now=40.0, idle=[])
    told = c.hint("d1-s1")
    c.forget("d1-s1")
    assert c.hint("d1-s1") == 0 and "d1-s1" not in c.model
    assert c.first_hint("d1") == told and c.first_hint("d2") == 4  # unknown device: default
    c.bind("d1-s2", "d1")  # the device's next session: same link, same drafter
    again = c.model.device("d1-s2")
    assert (again.device_id, again.rtt_s, again.alpha) == ("d1-s2", learnt.rtt_s, learnt.alpha)
    c.bind("d2-s1", "d2")
    assert c.model.device("d2-s1").alpha == c.model.priors.alpha  # other devices: the priors


def test_a_device_that_drafts_less_than_told_is_expected_sooner_and_shorter() -> None:
    c = Controller(UniformPlanner(4))
    c.bind("s", "dev")
    for t in range(40):  # told 4 tokens each round, its confidence stop sends 2
        draft = Draft("s", 1, t + 1, 0, (1, 2), token_ms=50.0)
        assert c.decide([Pending("s", draft, arrived=float(t))], now=float(t), idle=[])[0]
        c.on_round("s", proposed=2, accepted=2, now=float(t))
        assert c.hint("s") == 4
        c.on_draft("s", draft, now=t + 0.110)
    est = c.model.device("s")
    assert est.fill == pytest.approx(0.5, abs=0.01)
    assert est.drafted(4) == pytest.approx(2.0, abs=0.05)
    assert est.turnaround_s(4) == pytest.approx(est.rtt_s + 2 * 0.050, abs=0.005)
    assert c.model.device("other").fill == 1.0  # unknown devices draft what they are told


def _fitted(c: Controller, a: float, b: float, per_token: float) -> None:
    for rows, tokens in ((1, 2), (4, 3), (8, 5), (16, 2), (2, 9)):
        c.model.forward.observe(rows, tokens, a + rows * (b + per_token * tokens))


def test_verify_cap_trims_one_long_draft_that_pads_every_row_when_tokens_are_dear() -> None:
    c = Controller(UniformPlanner(4))
    _fitted(c, a=0.1, b=0.005, per_token=0.006)  # a CPU: every row-token costs
    rows = [(f"s{i}", 1) for i in range(7)] + [("long", 8)]
    for sid, _ in rows:  # a drafter the target agrees with half the time
        for _ in range(30):
            c.on_round(sid, proposed=4, accepted=1, now=0.0)
    cap = c.verify_cap(rows)
    assert 1 <= cap < 8

    def cost(cap: int) -> float:  # the rule, computed independently
        v = c.model.forward.predict(len(rows), cap + 1)
        return sum(
            (v + c.model.device(s).rtt_s) / c.model.device(s).expected_committed(min(cap, n))
            for s, n in rows
        )

    assert cost(cap) == min(cost(k) for k in range(1, 9))


def test_verify_cap_keeps_whole_drafts_when_a_forward_costs_the_same_for_any_length() -> None:
    c = Controller(UniformPlanner(4))
    _fitted(c, a=0.02, b=0.0, per_token=0.0)  # a GPU at small batch: length is free
    rows = [("a", 1), ("b", 2), ("c", 12)]
    assert c.verify_cap(rows) == 12
    assert c.verify_cap([("a", 1)]) == 1 and c.verify_cap([]) == 0
    assert Controller(UniformPlanner(4)).verify_cap(rows) == 12  # nothing fitted yet: no cap
