"""Speculation control against its baselines on one heterogeneous simulated fleet.

One fleet, one invocation, several verifier/device configurations side by side
(each repeat runs every configuration once, interleaved; figures are medians):

- **controller** (``planned``, bound ``--planned-window``, default 0.5 s as the
  service's ``planned_max_wait_ms``): the verifier's live latency model and
  joint batch/draft-length planner choose each batch, cap the verified prefix
  of its drafts and send every session a draft-length hint
  (``Verdict.next_len``), which the devices' :class:`DraftPolicy` honours (as
  a cap on its own adaptive length: the deployed default);
- **controller-w<window>s** (``--wide-window``, off by default): the same with
  another bound;
- **controller-...-exact** (``--exact``, off by default): the devices draft
  exactly the hinted length (threshold 0, no adaptation of their own);
- **uniform-k** (``adaptive`` batching): every device drafts exactly ``k``
  tokens a round (``min_len = max_len = k``, threshold 0), for each ``--ks``;
- **max-batch** (``fixed``): SLED's static batch: wait for ``max_batch`` =
  fleet size drafts or ``--fixed-window``; devices draft adaptively;
- **arrival-window** (``adaptive``, the default before ``planned``): take what is waiting and
  wait up to the window while expected senders are missing; devices draft
  adaptively (the default :class:`DraftPolicy`).

The fleet (ASSUMPTIONS, not measurements; see ``bench/simdevice.py``): a third
"jetson" (15 ms/token drafting, acceptance 0.8, wifi 3 ms one way), a third
"pi5" (60 ms/token, 0.7, LTE 25 ms), a third "ngram" (1 ms/token, 0.35,
ethernet 0.5 ms); devices assigned round robin over the prompts.  The verifier
(this process) is the real :class:`VerifierService` with SmolLM2-135M and the
real engine; devices are real node code in a second process; the broker is a
real Mosquitto.  Every session's tokens are checked against the target-only
reference (lossless).

Steady state (the default, ``--duration 40 --warmup 8``): every device runs
its session (``--tokens`` new tokens at most) again and again, back to back
(a closed loop: a serving fleet whose devices always have the next request),
for ``--duration`` seconds; the sessions in flight then run to their end.  The
figures are those of the window from ``--warmup`` to ``--duration`` seconds:
the tokens whose verdict reached their device inside it.  With one session
per device (``--duration 0``, the one-shot mode) a run of 32-token sessions
lasts some 18 s and is dominated by its start-up (every device's prompt
prefill at once) and its tail (the slowest sessions finishing alone in small
batches): it measures a batch job's makespan, not a serving fleet, and moves
by +-10% from run to run.

Per configuration: WSTGR (committed tokens/s of the fleet: in steady state the
tokens committed in the window / its length; one-shot, all tokens / the time
to the last session's end), mean per-token latency (steady: the mean over
devices of window / the tokens the device committed in it, a device with none
counting as the whole window; one-shot: the mean over sessions of session wall
time / its tokens), per-token latency p50/p95 as ``bench/wstgr.py`` defines it
(draft sent -> verdict that committed the token received; steady: of the
window's tokens), verify rounds and engine verify forwards per committed token
(whole run), mean batch size (drafts per round), and per device class the same
latency, draft length and acceptance (the last two over every session run).
The whole run's figures, as the one-shot mode defines them, are kept under
``run``.  For the controller, diagnostics (whole run): the hints it sent, the
drafts it got back, the batches it formed, its latency model's estimates at
each session's close against the modelled truth, its arrival predictions
against the arrivals, its forward-time model against the measured rounds.

This machine has 2 cores shared with other work; verifier, broker and the whole
fleet share them, so figures are noisy: compare configurations within a run.

Usage (from the repository root)::

    python -m bench.control                  # 24 devices, 32 tokens, 30 s steady, 3 repeats
    python -m bench.control --repeats 5 --tokens 48 --duration 60 --warmup 10
    python -m bench.control --duration 0     # one session per device (one-shot)
    python -m bench.control --quick          # smoke run, well under 3 minutes
    python -m bench.control --cases controller,uniform-k2 --forward-overhead-tokens 4096
                                             # engine never splits a batch by draft length

Writes ``bench/results/control.json`` and ``bench/results/control.png``
(``--out-dir`` to write elsewhere).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import statistics
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS_DIR,
    latency_summary,
    machine_info,
    median_of,
    positive_ints,
    pyplot,
    say,
    utc_now,
    write_json,
)
from bench.probe import CountingEngine
from bench.simdevice import DRAFT_PROFILES, LINK_PROFILES, FleetSpec, Job
from bench.wstgr import PROMPTS, Context, bench_context, serve_fleet

# --- the fleet (assumptions) --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceClass:
    """A kind of device in the fleet: drafting profile, link profile, acceptance."""

    name: str
    profile: str  # bench.simdevice.DRAFT_PROFILES
    link: str  # bench.simdevice.LINK_PROFILES
    alpha: float

    def truth(self) -> dict[str, float]:
        """What the simulation models: round trip (links only), drafting s/token, alpha."""
        return {
            "link_rtt_s": 2 * LINK_PROFILES[self.link].one_way_s,
            "draft_s": DRAFT_PROFILES[self.profile].seconds_per_token,
            "alpha": self.alpha,
        }


CLASSES: tuple[DeviceClass, ...] = (
    DeviceClass("jetson", "jetson", "wifi", 0.8),
    DeviceClass("pi5", "pi5", "lte", 0.7),
    DeviceClass("ngram", "ngram", "ethernet", 0.35),
)


@dataclass(frozen=True, slots=True)
class Case:
    """One verifier/device configuration."""

    name: str
    policy: str  # batch policy
    window: float  # seconds
    device_policy: dict[str, Any] | None = None  # PolicyConfig fields; None: default policy
    note: str = ""


def uniform_policy(k: int) -> dict[str, Any]:
    """Devices draft exactly ``k`` tokens a round: confidence never stops them, no adaptation."""
    return {
        "min_len": k,
        "max_len": k,
        "max_len_cap": k,
        "threshold": 0.0,
        "threshold_min": 0.0,
        "adaptive": False,
    }


EXACT_POLICY: dict[str, Any] = {
    "min_len": 1,
    "max_len": 16,
    "max_len_cap": 16,
    "threshold": 0.0,
    "threshold_min": 0.0,
    "adaptive": False,
}


@dataclass(frozen=True, slots=True)
class Settings:
    devices: int
    tokens: int  # max_new_tokens of every session
    repeats: int
    duration: float  # steady state: seconds of back-to-back sessions (0: one session a device)
    warmup: float  # steady state: seconds left out at the start of the window
    ks: tuple[int, ...]
    planned_window: float
    wide_window: float
    fixed_window: float
    arrival_window: float
    exact: bool
    only: tuple[str, ...]
    forward_overhead_tokens: int | None  # the engine's split threshold; None: its default
    threads: int
    seed: int
    out_dir: Path
    cache: bool
    plots: bool

    @property
    def mode(self) -> str:
        """The mode: "steady" (sessions back to back, figures of a window) or "one-shot"."""
        return "steady" if self.duration > 0 else "one-shot"

    def cases(self) -> list[Case]:
        out = [
            Case(
                "controller",
                "planned",
                self.planned_window,
                note="planned; devices' default adaptive policy, hint as a cap",
            )
        ]
        wide = f"controller-w{self.wide_window:g}s"
        if self.wide_window > 0:
            out.append(
                Case(
                    wide,
                    "planned",
                    self.wide_window,
                    note="planned, a window longer than a forward (the planner is "
                    "consulted on every batch); devices' default policy",
                )
            )
        if self.exact:
            out.append(
                Case(
                    f"{wide}-exact" if self.wide_window > 0 else "controller-exact",
                    "planned",
                    self.wide_window or self.planned_window,
                    EXACT_POLICY,
                    note="planned; devices draft the hinted length",
                )
            )
        out += [
            Case(
                f"uniform-k{k}",
                "adaptive",
                self.arrival_window,
                uniform_policy(k),
                note=f"adaptive batching; every device drafts exactly {k}",
            )
            for k in self.ks
        ]
        out += [
            Case(
                "max-batch",
                "fixed",
                self.fixed_window,
                note=f"fixed: max_batch = fleet size or {self.fixed_window * 1e3:.0f} ms",
            ),
            Case(
                "arrival-window",
                "adaptive",
                self.arrival_window,
                note="adaptive batching (default); devices' own adaptive drafting",
            ),
        ]
        return [c for c in out if not self.only or c.name in self.only]


def fleet_jobs(ctx: Context, n: int) -> tuple[Job, ...]:
    """``n`` devices, one session each, classes round robin."""
    return tuple(
        Job(
            f"dev-{i}",
            f"dev-{i}-s0",
            tuple(ctx.prompts[i]),
            tuple(ctx.references[i]),
            profile=c.profile,
            link=c.link,
            alpha=c.alpha,
        )
        for i in range(n)
        for c in (CLASSES[i % len(CLASSES)],)
    )


def class_of(job: Job) -> str:
    return next(
        c.name
        for c in CLASSES
        if (c.profile, c.link, c.alpha) == (job.profile, job.link, job.alpha)
    )


@dataclass(frozen=True, slots=True)
class SessionClasses:
    """Session id -> device class, for a job's session id and its steady-state repetitions
    (``{session_id}-{n}``, see ``bench.simdevice.device_sessions``)."""

    by_job: dict[str, str]

    def get(self, sid: str, default: str = "") -> str:
        """The class of session ``sid`` (a session id, or the verifier's key
        ``device/session``); ``default`` for a session of no job."""
        sid = sid.rpartition("/")[2]
        if sid in self.by_job:
            return self.by_job[sid]
        base, _, n = sid.rpartition("-")
        return self.by_job.get(base, default) if n.isdigit() else default


# --- looking inside the controller ------------------------------------------------------------


@dataclass(slots=True)
class ControlProbe:
    """Wraps a :class:`Controller`'s public methods to record what it saw and decided.

    Measurement only: every call is passed on unchanged.
    """

    control: Any
    classes: SessionClasses
    sent: dict[str, float] = field(default_factory=dict)
    eta: dict[str, float] = field(default_factory=dict)  # latest predicted arrival
    predicted_k: dict[str, int] = field(default_factory=dict)
    last_hint: dict[str, int] = field(default_factory=dict)
    hints: dict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    drafts: dict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    vs_hint: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    eta_error: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    turnaround: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    forwards: list[tuple[int, int, float, float]] = field(default_factory=list)
    prefilled: set[int] = field(default_factory=set)  # forwards that held a first round
    verified: set[str] = field(default_factory=set)
    rounds: dict[float, Counter[str]] = field(default_factory=dict)  # by publish time: batch
    decisions: Counter[str] = field(default_factory=Counter)
    waits: list[float] = field(default_factory=list)
    planned_batches: list[int] = field(default_factory=list)
    estimates: dict[str, dict[str, float]] = field(default_factory=dict)
    raw_hint: Any = None  # the controller's own hint(), unrecorded

    def install(self) -> None:
        c = self.control
        orig = {
            name: getattr(c, name)
            for name in (
                "on_draft",
                "on_round",
                "on_answer",
                "on_forward",
                "decide",
                "forget",
                "hint",
            )
        }
        self.raw_hint = orig["hint"]

        def on_draft(sid: str, draft: Any, now: float) -> None:
            self._draft(sid, len(draft.tokens), now)
            orig["on_draft"](sid, draft, now)

        def on_round(sid: str, proposed: int, accepted: int, now: float) -> None:
            orig["on_round"](sid, proposed, accepted, now)
            if sid not in self.verified:  # its first round: the forward also prefilled
                self.verified.add(sid)
                self.prefilled.add(len(self.forwards) - 1)
            self.sent[sid] = now
            self.rounds.setdefault(now, Counter())[self.classes.get(sid, "?")] += 1

        def on_answer(sid: str, now: float) -> None:
            orig["on_answer"](sid, now)
            self.sent[sid] = now

        def on_forward(rows: int, tokens: int, seconds: float) -> None:
            predicted = c.model.forward.predict(rows, tokens)
            self.forwards.append((rows, tokens, seconds, predicted))
            orig["on_forward"](rows, tokens, seconds)

        def decide(
            waiting: Sequence[Any], now: float, idle: Iterable[str]
        ) -> tuple[Collection[str], float]:
            idle = list(idle)
            self._predict(waiting, now, idle)
            take, wait = orig["decide"](waiting, now, idle)
            if take:
                self.decisions["verify"] += 1
                self.planned_batches.append(len(take))
            else:
                self.decisions["wait"] += 1
                self.waits.append(wait)
            return take, wait

        def forget(sid: str) -> None:
            self.snapshot(sid)
            orig["forget"](sid)

        def hint(sid: str) -> int:
            h: int = orig["hint"](sid)
            self.last_hint[sid] = h
            self.hints[self.classes.get(sid, "?")][h] += 1
            return h

        for name, fn in (
            ("on_draft", on_draft),
            ("on_round", on_round),
            ("on_answer", on_answer),
            ("on_forward", on_forward),
            ("decide", decide),
            ("forget", forget),
            ("hint", hint),
        ):
            setattr(c, name, fn)

    def _predict(self, waiting: Sequence[Any], now: float, idle: list[str]) -> None:
        """The arrival the controller predicts for every session not in (as it computes it)."""
        keys = {p.key for p in waiting}
        for sid in idle:
            sent = self.sent.get(sid)
            if sid in keys or sent is None:
                continue
            k = self.raw_hint(sid) or self.control.default_k  # as Controller.decide does
            self.eta[sid] = sent + self.control.model.device(sid).turnaround_s(k)
            self.predicted_k[sid] = k

    def _draft(self, sid: str, n: int, now: float) -> None:
        cls = self.classes.get(sid, "?")
        self.drafts[cls][n] += 1
        hint = self.last_hint.get(sid, 0)
        if hint:
            self.vs_hint[cls]["shorter" if n < hint else "longer" if n > hint else "equal"] += 1
        sent = self.sent.pop(sid, None)
        if sent is not None:
            self.turnaround[cls].append(now - sent)
        eta = self.eta.pop(sid, None)
        if eta is not None:
            self.eta_error[cls].append(now - eta)

    def snapshot(self, sid: str) -> None:
        if sid in self.control.model:
            e = self.control.model.device(sid)
            self.estimates[sid] = {
                "rtt_s": e.rtt_s,
                "draft_s": e.draft_s,
                "alpha": e.alpha,
                "rounds": e.rounds,
            }

    def report(self) -> dict[str, Any]:
        by_class: dict[str, Any] = {}
        for c in CLASSES:
            ests = [e for sid, e in self.estimates.items() if self.classes.get(sid) == c.name]
            est = {k: _med([e[k] for e in ests]) for k in ("rtt_s", "draft_s", "alpha")}
            by_class[c.name] = {
                "truth": c.truth(),
                "estimate_median": est,
                "sessions_estimated": len(ests),
                "hints": _hist(self.hints[c.name]),
                "draft_lengths": _hist(self.drafts[c.name]),
                "draft_vs_hint": dict(self.vs_hint[c.name]),
                "turnaround_ms": _ms(self.turnaround[c.name]),
                "eta_error_ms": _ms(self.eta_error[c.name]),
                "mean_hint": _mean_hist(self.hints[c.name]),
                "mean_draft": _mean_hist(self.drafts[c.name]),
            }
        steady = [f for i, f in enumerate(self.forwards) if i not in self.prefilled]
        errs = [(s - p) / s for _, _, s, p in steady if s > 0]
        co = self.control.model.forward.coefficients()
        batches = list(self.rounds.values())
        return {
            "by_class": by_class,
            "decisions": dict(self.decisions),
            "plans": self.control.plans,
            "wait_ms": _ms(self.waits),
            "planned_batch_mean": statistics.fmean(self.planned_batches)
            if self.planned_batches
            else 0.0,
            "batch_rows_mean": statistics.fmean(sum(b.values()) for b in batches)
            if batches
            else 0.0,
            "batch_class_rows_mean": {
                c.name: statistics.fmean(b[c.name] for b in batches) if batches else 0.0
                for c in CLASSES
            },
            "batches_with_class": {
                c.name: sum(1 for b in batches if b[c.name]) / len(batches) if batches else 0.0
                for c in CLASSES
            },
            "forward_model": {
                "a_ms": co.a * 1e3,
                "b_ms": co.b * 1e3,
                "c_ms": co.c * 1e3,
                "observations": len(self.forwards),
                "prefill_rounds": len(self.prefilled),
                "rel_error_median": _med(errs),
                "abs_rel_error_median": _med([abs(e) for e in errs]),
                "measured_ms_median": _med([s * 1e3 for _, _, s, _ in steady]),
                "predicted_ms_median": _med([p * 1e3 for *_, p in steady]),
                "rounds": [
                    [r, t, round(sec * 1e3, 1), round(p * 1e3, 1), i in self.prefilled]
                    for i, (r, t, sec, p) in enumerate(self.forwards)
                ],
            },
        }


def _med(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def _ms(xs: Sequence[float]) -> dict[str, float]:
    if not xs:
        return {"n": 0}
    q = statistics.quantiles(xs, n=20) if len(xs) > 1 else [xs[0]] * 19
    return {
        "n": len(xs),
        "p5": round(q[0] * 1e3, 2),
        "p50": round(statistics.median(xs) * 1e3, 2),
        "p95": round(q[-1] * 1e3, 2),
        "mean": round(statistics.fmean(xs) * 1e3, 2),
    }


def _hist(c: Counter[int]) -> dict[str, int]:
    return {str(k): c[k] for k in sorted(c)}


def _mean_hist(c: Counter[int]) -> float:
    n = sum(c.values())
    return sum(k * v for k, v in c.items()) / n if n else 0.0


# --- one case ---------------------------------------------------------------------------------


def _session_figures(fleet: dict[str, Any], classes: SessionClasses) -> dict[str, Any]:
    """Over every session of the run: mean per-token latency (session wall / tokens) overall
    and per class, with per-class draft length, acceptance and latency percentiles."""
    per = fleet["per_session"]

    def ms_per_token(rows: list[dict[str, Any]]) -> float:
        vals = [r["elapsed_s"] / r["tokens"] for r in rows if r["tokens"]]
        return statistics.fmean(vals) * 1e3 if vals else 0.0

    by_class = {}
    for c in CLASSES:
        rows = [r for r in per if classes.get(r["session_id"]) == c.name]
        proposed = sum(r["proposed"] for r in rows)
        rounds = sum(r["rounds"] for r in rows)
        by_class[c.name] = {
            "devices": len({r["device_id"] for r in rows}),
            "sessions": len(rows),
            "ms_per_token": ms_per_token(rows),
            "latency": latency_summary([x for r in rows for x in r["latency_s"]]),
            "draft_len": proposed / rounds if rounds else 0.0,
            "acceptance": sum(r["accepted"] for r in rows) / proposed if proposed else 0.0,
            "tokens_per_round": sum(r["tokens"] for r in rows) / rounds if rounds else 0.0,
        }
    return {
        "ms_per_token": ms_per_token(per),
        "by_class": by_class,
        "sessions": [{k: v for k, v in r.items() if k != "latency_s"} for r in per],
    }


def _window_figures(steady: dict[str, Any], device_class: dict[str, str]) -> dict[str, Any]:
    """The steady-state window's figures: per device, window / tokens it committed in the
    window (a device with none counts as the whole window), meaned overall and per class."""
    window = steady["window_s"]
    tokens = steady["per_device"]

    def ms_per_token(devices: list[str]) -> float:
        vals = [window * 1e3 / tokens[d] if tokens[d] else window * 1e3 for d in devices]
        return statistics.fmean(vals) if vals else 0.0

    by_class = {}
    for c in CLASSES:
        devices = [d for d, k in device_class.items() if k == c.name]
        by_class[c.name] = {
            "ms_per_token": ms_per_token(devices),
            "window_tokens": sum(tokens[d] for d in devices),
            "latency": latency_summary(
                [x for d in devices for x in steady["latency_by_device"][d]]
            ),
        }
    return {
        "ms_per_token": ms_per_token(list(device_class)),
        "by_class": by_class,
        "devices_without_tokens": [d for d in device_class if not tokens[d]],
        "per_device_tokens": dict(tokens),
    }


async def run_case(
    ctx: Context, s: Settings, case: Case, workdir: Path, repeat: int
) -> dict[str, Any]:
    """One verifier (this process) in ``case``'s configuration and the fleet (a child process)."""
    from middleware.verifier.batcher import BatchConfig
    from middleware.verifier.control import Controller
    from middleware.verifier.service import VerifierConfig

    prefix = f"bench/{uuid.uuid4().hex[:8]}"
    jobs = fleet_jobs(ctx, s.devices)
    classes = SessionClasses({j.session_id: class_of(j) for j in jobs})
    device_class = {j.device_id: class_of(j) for j in jobs}
    spec = FleetSpec(
        host=ctx.host,
        port=ctx.port,
        prefix=prefix,
        tokenizer_dir=ctx.tokenizer_dir,
        fingerprint=ctx.loaded.fingerprint,
        vocab_size=int(ctx.loaded.model.config.vocab_size),
        profile="jetson",
        link="wifi",
        alpha=0.8,
        seed=s.seed + 1000 * repeat,
        max_new_tokens=s.tokens,
        stop_ids=ctx.stop_ids,
        jobs=jobs,
        policy=case.device_policy,
        timeout_s=600.0 + s.duration,
        duration_s=s.duration,
        warmup_s=s.warmup,
    )
    engine = (
        CountingEngine(ctx.loaded.model)
        if s.forward_overhead_tokens is None
        else CountingEngine(ctx.loaded.model, forward_overhead_tokens=s.forward_overhead_tokens)
    )
    batch = BatchConfig(
        policy=case.policy,
        window=case.window,  # type: ignore[arg-type]
        max_batch=s.devices,
    )
    config = VerifierConfig(verifier_id="bench-verifier", prefix=prefix, batch=batch)
    probe: ControlProbe | None = None
    calibration = (0, 0, 0)

    def created(verifier: Any) -> None:
        nonlocal probe
        if isinstance(verifier.control, Controller):
            probe = ControlProbe(verifier.control, classes)
            probe.install()

    def ready(verifier: Any) -> None:
        nonlocal calibration  # start-up timing of the planned policy: not part of the run
        calibration = (
            engine.verify_counts.forwards,
            engine.verify_counts.padded_tokens,
            engine.forward_passes,
        )

    def done(verifier: Any) -> None:
        if probe is not None:
            for sid in set(probe.verified):  # sessions whose close has not arrived yet
                probe.snapshot(sid)

    served = await serve_fleet(
        ctx,
        spec,
        engine,
        config,
        workdir,
        ready_timeout=60,
        on_created=created,
        on_ready=ready,
        on_done=done,
    )
    fleet, m = served.fleet, served.verifier.metrics
    committed = fleet["committed_tokens"]  # by every session of the run

    def per_token(x: float) -> float:
        return x / committed if committed else 0.0

    sessions = _session_figures(fleet, classes)
    whole_run = {
        "wall_s": fleet["wall_s"],
        "committed_tokens": committed,
        "sessions": len(fleet["per_session"]),
        "wstgr": fleet["wstgr"],
        "ms_per_token": sessions["ms_per_token"],
        "by_class_ms_per_token": {c: v["ms_per_token"] for c, v in sessions["by_class"].items()},
        "latency": latency_summary(fleet["latency_s"]),
    }
    steady = fleet.get("steady")
    if steady is None:  # one-shot: the headline figures are the whole run's
        headline: dict[str, Any] = {
            "mode": "one-shot",
            "wstgr": fleet["wstgr"],
            "window_s": fleet["wall_s"],
            "committed_tokens": committed,
            "ms_per_token": sessions["ms_per_token"],
            "latency": whole_run["latency"],
            "by_class": sessions["by_class"],
        }
    else:  # steady: the window's, with the whole run's session diagnostics per class
        window = _window_figures(steady, device_class)
        headline = {
            "mode": "steady",
            "wstgr": steady["wstgr"],
            "window_s": steady["window_s"],
            "committed_tokens": steady["committed_tokens"],
            "ms_per_token": window["ms_per_token"],
            "latency": latency_summary(steady["latency_s"]),
            "by_class": {
                c: {**sessions["by_class"][c], **window["by_class"][c]}
                for c in sessions["by_class"]
            },
            "steady": {k: window[k] for k in ("devices_without_tokens", "per_device_tokens")},
        }
    out: dict[str, Any] = {
        "case": case.name,
        "repeat": repeat,
        **headline,
        "wall_s": fleet["wall_s"],
        "run": whole_run,
        "lossless": fleet["lossless"],
        "mismatched_sessions": fleet["mismatched_sessions"],
        "sessions": sessions["sessions"],
        "verify_rounds": m.forwards.total(),
        "verify_rounds_per_token": per_token(m.forwards.total()),
        "verify_forwards_per_token": per_token(engine.verify_counts.forwards - calibration[0]),
        "engine_forwards_per_token": per_token(engine.forward_passes - calibration[2]),
        "mean_batch": m.batch_size.mean,
        "verify_fed_tokens_per_token": per_token(
            engine.verify_counts.padded_tokens - calibration[1]
        ),
        "forward_ms_mean": m.forward_time.mean * 1e3,
        "verifier_busy": m.forward_time.sum / fleet["wall_s"] if fleet["wall_s"] else 0.0,
        "queue_wait_p50_ms": m.queue_wait.quantile(0.5) * 1e3,
        "acceptance_rate": fleet["sessions"]["acceptance_rate"],
        "tokens_per_round": fleet["sessions"]["tokens_per_round"],
        "draft_len": (
            fleet["sessions"]["proposed"] / fleet["sessions"]["rounds"]
            if fleet["sessions"]["rounds"]
            else 0.0
        ),
        "timeouts": fleet["sessions"]["timeouts"],
        "resends": fleet["sessions"]["resends"],
        "cpu_s": served.cpu_s,
    }
    if probe is not None:
        out["controller"] = probe.report()
    return out


