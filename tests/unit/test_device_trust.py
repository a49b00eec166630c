"""The device side of session identity and trust, against a scripted verifier (in-memory bus).

Each rule of the contract (middleware/protocol/session.py "Identity and trust") has a test:
verdicts of another instance are ignored, an ``opened`` verdict is authoritative (rollback and
a correction chunk), retained state is only a hint (another instance's is never used, one
beyond the claim is never shown before ``opened`` confirms it), a refused "session id in use"
ends with a refused result, and text chunks and results carry instance and request id.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

import pytest

from middleware.nodes.drafters import make_drafter
from middleware.nodes.journal import Journal, JournalEntry
from middleware.nodes.link import BusLink
from middleware.nodes.service import NodeConfig, NodeService
from middleware.nodes.session import DeviceSession, SessionConfig
from middleware.nodes.text import TextStream
from middleware.protocol import (
    PromptRequest,
    Result,
    SamplingParams,
    SessionState,
    TextChunk,
    Topics,
    Verdict,
    decode,
)
from tests.unit.membus import InMemoryBroker, InMemoryBus
from tests.unit.scripted_verifier import ScriptedVerifier
from tests.unit.tiny import EOS, TinyTokenizer

DEV = "dev-1"
TRUTH = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]
PROMPT = (1, 5, 9)
FORGED = 77  # never in TRUTH: a forged token; its text " w77" must never be shown
TOPICS = Topics("mw/t")


def _texts(chunks: Sequence[TextChunk]) -> str:
    return "".join(c.text for c in chunks)


async def _run_session(
    *,
    committed: Sequence[int] = (),
    epoch: int = 0,
    nonce: str | None = None,
    before: Callable[[DeviceSession, InMemoryBus], Awaitable[None]] | None = None,
    **script: Any,
) -> tuple[DeviceSession, list[TextChunk], ScriptedVerifier, TextStream]:
    broker = InMemoryBroker()
    chunks: list[TextChunk] = []
    async with InMemoryBus(broker, "v") as vbus, InMemoryBus(broker, "d") as dbus:
        verifier = ScriptedVerifier(vbus, TOPICS, DEV, list(TRUTH), **script)
        link = BusLink(dbus, TOPICS, DEV)
        stream = TextStream(TinyTokenizer(), "s1", DEV, chunks.append, committed=committed)
        session = DeviceSession(
            session_id="s1",
            device_id=DEV,
            prompt=PROMPT,
            tokenizer_fp="tiny",
            drafter=make_drafter("ngram"),
            link=link,
            sink=stream,
            config=SessionConfig(max_new_tokens=len(TRUTH), stop_ids=(EOS,), rto_initial=5.0),
            committed=committed,
            epoch=epoch,
            nonce=nonce,
        )
        stream.instance = session.instance
        if before is not None:
            await before(session, vbus)
        v_ready, l_ready = asyncio.Event(), asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(verifier.run(v_ready)), tg.create_task(link.run(l_ready))]
            await v_ready.wait()
            await l_ready.wait()
            await link.attach("s1")
            try:
                await asyncio.wait_for(session.run(), 30)
            finally:
                for t in tasks:
                    t.cancel()
    return session, chunks, verifier, stream


async def test_fresh_session_has_nonce_and_instance_on_everything() -> None:
    session, chunks, verifier, stream = await _run_session()
    assert session.committed == TRUTH
    assert len(session.nonce) == 16 and verifier.opens[0].nonce == session.nonce
    assert verifier.opens[0].committed == ()
    assert chunks and all(c.instance == session.instance for c in chunks)
    assert stream.text == TinyTokenizer().decode(TRUTH)


async def test_two_generations_have_different_instances() -> None:
    a, *_ = await _run_session()
    b, *_ = await _run_session()
    assert a.nonce != b.nonce and a.instance != b.instance


async def test_verdict_of_another_instance_is_ignored() -> None:
    """A forged (or another generation's) verdict for the same session, epoch and seq arrives
    before the real one: the device ignores it and counts it."""

    def forge(d: Any, v: Verdict) -> list[Verdict]:
        if v.kind != "accept":
            return [v]
        fake = replace(v, instance="ab" * 8, tokens=tuple(FORGED for _ in v.tokens))
        return [fake, v]

    session, chunks, _, stream = await _run_session(on_draft=forge)
    assert session.committed == TRUTH
    assert session.stats.ignored > 0
    assert " w77" not in _texts(chunks) and stream.text == TinyTokenizer().decode(TRUTH)


async def test_opened_with_correction_tokens_rolls_back_and_emits_a_correction() -> None:
    """A resumed claim whose tail is wrong: ``opened`` names the truth from position 2; the
    device rolls back, shows a correction from there, and goes on to the target's output."""
    claim = [*TRUTH[:2], FORGED, FORGED + 1]
    session, chunks, verifier, stream = await _run_session(committed=claim, epoch=1)
    assert verifier.opens[0].committed == tuple(claim)  # sent as a claim
    corrections = [c for c in chunks if c.kind == "correction"]
    assert corrections and corrections[0].pos == 2 and corrections[0].n_tokens == 1
    assert corrections[0].text == f" w{TRUTH[2]}"
    assert session.committed == TRUTH and session.stats.corrections >= 1
    assert stream.text == TinyTokenizer().decode(TRUTH)
    assert all(c.pos >= 2 for c in chunks)  # nothing before the first difference is re-sent


async def test_opened_shorter_without_tokens_truncates() -> None:
    """``opened`` with a committed length under the claim and no tokens: the device keeps
    only that many tokens (a correction chunk with no text) and continues from there."""
    claim = [*TRUTH[:3], FORGED]

    def short(o: Any) -> Verdict:
        return replace(
            ScriptedVerifier.prove(verifier_for_proof, o), base=0, tokens=(), committed_len=3
        )

    verifier_for_proof = ScriptedVerifier(None, TOPICS, DEV, list(TRUTH))  # type: ignore[arg-type]
    session, chunks, _, stream = await _run_session(committed=claim, epoch=1, on_open=short)
    first = chunks[0]
    assert first.kind == "correction" and first.pos == 3 and first.n_tokens == 0
    assert session.committed == TRUTH and stream.text == TinyTokenizer().decode(TRUTH)


async def test_opened_that_does_not_fit_the_claim_is_not_applied() -> None:
    """An ``opened`` claiming more tokens than the claim without carrying them cannot be
    applied (nothing to fill the gap with): the device opens again."""
    answered: list[int] = []

    def once_bad(o: Any) -> Verdict | None:
        answered.append(o.epoch)
        if len(answered) == 1:
            return Verdict(o.session_id, o.epoch, o.seq, "opened", committed_len=5, verifier_id="v")
        return None

    session, _, verifier, _ = await _run_session(on_open=once_bad, committed=TRUTH[:2], epoch=1)
    assert len(verifier.opens) >= 2 and session.committed == TRUTH


async def test_forged_retained_state_of_another_instance_is_never_used() -> None:
    forged_tokens = (*TRUTH[:3], FORGED, FORGED, FORGED)

    async def forge(session: DeviceSession, vbus: InMemoryBus) -> None:
        st = SessionState(
            "s1", DEV, 50, "v-evil", "open", forged_tokens, instance="cd" * 8, tag="00" * 16
        )
        await vbus.publish(TOPICS.session(DEV, "s1", "state"), st.encode(), retain=True)

    session, chunks, verifier, _ = await _run_session(committed=TRUTH[:3], epoch=1, before=forge)
    assert verifier.opens[0].committed == tuple(TRUTH[:3])  # the forged tokens not even claimed
    assert verifier.opens[0].epoch == 2  # nor its epoch adopted
    assert verifier.opens[0].tag == ""
    assert session.stats.ignored == 1
    assert " w77" not in _texts(chunks) and session.committed == TRUTH


async def test_retained_state_beyond_the_claim_is_claimed_but_not_shown_unless_proven() -> None:
    """State of our own instance extends the claim; its wrong tokens, refused by ``opened``,
    were never shown as verified (no correction needed: they were never shown at all)."""

    async def state(session: DeviceSession, vbus: InMemoryBus) -> None:
        st = SessionState(
            "s1",
            DEV,
            3,
            "v1",
            "open",
            (*TRUTH[:3], FORGED, FORGED),
            instance=session.instance,
            tag="11" * 16,
        )
        await vbus.publish(TOPICS.session(DEV, "s1", "state"), st.encode(), retain=True)

    session, chunks, verifier, _ = await _run_session(committed=TRUTH[:3], epoch=1, before=state)
    first = verifier.opens[0]
    assert first.committed == (*TRUTH[:3], FORGED, FORGED) and first.tag == "11" * 16
    assert first.epoch == 4  # the state's epoch, plus one
    assert " w77" not in _texts(chunks)
    assert not [c for c in chunks if c.kind == "correction"]
    assert session.committed == TRUTH


async def test_retained_state_of_own_instance_proven_is_committed() -> None:
    async def state(session: DeviceSession, vbus: InMemoryBus) -> None:
        st = SessionState("s1", DEV, 1, "v1", "open", tuple(TRUTH[:6]), instance=session.instance)
        await vbus.publish(TOPICS.session(DEV, "s1", "state"), st.encode(), retain=True)

    session, chunks, verifier, stream = await _run_session(
        committed=TRUTH[:2], epoch=1, before=state
    )
    assert verifier.opens[0].committed == tuple(TRUTH[:6])
    assert chunks[0].kind == "verified" and chunks[0].pos == 2 and chunks[0].n_tokens == 4
    assert session.committed == TRUTH and stream.text == TinyTokenizer().decode(TRUTH)


# --- the node service ------------------------------------------------------------------
async def _node(
    script: dict[str, Any] | None = None,
    journal: Journal | None = None,
    body: Callable[[NodeService, InMemoryBus], Awaitable[None]] | None = None,
    setup: Callable[[NodeService], None] | None = None,
    **cfg: Any,
) -> tuple[NodeService, ScriptedVerifier, InMemoryBroker]:
    broker = InMemoryBroker()
    async with InMemoryBus(broker, "v") as vbus, InMemoryBus(broker, "d") as dbus:
        verifier = ScriptedVerifier(vbus, TOPICS, DEV, list(TRUTH), **(script or {}))
        node = NodeService(
            dbus,
            tokenizer=TinyTokenizer(),
            tokenizer_fp="tiny",
            drafter_factory=lambda: make_drafter("ngram"),
            drafter_name="ngram",
            config=NodeConfig(
                device_id=DEV,
                prefix="mw/t",
                ha_discovery=False,
                session=SessionConfig(
                    max_new_tokens=len(TRUTH), stop_ids=(EOS,), sampling=SamplingParams()
                ),
                **cfg,
            ),
            journal=journal,
        )
        if setup is not None:
            setup(node)
        v_ready = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(verifier.run(v_ready))]
            await v_ready.wait()
            tasks.append(tg.create_task(node.run()))
            await node.ready.wait()
            try:
                if body is not None:
                    await asyncio.wait_for(body(node, vbus), 30)
            finally:
                for t in tasks:
                    t.cancel()
    return node, verifier, broker


