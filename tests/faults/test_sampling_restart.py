"""A verifier restarted in the middle of sessions, in the two sampling modes (issue 14).

The restarted process never saw the sessions: devices re-open with their committed
tokens as a claim.  Coupled sampling: the new verifier re-verifies the claim through
the target (the noise is fixed by seed and position), and every output equals seeded
target-only sampling.  Rejection sampling: tokens cannot be re-derived; the verifiers
share a commit-tag key, so the claim is kept on its tag: nothing is rolled back and no
committed text is corrected.  (Without a shared key the claim is rolled back and the
device corrects: tests/unit/test_session_trust.py.)
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from middleware.nodes.drafters.hf import HFDrafter
from middleware.protocol import SamplingParams
from middleware.verifier.reference import reference_sample
from middleware.verifier.service import VerifierConfig
from tests.faults.audit import audit
from tests.faults.fleet import DeviceSpec, Fleet, Job
from tests.faults.scenario import TOKENIZER, prompts, session_config
from tests.faults.verifiers import InProcessVerifier
from tests.unit.tiny import EOS

MAX_NEW = 40
KEY = b"fleet-shared-commit-tag-key-0001"


@pytest.mark.parametrize("mode", ["coupled", "rejection"])
async def test_verifier_restart_mid_session_in_sampling_modes(
    mode: str, mosquitto, unique_prefix, tiny_target, tiny_draft, fault_report
) -> None:
    host, port = mosquitto.host, mosquitto.port
    sp = SamplingParams(mode=mode, temperature=1.0, seed=11)  # type: ignore[arg-type]
    pool = prompts(4, seed=41)
    devices = [DeviceSpec(f"d{i}", lambda: HFDrafter(tiny_draft, name="hf")) for i in range(2)]
    jobs = [Job(f"d{i % 2}", f"s{i}", p) for i, p in enumerate(pool)]
    sids = [j.session_id for j in jobs]
    config = VerifierConfig(tag_key=KEY)
    first = InProcessVerifier(tiny_target, host, port, unique_prefix, "v1", config=config)
    second = InProcessVerifier(tiny_target, host, port, unique_prefix, "v1", config=config)
    at_crash: dict[str, int] = {}
    async with Fleet(
        host,
        port,
        unique_prefix,
        devices,
        session=session_config(MAX_NEW, sampling=sp),
        tokenizer=TOKENIZER,
    ) as fleet:
        await fleet.start_verifier(first)

        async def fault() -> None:
            await fleet.wait_progress(6, sids)
            at_crash.update({s: fleet.progress(s) for s in sids})
            await first.crash()
            await fleet.start_verifier(second)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(fault(), name="fault")
            outcomes = await fleet.generate(jobs)
        svc: Any = second.service
    rolled_back = svc.metrics.rejected.get(reason="claim_rolled_back")
    mid = [s for s in sids if 0 < at_crash[s]]
    assert mid, at_crash  # the crash came in the middle of sessions
    if mode == "coupled":
        refs = {
            j.prompt: reference_sample(tiny_target, j.prompt, MAX_NEW, (EOS,), sp) for j in jobs
        }
        fault_report.record(
            faults=1,
            audits=[
                audit(j.session_id, refs[j.prompt], o.tokens, fleet.chunks[j.session_id], TOKENIZER)
                for j, o in zip(jobs, outcomes, strict=True)
            ],
            mode=mode,
            reopens=int(sum(o.stats.get("reopens", 0) for o in outcomes)),
        )
    else:
        # no exact reference: what was committed before the crash is kept (tag), so the
        # committed text is never corrected and every session finishes
        corrections = {s: [c for c in fleet.chunks[s] if c.kind == "correction"] for s in sids}
        assert rolled_back == 0
        assert all(o.finish_reason in ("stop", "length") for o in outcomes)
        assert all(
            len(o.tokens) >= at_crash[j.session_id] for j, o in zip(jobs, outcomes, strict=True)
        )
        assert not any(corrections.values()), corrections
