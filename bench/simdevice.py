"""Simulated edge devices: the real node code with a replayed drafter and modelled delays.

Each simulated device is a real :class:`NodeService` with its own MQTT connection,
running a real :class:`DeviceSession`; only two things are modelled:

- the **draft model** (:class:`ReplayDrafter`): it knows the target's greedy
  continuation of its prompt, proposes the correct next token with probability
  ``alpha`` (one seeded draw per position, so a re-proposal of the same position
  gives the same answer, as a deterministic drafter would) and otherwise a wrong
  token, and sleeps ``seconds_per_token`` per proposed token (in the worker thread
  the session drafts in, as a real drafter computes);
- the **radio link** (:class:`TimedLink`): every message waits a one-way delay
  in each direction (uplink before it is published, downlink before the session
  sees it).  The PUBACK's return leg is not modelled.

Every device runs its job's session once, or (``FleetSpec.duration_s`` > 0, the
steady state of a serving fleet) back to back until that many seconds have passed,
each repetition with its own drafter seed; the report's ``steady`` part then holds
the tokens whose verdict arrived within ``[warmup_s, duration_s]`` of the start,
per device, with their latencies.

The fleet runs in its own process (``python -m bench.simdevice SPEC.json OUT.json``),
so the verifier's process is not slowed by the devices' Python work through the
GIL; both still share this machine's cores, which a real fleet would not.

The figures in :data:`DRAFT_PROFILES` and :data:`LINK_PROFILES` are ASSUMPTIONS,
not measurements: round numbers of the order reported for 100M-1B-parameter 4-bit
draft models on a Raspberry Pi 5 (CPU) and a Jetson Orin (GPU) with llama.cpp-class
runtimes, and typical one-way latencies of the link kinds.  Change them here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import own_cpu_seconds
from middleware.broker_bridge.bus import Bus
from middleware.broker_bridge.mqtt import MqttBus, MqttSettings
from middleware.nodes.drafters.base import Drafter, Proposal
from middleware.nodes.drafters.policy import DraftPolicy, PolicyConfig
from middleware.nodes.link import BusLink, OwnerLost
from middleware.nodes.service import NodeConfig, NodeService, Outcome
from middleware.nodes.session import SessionConfig
from middleware.protocol import CloseSession, Draft, OpenSession, SamplingParams, Topics, Verdict


@dataclass(frozen=True, slots=True)
class DraftProfile:
    """A device's drafting speed: seconds per drafted token (assumed, see module docstring)."""

    name: str
    seconds_per_token: float


@dataclass(frozen=True, slots=True)
class LinkProfile:
    """A device's link: one-way delay in seconds, uniform within ``delay * (1 +- jitter)``."""

    name: str
    one_way_s: float
    jitter: float = 0.5

    def sample(self, rng: random.Random) -> float:
        if self.one_way_s <= 0:
            return 0.0
        return self.one_way_s * (1.0 + self.jitter * (2.0 * rng.random() - 1.0))


# Assumed drafting speeds (ms/token): Pi 5 ~ 60 (about 16 tokens/s from a small 4-bit draft
# model on its CPU), Jetson Orin ~ 15 (about 65 tokens/s on its GPU).  Not measured here.
DRAFT_PROFILES: dict[str, DraftProfile] = {
    "pi5": DraftProfile("pi5", 0.060),
    "jetson": DraftProfile("jetson", 0.015),
    # An n-gram / prompt-lookup drafter on any device: about a millisecond a token.
    "ngram": DraftProfile("ngram", 0.001),
}
# Assumed one-way delays between a device and the edge server's broker.
LINK_PROFILES: dict[str, LinkProfile] = {
    "loopback": LinkProfile("loopback", 0.0, 0.0),  # nothing added to the real loopback
    "ethernet": LinkProfile("ethernet", 0.0005),  # switched LAN
    "wifi": LinkProfile("wifi", 0.003),  # a good 802.11ac/ax link
    "lte": LinkProfile("lte", 0.025),  # cellular, good coverage
}

# Confidence model of the replayed drafter (assumption): somewhat calibrated, i.e. correct
# tokens tend to get a higher confidence than wrong ones, with overlap.
CONF_CORRECT = (0.3, 1.0)
CONF_WRONG = (0.0, 0.6)