async def _result_of(bus: InMemoryBus, sid: str) -> Result:
    async with bus.subscribe(TOPICS.session(DEV, sid, "result")) as sub:
        return decode((await sub.get(20)).payload, expect=Result)


async def test_result_and_chunks_carry_instance_and_request_id() -> None:
    got: dict[str, Any] = {}

    async def body(node: NodeService, vbus: InMemoryBus) -> None:
        async with (
            vbus.subscribe(TOPICS.session(DEV, "job", "text")) as text,
            vbus.subscribe(TOPICS.session(DEV, "job", "result")) as res,
        ):
            req = PromptRequest("w1 w5 w9", session_id="job", request_id="req-42", chat=False)
            await vbus.publish(TOPICS.device_inbox(DEV), req.encode())
            got["result"] = decode((await res.get(20)).payload, expect=Result)
            await node.flush()
            got["chunks"] = [decode(m.payload, expect=TextChunk) for m in _drain(text)]

    _, verifier, broker = await _node(body=body)
    r: Result = got["result"]
    assert r.request == "req-42" and r.verified and r.finish_reason == "length"
    assert broker.retained[TOPICS.session(DEV, "job", "result")].expiry == 86_400.0
    from middleware.protocol.session import session_instance

    assert r.instance == session_instance(verifier.opens[0])
    assert got["chunks"] and {c.instance for c in got["chunks"]} == {r.instance}
    assert json.loads(r.encode())["request"] == "req-42"


