"""The verifier's answers to every kind of awkward input, driven by hand over the in-memory bus.

A "device" here publishes raw protocol messages and reads the verdicts, so each
rule of the protocol (duplicate, behind, unknown, refused, malformed) is checked
directly, and other sessions keep being served meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import urllib.request
from collections.abc import AsyncIterator
from typing import ClassVar

import pytest

from middleware.broker_bridge.bus import Subscription
from middleware.metrics import Registry, serve_metrics
from middleware.protocol import (
    CloseSession,
    Draft,
    OpenSession,
    SessionState,
    Topics,
    Verdict,
    decode,
)
from middleware.verifier.engine import TargetEngine
from middleware.verifier.reference import reference_greedy
from middleware.verifier.service import VerifierConfig, VerifierService
from tests.unit.membus import InMemoryBroker, InMemoryBus
from tests.unit.tiny import EOS, VOCAB, tiny_llama

T = Topics()
PROMPT = (1, 5, 9, 13)


class Harness:
    def __init__(self, bus: InMemoryBus, verdicts: Subscription, verifier: VerifierService) -> None:
        self.bus, self.verdicts, self.verifier = bus, verdicts, verifier

    async def send(self, msg: OpenSession | Draft) -> None:
        leaf = "open" if isinstance(msg, OpenSession) else "draft"
        await self.bus.publish(T.session("dev", msg.session_id, leaf), msg.encode())

    async def raw(self, topic: str, payload: bytes) -> None:
        await self.bus.publish(topic, payload)

    async def verdict(self, sid: str, timeout: float = 10.0) -> Verdict:
        while True:
            msg = await self.verdicts.get(timeout)
            v = decode(msg.payload, expect=Verdict)
            if v.session_id == sid:
                return v

    async def open(
        self, sid: str, epoch: int = 1, committed: tuple[int, ...] = (), **kw: object
    ) -> Verdict:
        await self.send(
            OpenSession(
                session_id=sid,
                device_id="dev",
                epoch=epoch,
                seq=0,
                tokenizer="tiny",
                prompt=PROMPT,
                committed=committed,
                max_new_tokens=32,
                stop_ids=(EOS,),
                **kw,
            )
        )  # type: ignore[arg-type]
        return await self.verdict(sid)

    def rejected(self, reason: str) -> float:
        return self.verifier.metrics.rejected.get(reason=reason)


@contextlib.asynccontextmanager
async def running(
    engine: TargetEngine, config: VerifierConfig, broker: InMemoryBroker | None = None
) -> AsyncIterator[Harness]:
    """A verifier on ``engine`` serving over an in-memory broker, and device "dev"'s side."""
    broker = broker or InMemoryBroker()
    async with InMemoryBus(broker, "v") as vbus, InMemoryBus(broker, "dev") as dbus:
        verifier = VerifierService(
            vbus, engine, tokenizer_fingerprint="tiny", config=config, registry=Registry()
        )
        async with (
            asyncio.TaskGroup() as tg,
            dbus.subscribe(T.device_sessions("dev", "verdict")) as verdicts,
        ):
            task = tg.create_task(verifier.run())
            await verifier.ready.wait()
            yield Harness(dbus, verdicts, verifier)
            task.cancel()


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


@pytest.fixture
def config() -> VerifierConfig:
    return VerifierConfig(verifier_id="v1", max_draft=16)


@pytest.fixture
async def h(model, config: VerifierConfig) -> AsyncIterator[Harness]:
    async with running(TargetEngine(model), config) as harness:
        yield harness


async def test_open_then_draft_is_verified(h: Harness, model) -> None:
    ref = reference_greedy(model, PROMPT, 8, (EOS,))
    assert (await h.open("s1")).kind == "opened"
    await h.send(Draft("s1", 1, 1, 0, tuple(ref[:3])))
    v = await h.verdict("s1")
    assert (v.kind, v.accepted, v.tokens, v.committed_len) == ("accept", 3, tuple(ref[:4]), 4)