class ReplayDrafter(Drafter):
    """Replays the target's greedy continuation, right with probability ``alpha`` per token."""

    def __init__(
        self,
        reference: Sequence[int],
        *,
        alpha: float,
        seconds_per_token: float,
        vocab_size: int,
        seed: int,
        policy: DraftPolicy | None = None,
        name: str = "replay",
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError("alpha must be within [0, 1]")
        super().__init__(name, policy)
        self.reference = tuple(int(t) for t in reference)
        self.alpha = alpha
        self.seconds_per_token = seconds_per_token
        self.vocab_size = vocab_size
        self.seed = seed
        self._draws: dict[int, tuple[bool, int, float]] = {}  # position -> (hit, wrong, u)

    def start(self, prompt: Sequence[int], sampling: SamplingParams) -> None:
        self.sampling = sampling

    def _draw(self, pos: int) -> tuple[bool, int, float]:
        """This position's fixed random draw: (knows the token, a wrong token, uniform)."""
        d = self._draws.get(pos)
        if d is None:
            rng = random.Random(self.seed * 1_000_003 + pos)
            d = (rng.random() < self.alpha, rng.randrange(1, self.vocab_size), rng.random())
            self._draws[pos] = d
        return d

    def token_at(self, pos: int, on_path: bool) -> tuple[int, float, bool]:
        """(token, confidence, still on the reference path) for generated position ``pos``."""
        hit, offset, u = self._draw(pos)
        truth = self.reference[pos] if pos < len(self.reference) else -1
        if on_path and truth >= 0 and hit:
            lo, hi = CONF_CORRECT
            return truth, lo + (hi - lo) * u, True
        base = truth if truth >= 0 else 0
        wrong = (base + offset) % self.vocab_size  # offset in [1, V): never the truth
        lo, hi = CONF_WRONG
        return wrong, lo + (hi - lo) * u, False

    def propose(
        self, committed: Sequence[int], speculative: Sequence[int], max_tokens: int, position: int
    ) -> Proposal:
        context = [*committed, *speculative]
        on_path = tuple(context) == self.reference[: len(context)]
        limit = self.policy.limit(max_tokens)
        tokens: list[int] = []
        confs: list[float] = []
        while len(tokens) < limit:
            tok, conf, on_path = self.token_at(len(context) + len(tokens), on_path)
            tokens.append(tok)
            confs.append(conf)
            if self.policy.should_stop(len(tokens) - 1, conf):
                break
        if tokens and self.seconds_per_token > 0:
            time.sleep(len(tokens) * self.seconds_per_token)  # the modelled draft forwards
        return Proposal(tuple(tokens), tuple(confs))


@dataclass(slots=True)
class LatencyRecorder:
    """Per committed token: from sending the draft whose verdict committed it to that verdict.

    ``commits`` keeps, per verdict that committed tokens, (monotonic arrival time, session id,
    tokens committed, their latency in seconds): what a time window is cut from.
    """

    samples: list[float] = field(default_factory=list)
    by_session: dict[str, list[float]] = field(default_factory=dict)
    commits: list[tuple[float, str, int, float]] = field(default_factory=list)
    _sent: dict[tuple[str, int], float] = field(default_factory=dict)
    _committed: dict[str, int] = field(default_factory=dict)

    def sent(self, session_id: str, seq: int, at: float) -> None:
        self._sent[(session_id, seq)] = at

    def verdict(self, v: Verdict, at: float) -> None:
        if v.kind not in ("accept", "catchup"):
            return
        have = self._committed.get(v.session_id, 0)
        end = v.base + len(v.tokens)
        sent = self._sent.get((v.session_id, v.seq))
        if end <= have or v.base > have or sent is None:
            return
        self._committed[v.session_id] = end
        self.samples.extend([at - sent] * (end - have))
        self.by_session.setdefault(v.session_id, []).extend([at - sent] * (end - have))
        self.commits.append((at, v.session_id, end - have, at - sent))

    def window(self, t_start: float, t_end: float) -> list[tuple[float, str, int, float]]:
        """The ``commits`` whose verdict arrived within ``[t_start, t_end]``."""
        return [c for c in self.commits if t_start <= c[0] <= t_end]


class TimedLink(BusLink):
    """A :class:`BusLink` with a modelled one-way delay each way, recording token latency."""

    def __init__(
        self,
        bus: Bus,
        topics: Topics,
        device_id: str,
        profile: LinkProfile,
        rng: random.Random,
        recorder: LatencyRecorder,
    ) -> None:
        super().__init__(bus, topics, device_id)
        self.profile = profile
        self.rng = rng
        self.recorder = recorder

    async def send(self, msg: OpenSession | Draft | CloseSession) -> None:
        if isinstance(msg, Draft):
            self.recorder.sent(msg.session_id, msg.seq, time.monotonic())
        delay = self.profile.sample(self.rng)
        if delay > 0:
            await asyncio.sleep(delay)  # uplink
        await super().send(msg)

    def _deliver(self, session_id: str, item: Verdict | OwnerLost) -> None:
        delay = self.profile.sample(self.rng)
        if delay > 0:  # downlink: a loop callback, not a task
            asyncio.get_running_loop().call_later(delay, self._arrive, session_id, item)
        else:
            self._arrive(session_id, item)

    def _arrive(self, session_id: str, item: Verdict | OwnerLost) -> None:
        if isinstance(item, Verdict):
            self.recorder.verdict(item, time.monotonic())
        super()._deliver(session_id, item)


class SimNode(NodeService):
    """A :class:`NodeService` whose link is a :class:`TimedLink`."""

    def __init__(
        self,
        bus: Bus,
        link: LinkProfile,
        rng: random.Random,
        recorder: LatencyRecorder,
        **kwargs: Any,
    ) -> None:
        super().__init__(bus, **kwargs)
        self.link = TimedLink(bus, self.topics, self.config.device_id, link, rng, recorder)


# --- the fleet ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Job:
    """One device with one session.  ``profile``, ``link`` and ``alpha``, when set, override
    the fleet's (:class:`FleetSpec`) for this device: a heterogeneous fleet."""

    device_id: str
    session_id: str
    prompt: tuple[int, ...]
    reference: tuple[int, ...]
    profile: str | None = None
    link: str | None = None
    alpha: float | None = None


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """Everything the fleet process needs (JSON across the process boundary)."""

    host: str
    port: int
    prefix: str
    tokenizer_dir: str
    fingerprint: str
    vocab_size: int
    profile: str
    link: str
    alpha: float
    seed: int
    max_new_tokens: int
    stop_ids: tuple[int, ...]
    jobs: tuple[Job, ...]
    timeout_s: float = 600.0
    # PolicyConfig fields for every device's DraftPolicy (None: the default policy).
    policy: dict[str, Any] | None = None
    # Steady state (closed loop): with duration_s > 0 every device runs its job's session back
    # to back until duration_s has passed since the first sessions started (those in flight
    # then run to their end), and the figures of [warmup_s, duration_s] are reported under
    # "steady".  0: one session per device.
    duration_s: float = 0.0
    warmup_s: float = 0.0

    def __post_init__(self) -> None:
        if self.duration_s < 0 or (
            self.duration_s > 0 and not 0 <= self.warmup_s < self.duration_s
        ):
            raise ValueError("need duration_s >= 0 and, when > 0, 0 <= warmup_s < duration_s")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> FleetSpec:
        d = json.loads(text)
        d["stop_ids"] = tuple(d["stop_ids"])
        d["jobs"] = tuple(
            Job(**{**j, "prompt": tuple(j["prompt"]), "reference": tuple(j["reference"])})
            for j in d["jobs"]
        )
        return cls(**d)


def _session_totals(outcomes: Sequence[Outcome]) -> dict[str, float]:
    keys = (
        "rounds",
        "proposed",
        "accepted",
        "timeouts",
        "resends",
        "reopens",
        "offline_periods",
        "provisional",
        "corrections",
    )
    totals = {k: float(sum(o.stats.get(k, 0.0) for o in outcomes)) for k in keys}
    proposed = totals["proposed"]
    totals["acceptance_rate"] = totals["accepted"] / proposed if proposed else 0.0
    totals["tokens_per_round"] = (
        sum(len(o.tokens) for o in outcomes) / totals["rounds"] if totals["rounds"] else 0.0
    )
    return totals


# Repetition n of device i's session replays with drafter seed seed * 7919 + i + n * SEED_STRIDE:
# distinct for every device and repetition of a run while devices < SEED_STRIDE.
SEED_STRIDE = 104_723


@dataclass(slots=True)
class ReplayDrafters:
    """One device's drafter factory; ``repetition`` (set before each session) picks the seed."""

    reference: tuple[int, ...]
    alpha: float
    draft: DraftProfile
    vocab_size: int
    base_seed: int
    policy: dict[str, Any] | None = None
    repetition: int = 0

    def __call__(self) -> Drafter:
        policy = DraftPolicy(PolicyConfig(**self.policy)) if self.policy else None
        return ReplayDrafter(
            self.reference,
            alpha=self.alpha,
            seconds_per_token=self.draft.seconds_per_token,
            vocab_size=self.vocab_size,
            seed=self.base_seed + self.repetition * SEED_STRIDE,
            policy=policy,
            name=f"replay-{self.draft.name}",
        )


@dataclass(frozen=True, slots=True)
class SessionRun:
    """One session a device ran: its job, repetition, outcome, monotonic start and end."""

    job: Job
    repetition: int
    outcome: Outcome
    start: float
    end: float


async def device_sessions(
    node: NodeService, job: Job, drafters: ReplayDrafters, t0: float, duration_s: float
) -> list[SessionRun]:
    """``job``'s session once (``duration_s`` 0), or back to back (ids ``{session_id}-{n}``)
    until ``duration_s`` has passed since ``t0``; the last one runs to its end."""
    runs: list[SessionRun] = []
    n = 0
    while n == 0 or (duration_s > 0 and time.monotonic() - t0 < duration_s):
        drafters.repetition = n  # sessions of one device run one after another
        sid = f"{job.session_id}-{n}" if duration_s > 0 else job.session_id
        start = time.monotonic()
        outcome = await node.generate_ids(job.prompt, session_id=sid)
        runs.append(SessionRun(job, n, outcome, start, time.monotonic()))
        n += 1
    return runs


def _session_record(
    spec: FleetSpec, r: SessionRun, recorder: LatencyRecorder, t0: float
) -> dict[str, Any]:
    """One session's figures; ``start_s``/``end_s`` from ``t0``."""
    o, j = r.outcome, r.job
    return {
        "session_id": o.session_id,
        "device_id": j.device_id,
        "profile": j.profile or spec.profile,
        "link": j.link or spec.link,
        "alpha": spec.alpha if j.alpha is None else j.alpha,
        "tokens": len(o.tokens),
        "elapsed_s": o.stats.get("elapsed_s", 0.0),
        "rounds": o.stats.get("rounds", 0.0),
        "proposed": o.stats.get("proposed", 0.0),
        "accepted": o.stats.get("accepted", 0.0),
        "repetition": r.repetition,
        "start_s": r.start - t0,
        "end_s": r.end - t0,
        "latency_s": recorder.by_session.get(o.session_id, []),
    }


def _steady(
    spec: FleetSpec, recorder: LatencyRecorder, runs: Sequence[SessionRun], t0: float
) -> dict[str, Any]:
    """The window [t0 + warmup_s, t0 + duration_s]: tokens whose verdict arrived in it."""
    t_start, t_end = t0 + spec.warmup_s, t0 + spec.duration_s
    window_s = t_end - t_start
    device_of = {r.outcome.session_id: r.job.device_id for r in runs}
    per_device = {j.device_id: 0 for j in spec.jobs}
    by_device: dict[str, list[float]] = {j.device_id: [] for j in spec.jobs}
    latency: list[float] = []
    for _, sid, count, lat in recorder.window(t_start, t_end):
        device = device_of[sid]
        per_device[device] += count
        by_device[device].extend([lat] * count)
        latency.extend([lat] * count)
    tokens = sum(per_device.values())
    return {
        "window_s": window_s,
        "t_start": t_start,
        "t_end": t_end,
        "committed_tokens": tokens,
        "wstgr": tokens / window_s,
        "per_device": per_device,
        "latency_s": latency,
        "latency_by_device": by_device,
    }


async def run_fleet(spec: FleetSpec) -> dict[str, Any]:
    """Start one node per job and run their sessions at once (one each, or back to back for
    ``spec.duration_s``: see :class:`FleetSpec`); return figures and outcomes."""
    from transformers import AutoTokenizer

    # One drafting thread per device (each real device has its own processor); the default
    # executor (cpu_count + 4 threads) would serialise the modelled draft time.
    loop = asyncio.get_running_loop()
    loop.set_default_executor(
        ThreadPoolExecutor(max_workers=len(spec.jobs) + 8, thread_name_prefix="draft")
    )
    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer_dir)
    session_cfg = SessionConfig(max_new_tokens=spec.max_new_tokens, stop_ids=spec.stop_ids)
    recorder = LatencyRecorder()
    async with contextlib.AsyncExitStack() as stack:
        nodes: list[SimNode] = []
        factories: list[ReplayDrafters] = []
        for i, job in enumerate(spec.jobs):
            draft = DRAFT_PROFILES[job.profile or spec.profile]
            link = LINK_PROFILES[job.link or spec.link]
            alpha = spec.alpha if job.alpha is None else job.alpha
            client_id = f"{spec.prefix}-{job.device_id}".replace("/", "-")
            bus = await stack.enter_async_context(
                MqttBus(MqttSettings(host=spec.host, port=spec.port, client_id=client_id))
            )
            factory = ReplayDrafters(
                job.reference, alpha, draft, spec.vocab_size, spec.seed * 7919 + i, spec.policy
            )
            factories.append(factory)
            nodes.append(
                SimNode(
                    bus,
                    link,
                    random.Random(spec.seed * 104_729 + i),
                    recorder,
                    tokenizer=tokenizer,
                    tokenizer_fp=spec.fingerprint,
                    drafter_factory=factory,
                    drafter_name=f"replay-{draft.name}",
                    config=NodeConfig(
                        device_id=job.device_id,
                        prefix=spec.prefix,
                        max_concurrent=1,
                        session=session_cfg,
                    ),
                )
            )
        async with asyncio.TaskGroup() as tg:
            services = [
                tg.create_task(n.run(), name=f"node-{j.device_id}")
                for n, j in zip(nodes, spec.jobs, strict=True)
            ]
            for n in nodes:
                await asyncio.wait_for(n.ready.wait(), 60)
            cpu0, t0 = own_cpu_seconds(), time.monotonic()
            per_device = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        device_sessions(n, j, f, t0, spec.duration_s)
                        for n, j, f in zip(nodes, spec.jobs, factories, strict=True)
                    )
                ),
                spec.timeout_s,
            )
            t1, cpu1 = time.monotonic(), own_cpu_seconds()
            for s in services:
                s.cancel()
    runs = [r for device in per_device for r in device]
    outcomes = [r.outcome for r in runs]
    committed = sum(len(o.tokens) for o in outcomes)
    mismatched = [r.outcome.session_id for r in runs if tuple(r.outcome.tokens) != r.job.reference]
    wall = t1 - t0
    report: dict[str, Any] = {
        "wall_s": wall,
        "t0": t0,
        "t1": t1,
        "committed_tokens": committed,
        "wstgr": committed / wall if wall > 0 else 0.0,
        "lossless": not mismatched,
        "mismatched_sessions": mismatched,
        "latency_s": recorder.samples,
        "sessions": _session_totals(outcomes),
        "fleet_cpu_s": cpu1 - cpu0,
        "per_session": [_session_record(spec, r, recorder, t0) for r in runs],
    }
    if spec.duration_s > 0:
        report["steady"] = _steady(spec, recorder, runs, t0)
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.simdevice SPEC.json OUT.json``: run a fleet, write its figures."""
    import logging

    import structlog

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m bench.simdevice SPEC.json OUT.json", file=sys.stderr)
        return 2
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    spec = FleetSpec.from_json(Path(args[0]).read_text())
    report = asyncio.run(run_fleet(spec))
    Path(args[1]).write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