def _drain(sub: Any) -> list[Any]:
    out = []
    while not sub._queue.empty():
        item = sub._queue.get_nowait()
        if item is not sub._CLOSED:
            out.append(item)
    return out


async def test_refused_session_id_in_use_ends_with_a_refused_result() -> None:
    def refuse(o: Any) -> Verdict:  # naming the instance that holds the id
        return Verdict(
            o.session_id, o.epoch, o.seq, "refused", reason="session id in use", instance="9" * 16
        )

    got: dict[str, Any] = {}

    async def body(node: NodeService, vbus: InMemoryBus) -> None:
        waiter = asyncio.ensure_future(_result_of(vbus, "taken"))
        await asyncio.sleep(0)
        req = PromptRequest("w1 w2", session_id="taken", request_id="r-7", chat=False)
        await vbus.publish(TOPICS.device_inbox(DEV), req.encode())
        got["result"] = await waiter

    node, _, _ = await _node(script={"on_open": refuse}, body=body)
    r: Result = got["result"]
    assert r.finish_reason == "refused" and not r.verified
    assert "session id in use" in r.error and r.request == "r-7" and r.instance
    assert node.sessions_failed == 1


# --- journal: resume and republish ------------------------------------------------------
def test_journal_round_trip_and_bounds(tmp_path: Any) -> None:
    j = Journal(tmp_path / "j.sqlite", max_results=3, max_age_s=100.0)
    e = JournalEntry("s1", "aa" * 8, PROMPT, SamplingParams(mode="coupled", seed=3), 12, (EOS,))
    j.begin(e)
    j.progress("s1", [10, 11], "ff" * 16, 3)
    j.sending("s1", 7)
    j.published("s1", 1)
    j.sending("s1", 8)  # handed over, never acknowledged (the node died): numbered on
    j.close()
    j = Journal(tmp_path / "j.sqlite", max_results=3, max_age_s=100.0)
    (back,) = j.unfinished()
    assert back.committed == (10, 11) and back.tag == "ff" * 16 and back.epoch == 3
    assert (
        back.text_seq == 8
        and back.text_pos == 1
        and back.sampling == e.sampling
        and back.nonce == e.nonce
    )
    for i in range(5):
        j.finish(f"s{i}", f"r{i}".encode(), at=1000.0 + i)
    assert j.unfinished() == []  # s1 finished
    assert [r.session_id for r in j.results(now=1010.0)] == ["s2", "s3", "s4"]  # latest 3
    assert [r.session_id for r in j.results(now=1102.5)] == ["s3", "s4"]  # 100 s old: gone
    j.close()