async def test_duplicate_draft_gets_the_same_verdict(h: Harness, model) -> None:
    ref = reference_greedy(model, PROMPT, 8, (EOS,))
    await h.open("s1")
    d = Draft("s1", 1, 1, 0, (ref[0], (ref[1] + 1) % VOCAB))
    await h.send(d)
    first = await h.verdict("s1")
    await h.send(d)  # QoS 1 redelivery
    again = await h.verdict("s1")
    assert first == again and first.accepted == 1
    assert h.verifier.sessions["dev/s1"].committed == list(ref[:2])  # took effect once


async def test_lost_verdict_heals_with_catchup(h: Harness, model) -> None:
    ref = reference_greedy(model, PROMPT, 8, (EOS,))
    await h.open("s1")
    await h.send(Draft("s1", 1, 1, 0, tuple(ref[:2])))
    await h.verdict("s1")  # pretend this verdict was lost on the way
    await h.send(Draft("s1", 1, 2, 0, tuple(ref[:4])))  # the device resends on the same base
    v = await h.verdict("s1")
    assert (v.kind, v.base, v.tokens, v.committed_len) == ("catchup", 0, tuple(ref[:3]), 3)


async def test_unknown_session_stale_epoch_and_ahead_base_get_resync(h: Harness) -> None:
    await h.send(Draft("ghost", 1, 1, 0, (3,)))
    assert (await h.verdict("ghost")).kind == "resync"
    await h.open("s1", epoch=2)
    await h.send(Draft("s1", 1, 5, 0, (3,)))
    v = await h.verdict("s1")
    assert v.kind == "resync" and "stale epoch" in v.reason
    await h.send(Draft("s1", 2, 6, 7, (3,)))
    v = await h.verdict("s1")
    assert v.kind == "resync" and "ahead" in v.reason
    assert h.rejected("stale_epoch") == 1 and h.rejected("ahead") == 1


async def test_reopen_with_committed_rebuilds_by_prefill(h: Harness, model) -> None:
    ref = reference_greedy(model, PROMPT, 10, (EOS,))
    v = await h.open("s1", epoch=3, committed=tuple(ref[:5]))
    assert (v.kind, v.committed_len) == ("opened", 5)
    await h.send(Draft("s1", 3, 1, 5, tuple(ref[5:8])))
    v = await h.verdict("s1")
    assert v.tokens == tuple(ref[5:9])


async def test_refusals_tokenizer_vocab_and_length(h: Harness) -> None:
    await h.send(
        OpenSession(
            session_id="bad", device_id="dev", epoch=1, seq=0, tokenizer="other", prompt=PROMPT
        )
    )
    v = await h.verdict("bad")
    assert v.kind == "refused" and "tokenizer" in v.reason
    await h.send(
        OpenSession(
            session_id="bad2",
            device_id="dev",
            epoch=1,
            seq=0,
            tokenizer="tiny",
            prompt=(1, VOCAB + 5),
        )
    )
    assert (await h.verdict("bad2")).kind == "refused"
    await h.open("s1")
    await h.send(Draft("s1", 1, 1, 0, (VOCAB + 1,)))
    v = await h.verdict("s1")
    assert v.kind == "refused" and "vocabulary" in v.reason
    await h.send(Draft("s1", 1, 2, 0, (3,) * 17))
    assert (await h.verdict("s1")).kind == "refused"
    assert h.rejected("tokenizer_mismatch") == 1 and h.rejected("token_out_of_range") == 2
    assert h.rejected("draft_too_long") == 1
    assert h.verifier.sessions["dev/s1"].committed == []  # nothing was committed by refused drafts


async def test_malformed_payloads_are_counted_and_dropped_others_still_served(
    h: Harness, model
) -> None:
    ref = reference_greedy(model, PROMPT, 8, (EOS,))
    await h.open("s1")
    garbage = [
        b"",
        b"\xc1",
        b"{not json",
        b"\x93\x01\x02\x03",
        b"\x81\xa1v\x02",
        Draft("other", 1, 1, 0, (1,)).encode(),
    ]  # session id not matching the topic
    for g in garbage:
        await h.raw(T.session("dev", "s1", "draft"), g)
    await h.raw(T.session("dev", "s1", "open"), Draft("s1", 1, 1, 0, (1,)).encode())  # wrong leaf
    await h.send(Draft("s1", 1, 1, 0, tuple(ref[:2])))
    v = await h.verdict("s1")
    assert v.kind == "accept" and v.tokens == tuple(ref[:3])
    assert h.rejected("malformed") == len(garbage) + 1


