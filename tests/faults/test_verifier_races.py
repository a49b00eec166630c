"""A session re-opened while one of its drafts is inside a forward pass.

Found by the half-open-link test: a device that went offline re-opens with the
committed tokens it has (possibly fewer than the verifier's, its last verdict
lost), while the verifier is still verifying the previous epoch's draft in its
worker thread.  The finished round must not be applied to the re-opened session:
its tokens continue another context, and appending them would commit tokens the
target never chose at those positions.  Driven by hand over the in-memory bus
with an engine that holds the forward pass until the test releases it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

from middleware.metrics import Registry
from middleware.protocol import Draft, OpenSession, Topics, Verdict, decode
from middleware.verifier.engine import TargetEngine, VerifyItem
from middleware.verifier.service import VerifierConfig, VerifierService
from tests.faults.audit import Audit
from tests.unit.membus import InMemoryBroker, InMemoryBus
from tests.unit.tiny import EOS

T = Topics()
PROMPT = (1, 11, 12, 13, 14, 15, 16, 17, 18)  # its continuation has no long runs of one token


class GatedEngine(TargetEngine):
    """Holds every forward pass until :attr:`gate` is set."""

    def __init__(self, model: object) -> None:
        super().__init__(model)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def verify_batch(self, items: Sequence[VerifyItem]) -> list:  # type: ignore[override]
        self.entered.set()
        assert self.gate.wait(30), "the test never released the forward pass"
        return super().verify_batch(items)


async def test_round_finishing_after_a_reopen_is_not_applied(
    tiny_target, reference, fault_report
) -> None:
    ref = reference(PROMPT, 16)
    engine = GatedEngine(tiny_target)
    broker = InMemoryBroker()
    async with InMemoryBus(broker, "v") as vbus, InMemoryBus(broker, "dev") as dbus:
        verifier = VerifierService(
            vbus,
            engine,
            tokenizer_fingerprint="tiny",
            config=VerifierConfig(verifier_id="v1"),
            registry=Registry(),
        )
        async with (
            asyncio.TaskGroup() as tg,
            dbus.subscribe(T.device_sessions("dev", "verdict")) as sub,
        ):
            task = tg.create_task(verifier.run())
            await verifier.ready.wait()

            async def send(msg: OpenSession | Draft) -> Verdict:
                leaf = "open" if isinstance(msg, OpenSession) else "draft"
                await dbus.publish(T.session("dev", "s1", leaf), msg.encode())
                return decode((await sub.get(10)).payload, expect=Verdict)

            def open_(epoch: int, committed: Sequence[int]) -> OpenSession:
                return OpenSession(
                    session_id="s1",
                    device_id="dev",
                    epoch=epoch,
                    seq=epoch * 100,
                    tokenizer="tiny",
                    prompt=PROMPT,
                    committed=tuple(committed),
                    max_new_tokens=16,
                    stop_ids=(EOS,),
                )

            engine.gate.set()
            assert (await send(open_(1, ref[:5]))).kind == "opened"
            engine.gate.clear()
            engine.entered.clear()
            # A draft on base 5 enters the forward pass and is held there ...
            await dbus.publish(
                T.session("dev", "s1", "draft"), Draft("s1", 1, 1, 5, tuple(ref[5:8])).encode()
            )
            assert await asyncio.to_thread(engine.entered.wait, 10)
            # ... while the device re-opens with only 2 committed tokens (it missed a verdict):
            # the verifier answers with the 5 it committed itself (the device catches up).
            reopened = await send(open_(2, ref[:2]))
            assert (reopened.kind, reopened.epoch, reopened.committed_len) == ("opened", 2, 5)
            assert (reopened.base, reopened.tokens) == (2, tuple(ref[2:5]))
            engine.gate.set()
            # The held round finishes; the next draft of the new epoch is verified on base 5.
            await dbus.publish(
                T.session("dev", "s1", "draft"), Draft("s1", 2, 201, 5, tuple(ref[5:9])).encode()
            )
            verdicts = [decode((await sub.get(10)).payload, expect=Verdict)]
            while verdicts[-1].seq != 201:
                verdicts.append(decode((await sub.get(10)).payload, expect=Verdict))
            task.cancel()

    stale = [v for v in verdicts if v.seq == 1 and v.kind == "accept"]
    assert not stale, f"a round of epoch 1 was applied to epoch 2: {stale}"
    v = verdicts[-1]
    assert (v.kind, v.epoch, v.base, v.tokens) == ("accept", 2, 5, tuple(ref[5:10]))
    committed = verifier.sessions["dev/s1"].committed
    assert committed == list(ref[:10])
    fault_report.record(
        faults=1,
        audits=[Audit("s1", 10, len(committed), 0, 0, True, 0, 0)],
        stale_round="not applied",
    )
