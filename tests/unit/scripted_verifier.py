"""A scripted stand-in for the verifier (unit tests only): answers opens and drafts of one
device over the in-memory bus from a known truth, and lets a test forge or alter answers.

It follows the identity contract (docs/threat-model.md): verdicts carry the open's
instance; ``opened`` answers come from ``on_open`` (default: the claim, as far as it
agrees with the truth, with the truth's tokens from the first difference).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from middleware.broker_bridge.bus import CONTENT_MSGPACK, Bus
from middleware.nodes.drafters.base import common_prefix
from middleware.protocol import CloseSession, Draft, OpenSession, Topics, Verdict, decode
from middleware.protocol.session import session_instance


@dataclass
class ScriptedVerifier:
    bus: Bus
    topics: Topics
    device_id: str
    truth: list[int]  # the target's tokens for every session (ends the session)
    verifier_id: str = "v-scripted"
    # open -> the verdict to send (None: the default proof against the truth)
    on_open: Callable[[OpenSession], Verdict | None] | None = None
    # (draft, the verdict it would get) -> verdicts to publish instead, in order
    on_draft: Callable[[Draft, Verdict], list[Verdict]] | None = None
    draft_delay: float = 0.0  # seconds before each draft's answer (a slow verifier)
    opens: list[OpenSession] = field(default_factory=list)
    drafts: list[Draft] = field(default_factory=list)
    _inst: dict[str, str] = field(default_factory=dict)
    _committed: dict[str, int] = field(default_factory=dict)

    def prove(self, o: OpenSession) -> Verdict:
        """The honest answer: keep the claim up to its first difference with the truth."""
        inst = session_instance(o)
        same = common_prefix(o.committed, self.truth)
        if same < len(o.committed):
            tokens = tuple(self.truth[same : same + 1])
            return Verdict(
                o.session_id,
                o.epoch,
                o.seq,
                "opened",
                base=same,
                tokens=tokens,
                committed_len=same + len(tokens),
                verifier_id=self.verifier_id,
                instance=inst,
            )
        return Verdict(
            o.session_id,
            o.epoch,
            o.seq,
            "opened",
            committed_len=same,
            verifier_id=self.verifier_id,
            instance=inst,
            done=same >= len(self.truth),
        )

    async def publish(self, v: Verdict) -> None:
        await self.bus.publish(
            self.topics.session(self.device_id, v.session_id, "verdict"),
            v.encode(),
            qos=1,
            content_type=CONTENT_MSGPACK,
        )

    async def run(self, ready: asyncio.Event | None = None) -> None:
        async with (
            self.bus.subscribe(self.topics.device_sessions(self.device_id, "open")) as opens,
            self.bus.subscribe(self.topics.device_sessions(self.device_id, "draft")) as drafts,
        ):
            if ready is not None:
                ready.set()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._opens(opens))
                tg.create_task(self._drafts(drafts))

    async def _opens(self, sub) -> None:  # type: ignore[no-untyped-def]
        async for msg in sub:
            o = decode(msg.payload, expect=OpenSession)
            self.opens.append(o)
            v = (self.on_open(o) if self.on_open else None) or self.prove(o)
            if v.kind == "opened":
                self._inst[o.session_id] = v.instance or session_instance(o)
                self._committed[o.session_id] = v.committed_len
            await self.publish(v)

    async def _drafts(self, sub) -> None:  # type: ignore[no-untyped-def]
        async for msg in sub:
            d = decode(msg.payload)
            if isinstance(d, CloseSession):
                continue
            assert isinstance(d, Draft)
            self.drafts.append(d)
            if self.draft_delay:
                await asyncio.sleep(self.draft_delay)
            inst = self._inst.get(d.session_id, "")
            clen = self._committed.get(d.session_id, 0)
            if d.base > clen:
                v = Verdict(d.session_id, d.epoch, d.seq, "resync", instance=inst)
            else:
                ahead = self.truth[d.base :]
                acc = common_prefix(d.tokens, ahead)
                tokens = tuple(ahead[: acc + 1])
                end = d.base + len(tokens)
                self._committed[d.session_id] = max(clen, end)
                v = Verdict(
                    d.session_id,
                    d.epoch,
                    d.seq,
                    "accept",
                    base=d.base,
                    accepted=acc,
                    tokens=tokens,
                    committed_len=end,
                    done=end >= len(self.truth),
                    finish_reason="length" if end >= len(self.truth) else "",
                    verifier_id=self.verifier_id,
                    instance=inst,
                )
            for out in self.on_draft(d, v) if self.on_draft else [v]:
                await self.publish(out)