async def test_session_ids_are_per_device(h: Harness, model) -> None:
    """The device level of the topic names the session: another device using the same id
    gets a session of its own and cannot open over, draft into or close the first one; an
    open whose device id disagrees with its topic is dropped.  (Issue 14, scenario 4: one
    global namespace made the same id from two devices collide.)"""
    ref = reference_greedy(model, PROMPT, 8, (EOS,))
    await h.open("s1")  # device "dev"
    mallory = OpenSession(
        session_id="s1", device_id="mallory", epoch=9, seq=0, tokenizer="tiny", prompt=(2, 2, 2)
    )
    async with h.bus.subscribe(T.session("mallory", "s1", "verdict")) as to_mallory:
        await h.raw(T.session("mallory", "s1", "open"), mallory.encode())
        v = decode((await to_mallory.get(5)).payload, expect=Verdict)
        assert (v.kind, v.committed_len) == ("opened", 0)
        await h.raw(T.session("mallory", "s1", "draft"), Draft("s1", 1, 1, 0, (3, 3)).encode())
        v = decode((await to_mallory.get(5)).payload, expect=Verdict)
        assert v.kind == "resync"  # epoch 1 is stale for mallory's own session (epoch 9)
        await h.raw(
            T.session("mallory", "s1", "draft"), CloseSession("s1", 1, 2, "hijack").encode()
        )
        # an open claiming to be "dev" on mallory's topic
        await h.raw(
            T.session("mallory", "s9", "open"),
            OpenSession(
                session_id="s9", device_id="dev", epoch=1, seq=0, tokenizer="tiny", prompt=PROMPT
            ).encode(),
        )
        await h.send(Draft("s1", 1, 1, 0, tuple(ref[:3])))  # the owner goes on undisturbed
        v = await h.verdict("s1")
        assert (v.kind, v.tokens) == ("accept", tuple(ref[:4]))
        with pytest.raises(TimeoutError):
            await to_mallory.get(0.2)  # nothing else reached mallory
    assert h.verifier.sessions["dev/s1"].committed == list(ref[:4])
    assert h.verifier.sessions["mallory/s1"].prompt == (2, 2, 2)
    assert "dev/s9" not in h.verifier.sessions and "mallory/s9" not in h.verifier.sessions
    assert h.rejected("malformed") == 1  # the open whose device id disagrees with its topic


async def test_retained_state_tracks_committed(h: Harness, model) -> None:
    ref = reference_greedy(model, PROMPT, 8, (EOS,))
    await h.open("s1")
    await h.send(Draft("s1", 1, 1, 0, tuple(ref[:3])))
    await h.verdict("s1")
    async with h.bus.subscribe(T.session("dev", "s1", "state")) as sub:
        states = [decode((await sub.get(5)).payload, expect=SessionState)]
        # The retained state is published at most every state_interval while the session
        # runs: the one retained at subscribe time may still be the open's; the next is current.
        while states[-1].committed != tuple(ref[:4]):
            states.append(decode((await sub.get(5)).payload, expect=SessionState))
    st = states[-1]
    assert (st.owner, st.epoch, st.committed, st.status) == ("v1", 1, tuple(ref[:4]), "open")
    assert len(states) <= 2 and states[0].committed in ((), tuple(ref[:4]))