async def test_node_resumes_an_unfinished_session_from_its_journal() -> None:
    """A node restarted with a journal holding a half-done session re-opens it with the same
    nonce and the journal's tokens as the claim; the result completes the target's output."""
    journal = Journal()
    journal.begin(
        JournalEntry(
            "s-old",
            "0123456789abcdef",
            PROMPT,
            SamplingParams(),
            len(TRUTH),
            (EOS,),
            committed=tuple(TRUTH[:4]),
            epoch=2,
            text_seq=5,
            text_pos=2,  # the broker acknowledged text up to token 2 only
            request_id="req-old",
        )
    )
    got: dict[str, Any] = {}
    chunks: list[TextChunk] = []

    async def body(node: NodeService, vbus: InMemoryBus) -> None:
        got["result"] = await _result_of(vbus, "s-old")

    def on_text(node: NodeService) -> None:
        node.on_text = chunks.append

    _, verifier, _ = await _node(journal=journal, body=body, setup=on_text)
    r: Result = got["result"]
    # Text of tokens 2..3 again (not acknowledged before the restart), numbered on from 5.
    assert (chunks[0].seq, chunks[0].kind, chunks[0].pos, chunks[0].n_tokens) == (
        6,
        "correction",
        2,
        2,
    )
    assert "".join(c.text for c in chunks) == TinyTokenizer().decode(TRUTH[2:])
    first = verifier.opens[0]
    assert first.nonce == "0123456789abcdef" and first.committed == tuple(TRUTH[:4])
    assert first.epoch >= 3
    assert r.request == "req-old" and r.verified and r.n_tokens == len(TRUTH)
    assert r.text == TinyTokenizer().decode(TRUTH)
    assert journal.unfinished() == [] and [s.session_id for s in journal.results()] == ["s-old"]