# --- the comparison ---------------------------------------------------------------------------


def _pct(new: float, old: float) -> float:
    return (new - old) / old * 100.0 if old else math.nan


def compare(rows: list[dict[str, Any]], runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The controller against the best uniform k, max batching and the arrival window."""
    med = {r["case"]: r["median"] for r in rows}
    uniform = [name for name in med if name.startswith("uniform-k")]
    out: dict[str, Any] = {}
    if uniform:
        out["best_uniform_by_latency"] = min(uniform, key=lambda n: med[n]["ms_per_token"])
        out["best_uniform_by_wstgr"] = max(uniform, key=lambda n: med[n]["wstgr"])
    for ctl in (n for n in med if n.startswith("controller")):
        against: dict[str, Any] = {}
        others = [n for n in med if not n.startswith("controller")]
        for other in others:
            paired_lat = [
                _pct(a["ms_per_token"], b["ms_per_token"])
                for a, b in zip(runs[ctl], runs[other], strict=False)
            ]
            paired_rate = [
                _pct(a["wstgr"], b["wstgr"]) for a, b in zip(runs[ctl], runs[other], strict=False)
            ]
            against[other] = {
                "ms_per_token_pct": _pct(med[ctl]["ms_per_token"], med[other]["ms_per_token"]),
                "wstgr_pct": _pct(med[ctl]["wstgr"], med[other]["wstgr"]),
                "paired_ms_per_token_pct_median": _med(paired_lat),
                "paired_wstgr_pct_median": _med(paired_rate),
            }
        out[ctl] = against
    return out


def measure(ctx: Context, s: Settings, workdir: Path) -> dict[str, Any]:
    cases = s.cases()
    runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in cases}
    for r in range(s.repeats):
        order = cases if r % 2 == 0 else cases[::-1]  # interleaved, alternating order
        for case in order:
            say(f"[control] repeat {r + 1}/{s.repeats}: {case.name}")
            runs[case.name].append(asyncio.run(run_case(ctx, s, case, workdir, r)))
    rows = []
    for case in cases:
        rs = runs[case.name]
        med = median_of(
            [{k: v for k, v in x.items() if k not in ("sessions", "controller")} for x in rs]
        )
        med["lossless"] = all(x["lossless"] for x in rs)
        rows.append({"case": case.name, "config": asdict(case), "median": med, "runs": rs})
    return {
        "benchmark": "control",
        "when": utc_now(),
        "machine": machine_info(),
        "model": ctx.loaded.name,
        "config": {
            "devices": s.devices,
            "tokens": s.tokens,
            "repeats": s.repeats,
            "mode": s.mode,
            "duration_s": s.duration,
            "warmup_s": s.warmup,
            "ks": list(s.ks),
            "planned_window_s": s.planned_window,
            "wide_planned_window_s": s.wide_window,
            "forward_overhead_tokens": s.forward_overhead_tokens,
            "fixed_window_s": s.fixed_window,
            "arrival_window_s": s.arrival_window,
            "max_batch": s.devices,
            "seed": s.seed,
            "prompt_tokens": [len(p) for p in ctx.prompts[: s.devices]],
        },
        "fleet": {
            c.name: {
                **asdict(c),
                "devices": sum(1 for i in range(s.devices) if CLASSES[i % len(CLASSES)] is c),
            }
            for c in CLASSES
        },
        "assumptions": {
            "draft_seconds_per_token": {
                c.name: DRAFT_PROFILES[c.profile].seconds_per_token for c in CLASSES
            },
            "link_one_way_s": {c.name: LINK_PROFILES[c.link].one_way_s for c in CLASSES},
            "alpha": {c.name: c.alpha for c in CLASSES},
            "note": "drafting speeds, link delays and acceptance rates are modelled "
            "assumptions (bench/simdevice.py, bench/control.py), not measurements; the "
            "devices, the broker and the verifier share this machine's cores with other "
            "work (load average in 'machine'), so figures are noisy",
        },
        "results": rows,
        "comparison": compare(rows, runs),
    }


# --- output -----------------------------------------------------------------------------------


def table(report: dict[str, Any]) -> str:
    cfg, m = report["config"], report["machine"]
    steady = cfg["mode"] == "steady"
    lines = [
        f"speculation control, {cfg['devices']} devices (jetson/pi5/ngram thirds), "
        f"{report['model']}, {cfg['tokens']} tokens/session, {_mode_text(cfg)}, medians "
        f"of {cfg['repeats']}; {m['cpu_count']} shared cpus, load {m['load_average']} "
        "(noisy)",
        f"{'config':<17}{'WSTGR':>7}{'ms/tok':>8}{'p50':>6}{'p95':>7}{'rnd/t':>7}"
        f"{'fwd/t':>7}{'batch':>7}{'k':>6}{'acc':>6}"
        + "".join(f"{c.name[:6] + ' ms/t':>13}" for c in CLASSES)
        + f"{'lossless':>9}",
    ]
    for row in report["results"]:
        md = row["median"]
        lines.append(
            f"{row['case']:<17}{md['wstgr']:>7.1f}{md['ms_per_token']:>8.0f}"
            f"{md['latency']['p50_ms']:>6.0f}{md['latency']['p95_ms']:>7.0f}"
            f"{md['verify_rounds_per_token']:>7.3f}{md['verify_forwards_per_token']:>7.3f}"
            f"{md['mean_batch']:>7.1f}{md['draft_len']:>6.1f}{md['acceptance_rate']:>6.2f}"
            + "".join(f"{md['by_class'][c.name]['ms_per_token']:>13.0f}" for c in CLASSES)
            + f"{'yes' if md['lossless'] else 'NO':>9}"
        )
    if steady:
        lines.append(
            "WSTGR: tokens committed in the window / window; ms/tok: mean over devices "
            "of window / tokens the device committed in it; p50/p95: per-token latency "
            "(draft sent -> verdict) of the window's tokens, ms;"
        )
    else:
        lines.append(
            "WSTGR: committed tokens / wall time to the last session's end; ms/tok: "
            "mean over sessions of wall time / tokens; p50/p95: per-token latency "
            "(draft sent -> verdict), ms;"
        )
    lines.append(
        "rnd/t, fwd/t: verify rounds, engine verify forwards per committed token (whole "
        "run); batch: drafts per round; k: mean draft length; acc: acceptance"
    )
    for row in report["results"]:
        starved = {
            d for r in row["runs"] for d in r.get("steady", {}).get("devices_without_tokens", [])
        }
        if starved:
            lines.append(
                f"{row['case']}: no token in the window from {', '.join(sorted(starved))}"
                " (counted as the whole window)"
            )
    comp = report["comparison"]
    for ctl in (n for n in comp if n.startswith("controller")):
        for other, d in comp[ctl].items():
            lines.append(
                f"{ctl} vs {other}: per-token latency {d['ms_per_token_pct']:+.1f}%, "
                f"WSTGR {d['wstgr_pct']:+.1f}% (paired per repeat: "
                f"{d['paired_ms_per_token_pct_median']:+.1f}%, "
                f"{d['paired_wstgr_pct_median']:+.1f}%)"
            )
    if "best_uniform_by_latency" in comp:
        lines.append(
            f"best uniform k: {comp['best_uniform_by_latency']} (latency), "
            f"{comp['best_uniform_by_wstgr']} (WSTGR)"
        )
    return "\n".join(lines)


def _mode_text(cfg: dict[str, Any]) -> str:
    if cfg["mode"] == "steady":
        return (
            f"steady state ({cfg['duration_s']:g} s of back-to-back sessions, window "
            f"{cfg['warmup_s']:g}-{cfg['duration_s']:g} s)"
        )
    return "one session per device"


def plot(report: dict[str, Any], out_dir: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        say("[control] matplotlib not installed: no plot")
        return None
    rows = report["results"]
    names = [r["case"] for r in rows]
    x = list(range(len(names)))
    colors = ["tab:red" if n.startswith("controller") else "tab:blue" for n in names]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.4))
    ax.bar(
        x,
        [r["median"]["ms_per_token"] for r in rows],
        0.6,
        color=colors,
        alpha=0.8,
        label="all devices",
    )
    for off, (c, mk) in enumerate(zip(CLASSES, ("^", "s", "o"), strict=True)):
        ax.plot(
            [i + (off - 1) * 0.15 for i in x],
            [r["median"]["by_class"][c.name]["ms_per_token"] for r in rows],
            mk,
            color="k",
            ms=5,
            ls="none",
            label=c.name,
        )
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    steady = report["config"]["mode"] == "steady"
    ax.set(
        ylabel="ms per token (window / device's tokens)"
        if steady
        else "ms per token (session wall / tokens)",
        title="mean per-token latency",
    )
    ax.legend(fontsize=7, loc="lower left")
    bx.bar(x, [r["median"]["wstgr"] for r in rows], 0.6, color=colors, alpha=0.8)
    bx.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    bx.set(
        ylabel="committed tokens/s",
        title="whole-system token rate (WSTGR)" + (", steady window" if steady else ""),
    )
    cfg, m = report["config"], report["machine"]
    fig.suptitle(
        f"{cfg['devices']} simulated devices (thirds: jetson 15 ms/tok a0.8 wifi, pi5 "
        f"60 ms/tok a0.7 lte, ngram 1 ms/tok a0.35 ethernet),\n{cfg['tokens']} tokens, "
        f"{_mode_text(cfg)}, medians of {cfg['repeats']}; {m['cpu_count']} shared CPUs "
        "(noisy)",
        fontsize=8,
    )
    fig.tight_layout()
    path = out_dir / "control.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- command line -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> Settings:
    p = argparse.ArgumentParser(
        prog="python -m bench.control", description=(__doc__ or "").split("\n\n")[0]
    )
    p.add_argument("--devices", type=int, default=None, help="fleet size (default 24)")
    p.add_argument(
        "--tokens", type=int, default=None, help="max new tokens per session (default 32)"
    )
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help="steady state: seconds every device runs sessions back to back (default "
        "30; 0: one session per device, figures over the whole run)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="steady state: seconds at the start left out of the figures (default 6)",
    )
    p.add_argument("--repeats", type=int, default=None, help="repeats; medians (default 3)")
    p.add_argument(
        "--ks", type=positive_ints, default=None, help="uniform draft lengths (default 1,2,4)"
    )
    p.add_argument(
        "--planned-window",
        type=float,
        default=0.5,
        help="planned policy: hard bound on a draft's wait, and the planner's max_wait_s (s)",
    )
    p.add_argument(
        "--wide-window",
        type=float,
        default=0.0,
        help="also run the planned policy with this window (s; 0: not): longer than "
        "a forward, so that the batcher consults the planner on every batch",
    )
    p.add_argument("--fixed-window", type=float, default=0.05, help="fixed policy window (s)")
    p.add_argument(
        "--arrival-window",
        type=float,
        default=0.005,
        help="adaptive policy window (s; the default BatchConfig's)",
    )
    p.add_argument(
        "--exact",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also run controller-exact (devices draft exactly the hinted length)",
    )
    p.add_argument(
        "--cases",
        default="",
        help="comma-separated configurations to run (default: all), e.g. controller,arrival-window",
    )
    p.add_argument(
        "--forward-overhead-tokens",
        type=int,
        default=None,
        help="the engine's forward_overhead_tokens (default: the engine's; a large "
        "value never splits a verify batch by draft length)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--no-cache", action="store_true", help="recompute the references")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 6 devices, 8 tokens, 1 repeat, k=4 only, 8 s steady state "
        "with a 2 s warm-up",
    )
    ns = p.parse_args(argv)
    quick = ns.quick
    devices = ns.devices or (6 if quick else 24)
    if not len(CLASSES) <= devices <= len(PROMPTS):
        p.error(f"devices must be within [{len(CLASSES)}, {len(PROMPTS)}]")
    duration = (8.0 if quick else 30.0) if ns.duration is None else ns.duration
    warmup = (2.0 if quick else 6.0) if ns.warmup is None else ns.warmup
    if duration < 0 or (duration > 0 and not 0 <= warmup < duration):
        p.error("need --duration >= 0 and, when > 0, 0 <= --warmup < --duration")
    return Settings(
        devices=devices,
        tokens=ns.tokens or (8 if quick else 32),
        repeats=max(1, ns.repeats or (1 if quick else 3)),
        duration=duration,
        warmup=warmup if duration > 0 else 0.0,
        ks=ns.ks or ((4,) if quick else (1, 2, 4)),
        planned_window=ns.planned_window,
        wide_window=ns.wide_window,
        fixed_window=ns.fixed_window,
        arrival_window=ns.arrival_window,
        exact=ns.exact,
        only=tuple(x.strip() for x in ns.cases.split(",") if x.strip()),
        forward_overhead_tokens=ns.forward_overhead_tokens,
        threads=ns.threads,
        seed=ns.seed,
        out_dir=ns.out_dir,
        cache=not ns.no_cache,
        plots=not ns.no_plots,
    )


def run(s: Settings, loaded: Any = None) -> tuple[dict[str, Any], list[Path]]:
    """Measure, write ``control.json`` (and ``control.png``); the report and the paths written.
    ``loaded``: an already loaded SmolLM2 (else loaded here).  Torch's thread count is set to
    ``s.threads`` for the run and restored after it."""
    started = time.monotonic()
    with bench_context("control", loaded, s.devices, s.tokens, s.threads, s.cache) as (
        ctx,
        workdir,
    ):
        report = measure(ctx, s, workdir)
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    written = [s.out_dir / "control.json"]
    write_json(written[0], report)
    if s.plots and (path := plot(report, s.out_dir)) is not None:
        written.append(path)
    return report, written


def all_lossless(report: dict[str, Any]) -> bool:
    return all(r["median"]["lossless"] for r in report["results"])


def main(argv: Sequence[str] | None = None) -> int:
    s = parse_args(argv)
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    report, written = run(s)
    print(table(report))
    print(f"written: {', '.join(str(p) for p in written)} ({report['elapsed_s']:.0f} s)")
    return 0 if all_lossless(report) else 1


if __name__ == "__main__":
    sys.exit(main())