async def test_state_waits_for_its_interval_and_is_flushed_on_stop(model) -> None:
    """A running session's state goes out on the ``state_interval`` tick, never with each
    verdict (it was nearly one state per verdict under load); a clean stop (the service
    cancelled, as ``systemctl stop`` does) publishes what committed since the last tick."""
    ref = reference_greedy(model, PROMPT, 8, (EOS,))
    broker = InMemoryBroker()
    topic = T.session("dev", "s1", "state")
    config = VerifierConfig(verifier_id="v1", max_draft=16, state_interval=3600.0)
    async with running(TargetEngine(model), config, broker) as h:
        await h.open("s1")
        for seq, base in ((1, 0), (2, 4)):
            await h.send(Draft("s1", 1, seq, base, tuple(ref[base : base + 3])))
            assert (await h.verdict("s1")).committed_len == base + 4
        st = decode(broker.retained[topic].payload, expect=SessionState)
        assert st.committed == ()  # still the open's
    st = decode(broker.retained[topic].payload, expect=SessionState)  # flushed at the stop
    assert (st.committed, st.status, st.owner) == (tuple(ref[:8]), "open", "v1")


async def test_round_counters_add_up_over_a_batch(h: Harness, model) -> None:
    """Round counters are added once per batch: they still count every draft, verdict and
    token, in the wrapper and in the Prometheus exposition alike."""
    ref = reference_greedy(model, PROMPT, 8, (EOS,))
    for sid in ("s1", "s2", "s3"):
        await h.open(sid)
    wrong = (ref[0], (ref[1] + 1) % VOCAB)  # one accepted, then the target's own token
    for sid, draft in (("s1", tuple(ref[:3])), ("s2", wrong), ("s3", tuple(ref[:2]))):
        await h.send(Draft(sid, 1, 1, 0, draft))
    got = {v.session_id: v for v in [await h.verdict(s) for s in ("s1", "s2", "s3")]}
    assert [got[s].accepted for s in ("s1", "s2", "s3")] == [3, 1, 2]
    m = h.verifier.metrics
    assert (m.rounds.total(), m.answers.get(kind="accept")) == (3, 3)
    assert (m.proposed.total(), m.accepted.total(), m.committed.total()) == (7, 6, 9)
    assert m.tokens_per_round.count == 3 and m.tokens_per_round.sum == 9
    text = m.registry.render()
    assert "mw_verifier_rounds_total 3.0" in text
    assert 'mw_verifier_answers_total{kind="accept"} 3.0' in text
    assert "mw_verifier_committed_tokens_total 9.0" in text


@pytest.mark.parametrize("blocking", [True, False])
async def test_blocking_engines_verify_in_a_worker_thread(model, blocking: bool) -> None:
    """A model engine's rounds run off the event loop; one that says it does not block
    (the no-op benchmark engine) is called on the loop, with the same answers."""

    class Engine(TargetEngine):
        threads: ClassVar[set[int]] = set()

        def verify_batch(self, items):  # type: ignore[no-untyped-def]
            self.threads.add(threading.get_ident())
            return super().verify_batch(items)

    Engine.blocking = blocking  # type: ignore[misc]
    ref = reference_greedy(model, PROMPT, 8, (EOS,))
    async with running(Engine(model), VerifierConfig()) as h:
        await h.open("s1")
        Engine.threads.clear()  # the open's prefill always runs in a worker thread
        await h.send(Draft("s1", 1, 1, 0, tuple(ref[:3])))
        v = await h.verdict("s1")
    assert (v.kind, v.tokens) == ("accept", tuple(ref[:4]))
    on_loop = Engine.threads == {threading.get_ident()}
    assert on_loop is not blocking and len(Engine.threads) == 1


async def test_metrics_endpoint_serves_prometheus_text(h: Harness, model) -> None:
    ref = reference_greedy(model, PROMPT, 4, (EOS,))
    await h.open("s1")
    await h.send(Draft("s1", 1, 1, 0, tuple(ref[:2])))
    await h.verdict("s1")
    async with serve_metrics(h.verifier.metrics.registry, port=0) as port:
        body = await asyncio.to_thread(
            lambda: (
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
                .read()
                .decode()
            )
        )
    for name in (
        "mw_verifier_forward_passes_total",
        "mw_verifier_batch_size",
        "mw_verifier_accepted_tokens_total",
        "mw_verifier_queue_wait_seconds",
        "mw_verifier_live_sessions",
        "mw_verifier_kv_evictions",
        "mw_verifier_rejected_messages_total",
        "mw_verifier_forward_seconds",
    ):
        assert f"# TYPE {name}" in body, name
    assert "mw_verifier_accepted_tokens_total 2.0" in body