async def test_node_ends_a_too_old_unfinished_session_with_a_failed_result() -> None:
    journal = Journal()
    journal.begin(JournalEntry("s-stale", "00" * 8, PROMPT, SamplingParams(), 12, started_at=1.0))
    got: dict[str, Any] = {}

    async def body(node: NodeService, vbus: InMemoryBus) -> None:
        got["result"] = await _result_of(vbus, "s-stale")

    await _node(journal=journal, body=body, resume_max_age=60.0)
    r: Result = got["result"]
    assert r.finish_reason == "failed" and not r.verified and "too old" in r.error
    assert len(r.instance) == 16
    assert journal.unfinished() == []


async def test_recent_results_are_republished_on_start_with_expiry() -> None:
    journal = Journal()
    old = Result("s-done", DEV, " w10", 1, "stop", True, request="r1")
    journal.finish("s-done", old.encode())

    async def body(node: NodeService, vbus: InMemoryBus) -> None:
        await node.flush()

    node, _, broker = await _node(journal=journal, body=body, retained_expiry=3600.0)
    kept = broker.retained[TOPICS.session(DEV, "s-done", "result")]
    assert decode(kept.payload, expect=Result) == old
    assert kept.expiry is not None and 3500 < kept.expiry <= 3600
    assert node.republished == 1


async def test_session_id_already_active_on_the_node_is_refused() -> None:
    got: dict[str, Any] = {}

    async def body(node: NodeService, vbus: InMemoryBus) -> None:
        first = node.submit("w1 w2", session_id="dup", chat=False)
        await asyncio.sleep(0.05)
        with pytest.raises(Exception, match="in use"):
            await node.generate("w1 w3", session_id="dup", chat=False)
        assert [e.session_id for e in node.journal.unfinished()] == ["dup"]  # the first's
        got["first"] = await first

    await _node(body=body, script={"draft_delay": 0.05})
    assert got["first"].tokens == tuple(TRUTH)


# --- text chunks once ---------------------------------------------------------------------
class _UnconfirmedOnce(InMemoryBus):
    """A bus whose first text publish reaches the broker but is reported unconfirmed (its
    PUBACK lost with the connection), as MqttBus does: the transport re-sends it itself."""

    async def publish(self, topic: str, payload: bytes, **kw: Any) -> None:
        await super().publish(topic, payload, **kw)
        if topic.endswith("/text") and not getattr(self, "_failed_once", False):
            self._failed_once = True
            from middleware.errors import PublishUnconfirmed

            raise PublishUnconfirmed("no PUBACK in time")