class PoisonedEngine(TargetEngine):
    """Fails any forward that contains the poisoned session (a stand-in for a bad input
    that breaks the model); everything else is the real engine."""

    poison = "bad-session"

    def verify_batch(self, items):  # type: ignore[no-untyped-def]
        if any(i.session_key == f"dev/{self.poison}" for i in items):  # (device, session)
            raise RuntimeError("simulated kernel failure")
        return super().verify_batch(items)


async def test_a_failing_session_does_not_stall_the_batch(model) -> None:
    ref = reference_greedy(model, PROMPT, 8, (EOS,))
    async with running(PoisonedEngine(model), VerifierConfig(verifier_id="v1")) as h:
        await h.open("good")
        await h.open(PoisonedEngine.poison)
        await h.send(Draft(PoisonedEngine.poison, 1, 1, 0, (3,)))
        await h.send(Draft("good", 1, 1, 0, tuple(ref[:2])))
        got = {}
        for _ in range(2):
            v = decode((await h.verdicts.get(10)).payload, expect=Verdict)
            got[v.session_id] = v
    assert got["good"].kind == "accept" and got["good"].tokens == tuple(ref[:3])
    assert got[PoisonedEngine.poison].kind == "refused"
    assert h.verifier.metrics.rejected.get(reason="verify_failed") == 1


async def test_verdicts_carry_the_trace_id_of_their_request(h: Harness, model) -> None:
    await h.open("s1")
    await h.send(Draft("s1", 1, 7, 0, (3,)))
    while True:
        msg = await h.verdicts.get(10)
        v = decode(msg.payload, expect=Verdict)
        if v.seq == 7:
            break
    assert msg.user_properties["trace"] == "s1/1/7"
    assert msg.content_type == "application/msgpack"


@pytest.mark.parametrize(
    "config", [VerifierConfig(verifier_id="v1", max_draft=16, max_sessions_per_device=2)]
)
async def test_one_device_cannot_take_every_session(h: Harness, model) -> None:
    assert (await h.open("a")).kind == "opened"
    assert (await h.open("b")).kind == "opened"
    v = await h.open("c")
    assert v.kind == "refused" and "device" in v.reason
    assert h.rejected("device_session_limit") == 1 and set(h.verifier.sessions) == {
        "dev/a",
        "dev/b",
    }
    assert (await h.open("a")).kind == "opened"  # a duplicate open of a held session still works


@pytest.mark.parametrize(
    "config", [VerifierConfig(verifier_id="v1", max_draft=16, session_idle_timeout=0.3)]
)
async def test_idle_sessions_expire_and_their_device_recovers_losslessly(h: Harness, model) -> None:
    ref = reference_greedy(model, PROMPT, 8, (EOS,))
    await h.open("s1")
    await h.send(Draft("s1", 1, 1, 0, tuple(ref[:2])))
    assert (await h.verdict("s1")).committed_len == 3
    for _ in range(40):  # the expiry check runs every timeout / 4
        if "dev/s1" not in h.verifier.sessions:
            break
        await asyncio.sleep(0.05)
    assert "dev/s1" not in h.verifier.sessions and h.verifier.metrics.expired.total() == 1
    await h.send(Draft("s1", 1, 2, 3, tuple(ref[3:5])))  # the device comes back
    assert (await h.verdict("s1")).kind == "resync"
    v = await h.open("s1", epoch=2, committed=tuple(ref[:3]))  # re-open with what it holds
    assert (v.kind, v.committed_len) == ("opened", 3)
    await h.send(Draft("s1", 2, 1, 3, tuple(ref[3:5])))
    v = await h.verdict("s1")
    assert v.tokens == tuple(ref[3:6])  # nothing lost, nothing changed