async def test_an_unconfirmed_text_chunk_is_not_published_twice() -> None:
    broker = InMemoryBroker()
    seen: list[int] = []
    async with InMemoryBus(broker, "v") as vbus, _UnconfirmedOnce(broker, "d") as dbus:
        verifier = ScriptedVerifier(vbus, TOPICS, DEV, list(TRUTH))
        node = NodeService(
            dbus,
            tokenizer=TinyTokenizer(),
            tokenizer_fp="tiny",
            drafter_factory=lambda: make_drafter("ngram"),
            drafter_name="ngram",
            config=NodeConfig(
                device_id=DEV,
                prefix="mw/t",
                ha_discovery=False,
                session=SessionConfig(max_new_tokens=len(TRUTH), stop_ids=(EOS,)),
            ),
        )
        v_ready = asyncio.Event()
        async with (
            vbus.subscribe(TOPICS.session(DEV, "once", "text")) as text,
            asyncio.TaskGroup() as tg,
        ):
            tasks = [tg.create_task(verifier.run(v_ready))]
            await v_ready.wait()
            tasks.append(tg.create_task(node.run()))
            await node.ready.wait()
            out = await asyncio.wait_for(node.generate("w1 w2", session_id="once", chat=False), 30)
            await node.flush()
            for t in tasks:
                t.cancel()
            seen = [decode(m.payload, expect=TextChunk).seq for m in _drain(text)]
    assert out.tokens == tuple(TRUTH)
    assert seen and seen == sorted(set(seen)), seen  # each seq once
    assert seen == list(range(1, len(seen) + 1))


# --- with the real verifier (it proves claims) ----------------------------------------------
async def test_forged_state_of_the_same_instance_is_refused_by_the_verifiers_proof() -> None:
    """Development config, no ACL: anyone reading the open can compute the instance and
    forge a retained state of it.  The device only *claims* those tokens; the verifier must
    prove the claim (re-verify it during the re-open prefill), answer ``opened`` with the
    truth, and the forged tokens are never shown."""
    from middleware.verifier.engine import TargetEngine
    from middleware.verifier.reference import reference_greedy
    from middleware.verifier.service import VerifierConfig, VerifierService
    from tests.unit.tiny import tiny_llama

    target = tiny_llama(seed=0)
    ref = reference_greedy(target, list(PROMPT), 12, (EOS,))
    forged = (*ref[:3], *(t for t in (FORGED, FORGED + 1, FORGED + 2) if t not in ref))
    broker = InMemoryBroker()
    chunks: list[TextChunk] = []
    async with InMemoryBus(broker, "v") as vbus, InMemoryBus(broker, "d") as dbus:
        verifier = VerifierService(
            vbus,
            TargetEngine(target),
            tokenizer_fingerprint="tiny",
            config=VerifierConfig(verifier_id="v1", prefix="mw/t"),
        )
        link = BusLink(dbus, TOPICS, DEV)
        stream = TextStream(TinyTokenizer(), "s1", DEV, chunks.append, committed=ref[:3])
        session = DeviceSession(
            session_id="s1",
            device_id=DEV,
            prompt=PROMPT,
            tokenizer_fp="tiny",
            drafter=make_drafter("ngram"),
            link=link,
            sink=stream,
            config=SessionConfig(max_new_tokens=12, stop_ids=(EOS,)),
            committed=ref[:3],
            epoch=1,
        )
        stream.instance = session.instance
        st = SessionState("s1", DEV, 1, "v1", "open", forged, instance=session.instance)
        await vbus.publish(TOPICS.session(DEV, "s1", "state"), st.encode(), retain=True)
        l_ready = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(verifier.run()), tg.create_task(link.run(l_ready))]
            await verifier.ready.wait()
            await l_ready.wait()
            await link.attach("s1")
            try:
                out = await asyncio.wait_for(session.run(), 60)
            finally:
                for t in tasks:
                    t.cancel()
    assert out == ref
    assert " w77" not in _texts(chunks)
