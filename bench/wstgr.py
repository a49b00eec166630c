"""Whole-system token generation rate (WSTGR) of a simulated fleet against centralized serving.

SLED's figure of merit: committed tokens per second over all sessions of the
system.  One run measures, on this machine:

- **speculative**: a real Mosquitto (started here, ``deploy/mosquitto/mosquitto.conf``,
  free port), the real :class:`VerifierService` with the real SmolLM2-135M target
  in this process, and N simulated devices in a second process (real
  ``NodeService``/``DeviceSession`` code, one MQTT connection each, one session
  each; a replayed drafter that is right with probability ``alpha`` per token,
  modelled drafting and link delays: see ``bench/simdevice.py``, whose figures are
  assumptions).  Every session's committed tokens are checked against the
  target-only greedy reference (lossless);
- **centralized**: the same model decoding the same N prompts greedily as one
  batch with a KV cache, same token budget (``bench/baseline.py``);
- per N: WSTGR, centralized tokens/s and their ratio; verifier rounds (batched
  forwards) per committed token; per-token latency p50/p95 (a token's latency is
  the time from the send of the draft whose verdict committed it to that
  verdict reaching the session; for the centralized side, the step time);
- batching policies side by side (adaptive / fixed / none) at one fleet size.

Figures are medians over ``--repeats`` (each repeat runs every case once,
interleaved).  This machine has 2 cores shared with other work, and devices,
broker and verifier all share them here, so the figures are noisy and the fleet's
own CPU use (reported) is a cost a real fleet would not put on the server.

Usage (from the repository root)::

    python -m bench.wstgr                      # devices 1,4,16,32,64; profiles jetson,pi5
    python -m bench.wstgr --devices 1,4,16,32 --tokens 32 --repeats 1 --profiles jetson
    python -m bench.wstgr --alpha 0.9 --link lte --batch-devices 16
    python -m bench.wstgr --quick              # smoke run, well under 3 minutes
    python -m bench.wstgr --devices 32 --profiles jetson --no-batching   # one case

Profiling one case (py-spy installed in the venv; ``--subprocesses`` includes the fleet)::

    py-spy record -f raw -o prof.txt -r 50 --subprocesses --threads -- python -m bench.wstgr \\
        --devices 32 --profiles jetson --no-batching

Writes ``bench/results/wstgr.json``, ``bench/results/batching.json`` and, when
matplotlib is installed, ``bench/results/wstgr.png`` and ``batching.png``
(``--out-dir`` to write elsewhere).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
import typing
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.baseline import BaselineRun, centralized_greedy
from bench.common import (
    RESULTS_DIR,
    latency_summary,
    machine_info,
    median_of,
    own_cpu_seconds,
    positive_ints,
    process_cpu_seconds,
    pyplot,
    say,
    utc_now,
    write_json,
)
from bench.probe import CountingEngine
from bench.simdevice import DRAFT_PROFILES, LINK_PROFILES, FleetSpec, Job
from middleware.verifier.batcher import Policy

POLICIES: tuple[str, ...] = typing.get_args(Policy)

ROOT = Path(__file__).resolve().parents[1]
TARGET_DEVICES, TARGET_RATIO = 32, 2.0

TOPICS = [
    "a refrigerator",
    "a jet engine",
    "the internet",
    "photosynthesis",
    "a compiler",
    "a solar panel",
    "an electric motor",
    "the human heart",
    "a bicycle gearbox",
    "GPS",
    "a nuclear reactor",
    "a vaccine",
    "a hash table",
    "a rainbow",
    "a microwave oven",
    "a steam locomotive",
    "a lithium battery",
    "the stock market",
    "a telescope",
    "a volcano",
    "a wind turbine",
    "public key cryptography",
    "a car's brakes",
    "the immune system",
    "a search engine",
    "an airplane wing",
    "a hydroelectric dam",
    "a thermostat",
    "a 3D printer",
    "the water cycle",
    "a neural network",
    "a mechanical watch",
]
TEMPLATES = ["Explain in detail how {} works.", "Write a long paragraph about the history of {}."]
PROMPTS = [t.format(x) for t in TEMPLATES for x in TOPICS]


@dataclass(frozen=True, slots=True)
class Settings:
    devices: tuple[int, ...]
    tokens: int
    repeats: int
    alpha: float
    profiles: tuple[str, ...]
    link: str
    batch_devices: int
    batch_profile: str
    policies: tuple[str, ...]
    window: float
    max_batch: int
    threads: int
    seed: int
    out_dir: Path
    cache: bool
    plots: bool


@dataclass(frozen=True, slots=True)
class Context:
    """What every case shares: the model, its tokenizer on disk, prompts, references, broker."""

    loaded: Any
    tokenizer_dir: str
    stop_ids: tuple[int, ...]
    prompts: list[list[int]]
    references: list[list[int]]
    host: str
    port: int
    broker_pid: int | None


# --- references ----------------------------------------------------------------------------------
def references(
    loaded: Any, prompts: list[list[int]], max_new: int, stops: tuple[int, ...], cache: bool
) -> list[list[int]]:
    """Target-only greedy continuations (``reference_greedy``), cached on disk per prompt."""
    import torch

    from middleware.verifier.reference import reference_greedy

    path = (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "mw-bench"
        / "references.json"
    )
    stored: dict[str, list[int]] = {}
    if cache and path.is_file():
        with contextlib.suppress(ValueError):
            stored = json.loads(path.read_text())

    def key(prompt: list[int]) -> str:
        return hashlib.sha256(
            json.dumps(
                [loaded.name, loaded.fingerprint, torch.__version__, max_new, list(stops), prompt]
            ).encode()
        ).hexdigest()

    refs = []
    for p in prompts:
        k = key(p)
        if k not in stored:
            stored[k] = reference_greedy(loaded.model, p, max_new, stops)
        refs.append(list(stored[k]))
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(stored))
    return refs


# --- one speculative case ----------------------------------------------------------------------
async def run_fleet_process(spec: FleetSpec, workdir: Path) -> dict[str, Any]:
    """Run ``bench.simdevice`` in a child process on ``spec``; its report, or RuntimeError."""
    tag = uuid.uuid4().hex[:8]
    spec_path, out_path, err_path = (
        workdir / f"fleet-{tag}.{ext}" for ext in ("json", "out", "err")
    )
    spec_path.write_text(spec.to_json())
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    with err_path.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.simdevice",
            str(spec_path),
            str(out_path),
            cwd=ROOT,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=err,
        )
        try:
            rc = await asyncio.wait_for(proc.wait(), spec.timeout_s + 120)
        except (TimeoutError, asyncio.CancelledError):
            proc.kill()
            await proc.wait()
            raise
    if rc != 0 or not out_path.is_file():
        tail = err_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"fleet process failed (exit {rc}):\n{tail}")
    report: dict[str, Any] = json.loads(out_path.read_text())
    return report


@dataclass
class Served:
    """What :func:`serve_fleet` leaves: the verifier (its metrics), the fleet's report, CPU."""

    verifier: Any
    fleet: dict[str, Any]
    cpu_s: dict[str, float]


async def serve_fleet(
    ctx: Context,
    spec: FleetSpec,
    engine: Any,
    config: Any,
    workdir: Path,
    *,
    ready_timeout: float = 30.0,
    on_created: Callable[[Any], None] | None = None,
    on_ready: Callable[[Any], None] | None = None,
    on_done: Callable[[Any], None] | None = None,
) -> Served:
    """Serve ``spec``'s fleet (a child process) with one verifier in this process.

    The hooks see the :class:`VerifierService` once built, once ready, and once the fleet
    is done (before it stops).
    """
    from middleware.broker_bridge.mqtt import MqttBus, MqttSettings
    from middleware.metrics import Registry
    from middleware.verifier.service import VerifierService

    bus = MqttBus(
        MqttSettings(
            host=ctx.host, port=ctx.port, client_id=f"{spec.prefix}-verifier".replace("/", "-")
        )
    )
    async with bus:
        verifier = VerifierService(
            bus,
            engine,
            tokenizer_fingerprint=ctx.loaded.fingerprint,
            model_name=ctx.loaded.name,
            config=config,
            registry=Registry(),
        )
        if on_created is not None:
            on_created(verifier)
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(verifier.run(), name="verifier")
            await asyncio.wait_for(verifier.ready.wait(), ready_timeout)
            if on_ready is not None:
                on_ready(verifier)
            cpu0 = own_cpu_seconds()
            mq0 = process_cpu_seconds(ctx.broker_pid) if ctx.broker_pid else 0.0
            fleet = await run_fleet_process(spec, workdir)
            cpu1 = own_cpu_seconds()
            mq1 = process_cpu_seconds(ctx.broker_pid) if ctx.broker_pid else 0.0
            if on_done is not None:
                on_done(verifier)
            task.cancel()
    return Served(
        verifier,
        fleet,
        {
            "verifier_process": cpu1 - cpu0,
            "fleet_process": fleet["fleet_cpu_s"],
            "mosquitto": mq1 - mq0,
        },
    )


async def run_speculative(
    ctx: Context, s: Settings, devices: int, profile: str, policy: str, workdir: Path, repeat: int
) -> dict[str, Any]:
    """One verifier (this process) and ``devices`` simulated devices (a child process)."""
    from middleware.verifier.batcher import BatchConfig
    from middleware.verifier.service import VerifierConfig

    prefix = f"bench/{uuid.uuid4().hex[:8]}"
    jobs = tuple(
        Job(f"dev-{i}", f"dev-{i}-s0", tuple(ctx.prompts[i]), tuple(ctx.references[i]))
        for i in range(devices)
    )
    spec = FleetSpec(
        host=ctx.host,
        port=ctx.port,
        prefix=prefix,
        tokenizer_dir=ctx.tokenizer_dir,
        fingerprint=ctx.loaded.fingerprint,
        vocab_size=int(ctx.loaded.model.config.vocab_size),
        profile=profile,
        link=s.link,
        alpha=s.alpha,
        seed=s.seed + 1000 * repeat,
        max_new_tokens=s.tokens,
        stop_ids=ctx.stop_ids,
        jobs=jobs,
    )
    engine = CountingEngine(ctx.loaded.model)
    batch = BatchConfig(policy=policy, window=s.window, max_batch=s.max_batch)  # type: ignore[arg-type]
    config = VerifierConfig(verifier_id="bench-verifier", prefix=prefix, batch=batch)
    served = await serve_fleet(ctx, spec, engine, config, workdir)
    fleet, m = served.fleet, served.verifier.metrics
    committed = fleet["committed_tokens"]

    def per_token(x: float) -> float:
        return x / committed if committed else 0.0

    rounds = m.forwards.total()
    sessions = fleet["sessions"]
    return {
        "devices": devices,
        "profile": profile,
        "policy": policy,
        "wstgr": fleet["wstgr"],
        "wall_s": fleet["wall_s"],
        "committed_tokens": committed,
        "lossless": fleet["lossless"],
        "mismatched_sessions": fleet["mismatched_sessions"],
        "latency": latency_summary(fleet["latency_s"]),
        "verify_rounds": rounds,
        "verify_rounds_per_token": per_token(rounds),
        "engine_forwards_per_token": per_token(engine.forward_passes),
        "mean_batch": m.batch_size.mean,
        "engine": engine.counts(),
        "verify_fed_tokens_per_token": per_token(engine.verify_counts.padded_tokens),
        "forward_ms_mean": m.forward_time.mean * 1e3,
        "verifier_busy": m.forward_time.sum / fleet["wall_s"] if fleet["wall_s"] else 0.0,
        "queue_wait_p50_ms": m.queue_wait.quantile(0.5) * 1e3,
        "acceptance_rate": sessions["acceptance_rate"],
        "tokens_per_round": sessions["tokens_per_round"],
        "timeouts": sessions["timeouts"],
        "resends": sessions["resends"],
        "provisional": sessions["provisional"],
        "cpu_s": served.cpu_s,
    }


def run_baseline(ctx: Context, s: Settings, devices: int) -> dict[str, Any]:
    run: BaselineRun = centralized_greedy(
        ctx.loaded.model, ctx.prompts[:devices], s.tokens, ctx.stop_ids
    )
    same = sum(1 for o, r in zip(run.outputs, ctx.references, strict=False) if o == r)
    return {
        "devices": devices,
        "tokens_per_s": run.tokens_per_s,
        "wall_s": run.wall_s,
        "prefill_s": run.step_s[0],
        "prefill_padded_tokens": devices * max(len(p) for p in ctx.prompts[:devices]),
        "tokens": run.tokens,
        "forwards": run.forwards,
        "forwards_per_token": run.forwards / run.tokens if run.tokens else 0.0,
        "decode_fed_tokens_per_token": (
            (run.forwards - 1) * devices / run.tokens if run.tokens else 0.0
        ),
        "step_latency": latency_summary(run.step_s),
        "matches_reference": same,
        "all_match_reference": same == devices,
    }


# --- the sweep -----------------------------------------------------------------------------------
def measure(ctx: Context, s: Settings, workdir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    base_runs: dict[int, list[dict[str, Any]]] = {}
    spec_runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    batch_runs: dict[str, list[dict[str, Any]]] = {}
    for r in range(s.repeats):
        for n in s.devices:
            say(f"[wstgr] repeat {r + 1}/{s.repeats}: centralized, {n} sessions")
            base_runs.setdefault(n, []).append(run_baseline(ctx, s, n))
            for profile in s.profiles:
                say(f"[wstgr] repeat {r + 1}/{s.repeats}: speculative, {n} devices ({profile})")
                spec_runs.setdefault((profile, n), []).append(
                    asyncio.run(run_speculative(ctx, s, n, profile, "adaptive", workdir, r))
                )
        if s.policies and s.batch_devices not in s.devices:
            base_runs.setdefault(s.batch_devices, []).append(run_baseline(ctx, s, s.batch_devices))
        for policy in s.policies:
            say(
                f"[wstgr] repeat {r + 1}/{s.repeats}: batching {policy}, {s.batch_devices} "
                f"devices ({s.batch_profile})"
            )
            batch_runs.setdefault(policy, []).append(
                asyncio.run(
                    run_speculative(ctx, s, s.batch_devices, s.batch_profile, policy, workdir, r)
                )
            )
    base = {n: median_of(runs) for n, runs in base_runs.items()}
    rows: list[dict[str, Any]] = []
    for (profile, n), runs in spec_runs.items():
        med = median_of(runs)
        med["lossless"] = all(x["lossless"] for x in runs)
        ratio = med["wstgr"] / base[n]["tokens_per_s"] if base[n]["tokens_per_s"] else 0.0
        rows.append(
            {
                "profile": profile,
                "devices": n,
                "speculative": med,
                "centralized": base[n],
                "ratio": ratio,
                "runs": runs,
            }
        )
    at_target = [row for row in rows if row["devices"] == TARGET_DEVICES]
    met: dict[str, bool] | str = (
        {row["profile"]: row["ratio"] >= TARGET_RATIO for row in at_target}
        if at_target
        else "not measured (no 32-device run)"
    )
    common = _common(ctx, s)
    wstgr = {
        "benchmark": "wstgr",
        **common,
        "target": {"devices": TARGET_DEVICES, "ratio": TARGET_RATIO, "met": met},
        "results": rows,
        "centralized_runs": {str(n): runs for n, runs in base_runs.items()},
    }
    policies = []
    for policy, runs in batch_runs.items():
        med = median_of(runs)
        med["lossless"] = all(x["lossless"] for x in runs)
        policies.append({"policy": policy, "median": med, "runs": runs})
    batching = {
        "benchmark": "batching",
        **common,
        "devices": s.batch_devices,
        "profile": s.batch_profile,
        "centralized": base.get(s.batch_devices, {}),
        "results": policies,
    }
    return wstgr, batching


def _common(ctx: Context, s: Settings) -> dict[str, Any]:
    return {
        "when": utc_now(),
        "machine": machine_info(),
        "model": ctx.loaded.name,
        "config": {
            "devices": list(s.devices),
            "tokens": s.tokens,
            "repeats": s.repeats,
            "alpha": s.alpha,
            "profiles": list(s.profiles),
            "link": s.link,
            "batch_window_s": s.window,
            "max_batch": s.max_batch,
            "seed": s.seed,
            "prompt_tokens": [len(p) for p in ctx.prompts],
            "reference_tokens": [len(r) for r in ctx.references],
        },
        "assumptions": {
            "draft_seconds_per_token": {k: v.seconds_per_token for k, v in DRAFT_PROFILES.items()},
            "link_one_way_s": {k: v.one_way_s for k, v in LINK_PROFILES.items()},
            "note": "drafting and link delays are modelled assumptions (bench/simdevice.py), "
            "not measurements; devices, broker and verifier share this machine's "
            f"{os.cpu_count()} cores with other work, so figures are noisy",
        },
    }


# --- output --------------------------------------------------------------------------------------
def table(wstgr: dict[str, Any], batching: dict[str, Any]) -> str:
    m = wstgr["machine"]
    lines = [
        f"WSTGR, {wstgr['model']}, {wstgr['config']['tokens']} tokens/session, alpha "
        f"{wstgr['config']['alpha']}, link {wstgr['config']['link']}, torch threads "
        f"{m['torch_threads']}, {m['cpu_count']} cpus (shared: noisy), medians of "
        f"{wstgr['config']['repeats']}",
        f"{'profile':<8}{'N':>4}{'WSTGR':>9}{'central':>9}{'ratio':>7}{'rnd/tok':>9}"
        f"{'fed/tok':>8}"
        f"{'batch':>7}{'acc':>6}{'lat p50':>9}{'p95 ms':>8}{'c.step':>8}{'lossless':>9}",
    ]
    for row in sorted(wstgr["results"], key=lambda x: (x["profile"], x["devices"])):
        sp, ce = row["speculative"], row["centralized"]
        lines.append(
            f"{row['profile']:<8}{row['devices']:>4}{sp['wstgr']:>9.1f}"
            f"{ce['tokens_per_s']:>9.1f}{row['ratio']:>7.2f}"
            f"{sp['verify_rounds_per_token']:>9.3f}"
            f"{sp['verify_fed_tokens_per_token']:>8.2f}{sp['mean_batch']:>7.1f}"
            f"{sp['acceptance_rate']:>6.2f}{sp['latency']['p50_ms']:>9.0f}"
            f"{sp['latency']['p95_ms']:>8.0f}{ce['step_latency']['p50_ms']:>8.0f}"
            f"{'yes' if sp['lossless'] else 'NO':>9}"
        )
    lines.append(
        "rnd/tok: verify rounds (batched forwards) per committed token; fed/tok: "
        "tokens the verify forwards computed (padded) per committed token (centralized "
        "decoding: 1); acc: draft acceptance; lat: per-token latency, draft sent -> "
        "verdict received; c.step: centralized step time p50"
    )
    target = wstgr["target"]
    lines.append(
        f"target: >= {target['ratio']}x centralized at {target['devices']} devices: {target['met']}"
    )
    if not batching["results"]:
        return "\n".join(lines)
    lines.append("")
    lines.append(
        f"batching policies, {batching['devices']} devices ({batching['profile']}); "
        f"centralized {batching['centralized']['tokens_per_s']:.1f} tok/s"
    )
    lines.append(
        f"{'policy':<10}{'tok/s':>8}{'lat p50':>9}{'p95 ms':>8}{'batch':>7}"
        f"{'rnd/tok':>9}{'qwait ms':>9}{'lossless':>9}"
    )
    for p in batching["results"]:
        md = p["median"]
        lines.append(
            f"{p['policy']:<10}{md['wstgr']:>8.1f}{md['latency']['p50_ms']:>9.0f}"
            f"{md['latency']['p95_ms']:>8.0f}{md['mean_batch']:>7.1f}"
            f"{md['verify_rounds_per_token']:>9.3f}{md['queue_wait_p50_ms']:>9.1f}"
            f"{'yes' if md['lossless'] else 'NO':>9}"
        )
    return "\n".join(lines)


def plot(wstgr: dict[str, Any], batching: dict[str, Any], out_dir: Path) -> list[Path]:
    plt = pyplot()
    if plt is None:
        say("[wstgr] matplotlib not installed: no plots (pip install matplotlib)")
        return []
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    rows = wstgr["results"]
    ns = sorted({r["devices"] for r in rows})
    central = {r["devices"]: r["centralized"]["tokens_per_s"] for r in rows}
    ax.plot(ns, [central[n] for n in ns], "k--o", label="centralized (batched greedy)")
    for profile in sorted({r["profile"] for r in rows}):
        mine = sorted((r for r in rows if r["profile"] == profile), key=lambda r: r["devices"])
        ax.plot(
            [r["devices"] for r in mine],
            [r["speculative"]["wstgr"] for r in mine],
            "-o",
            label=f"speculative, {profile} devices",
        )
        bx.plot([r["devices"] for r in mine], [r["ratio"] for r in mine], "-o", label=profile)
    ax.set(
        xscale="log",
        xlabel="devices (sessions)",
        ylabel="committed tokens/s",
        title="whole-system token generation rate",
    )
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.legend(fontsize=8)
    bx.axhline(TARGET_RATIO, color="r", ls=":", label=f"target {TARGET_RATIO}x")
    bx.axhline(1.0, color="k", lw=0.6)
    bx.set(xscale="log", xlabel="devices", ylabel="WSTGR / centralized", title="ratio")
    bx.set_xticks(ns, [str(n) for n in ns])
    bx.legend(fontsize=8)
    fig.suptitle(
        f"{wstgr['model']}, {wstgr['machine']['cpu_count']} shared CPUs, torch threads "
        f"{wstgr['machine']['torch_threads']} (noisy)",
        fontsize=9,
    )
    fig.tight_layout()
    paths = [out_dir / "wstgr.png", out_dir / "batching.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    if not batching["results"]:
        return paths[:1]

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    res = batching["results"]
    names = [p["policy"] for p in res]
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [p["median"]["latency"]["p50_ms"] for p in res], 0.4, label="p50")
    ax.bar([i + 0.2 for i in x], [p["median"]["latency"]["p95_ms"] for p in res], 0.4, label="p95")
    ax.set_xticks(list(x), names)
    ax.set(ylabel="per-token latency, ms", title="latency (draft sent -> verdict)")
    ax.legend(fontsize=8)
    bx.bar(list(x), [p["median"]["wstgr"] for p in res])
    bx.axhline(batching["centralized"]["tokens_per_s"], color="k", ls="--", label="centralized")
    bx.set_xticks(list(x), names)
    bx.set(ylabel="committed tokens/s", title="throughput")
    bx.legend(fontsize=8)
    fig.suptitle(
        f"batching policies, {batching['devices']} devices ({batching['profile']})", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


# --- command line ------------------------------------------------------------------------------
def _names(choices: Sequence[str]) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [v for v in values if v not in choices]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"expected some of {', '.join(choices)}")
        return values

    return parse


def parse_args(argv: Sequence[str] | None) -> Settings:
    p = argparse.ArgumentParser(
        prog="python -m bench.wstgr", description=(__doc__ or "").split("\n\n")[0]
    )
    p.add_argument(
        "--devices", type=positive_ints, default=None, help="fleet sizes (default 1,4,16,32,64)"
    )
    p.add_argument("--tokens", type=int, default=None, help="new tokens per session (default 32)")
    p.add_argument("--repeats", type=int, default=None, help="repeats; medians (default 1)")
    p.add_argument(
        "--alpha",
        type=float,
        default=0.8,
        help="probability that a simulated device drafts the right token",
    )
    p.add_argument(
        "--profiles",
        type=_names(list(DRAFT_PROFILES)),
        default=None,
        help="device drafting profiles (default jetson,pi5)",
    )
    p.add_argument("--link", choices=list(LINK_PROFILES), default="wifi")
    p.add_argument(
        "--batch-devices",
        type=int,
        default=None,
        help="fleet size for the batching comparison (default 16)",
    )
    p.add_argument(
        "--batch-profile",
        choices=list(DRAFT_PROFILES),
        default=None,
        help="drafting profile for the batching comparison (default: first profile)",
    )
    p.add_argument(
        "--policies",
        type=_names(POLICIES),
        default=("adaptive", "fixed", "none"),
        help=f"batching policies to compare, of {', '.join(POLICIES)}",
    )
    p.add_argument("--no-batching", action="store_true", help="skip the batching comparison")
    p.add_argument("--window", type=float, default=0.005, help="batch window, seconds")
    p.add_argument("--max-batch", type=int, default=64, help="verifier max_batch")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (recorded)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--no-cache", action="store_true", help="recompute the references")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: devices 1,2, 8 tokens, jetson only, batching at 2 devices",
    )
    ns = p.parse_args(argv)
    quick = ns.quick
    devices = ns.devices or ((1, 2) if quick else (1, 4, 16, 32, 64))
    profiles = ns.profiles or (("jetson",) if quick else ("jetson", "pi5"))
    batch_devices = ns.batch_devices or (max(devices) if quick else 16)
    if max(max(devices), batch_devices) > len(PROMPTS):
        p.error(f"at most {len(PROMPTS)} devices (one distinct prompt each)")
    return Settings(
        devices=devices,
        tokens=ns.tokens or (8 if quick else 32),
        repeats=max(1, ns.repeats or 1),
        alpha=ns.alpha,
        profiles=profiles,
        link=ns.link,
        batch_devices=batch_devices,
        batch_profile=ns.batch_profile or profiles[0],
        policies=() if ns.no_batching else ns.policies,
        window=ns.window,
        max_batch=ns.max_batch,
        threads=ns.threads,
        seed=ns.seed,
        out_dir=ns.out_dir,
        cache=not ns.no_cache,
        plots=not ns.no_plots,
    )


@contextlib.contextmanager
def bench_context(
    tag: str, loaded: Any, n_prompts: int, tokens: int, threads: int, cache: bool
) -> typing.Iterator[tuple[Context, Path]]:
    """Everything a fleet benchmark runs in: SmolLM2 (``loaded``, or loaded here), the first
    ``n_prompts`` prompts with their target-only references, a fresh Mosquitto and a work
    directory holding the tokenizer; torch at ``threads`` threads, restored on exit."""
    import torch

    from middleware.models.loading import load_causal_lm
    from middleware.mosquitto import MosquittoProcess
    from middleware.nodes.service import encode_prompt, stop_ids_of

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if loaded is None:
            say(f"[{tag}] loading SmolLM2-135M")
            loaded = load_causal_lm("smollm2")
        prompts = [encode_prompt(loaded.tokenizer, p) for p in PROMPTS[:n_prompts]]
        stops = stop_ids_of(loaded.tokenizer)
        say(f"[{tag}] target-only references for {n_prompts} prompts x {tokens} tokens")
        refs = references(loaded, prompts, tokens, stops, cache)
        with tempfile.TemporaryDirectory(prefix="mw-bench-") as tmp, MosquittoProcess() as broker:
            workdir = Path(tmp)
            loaded.tokenizer.save_pretrained(workdir / "tokenizer")
            yield (
                Context(
                    loaded,
                    str(workdir / "tokenizer"),
                    stops,
                    prompts,
                    refs,
                    broker.host,
                    broker.port,
                    broker.pid,
                ),
                workdir,
            )
    finally:
        torch.set_num_threads(before)


def run(s: Settings, loaded: Any = None) -> tuple[dict[str, Any], dict[str, Any], list[Path]]:
    """Measure everything ``s`` asks for, write the JSON files (and plots); the two reports
    and the paths written.  ``loaded``: an already loaded SmolLM2 (else loaded here).  Torch's
    thread count is set to ``s.threads`` for the run and restored after it."""
    started = time.monotonic()
    with bench_context(
        "wstgr", loaded, max(*s.devices, s.batch_devices), s.tokens, s.threads, s.cache
    ) as (ctx, workdir):
        wstgr, batching = measure(ctx, s, workdir)
    wstgr["elapsed_s"] = batching["elapsed_s"] = round(time.monotonic() - started, 1)
    written = [s.out_dir / "wstgr.json"]
    write_json(written[0], wstgr)
    if batching["results"]:
        written.append(s.out_dir / "batching.json")
        write_json(written[1], batching)
    if s.plots:
        written += plot(wstgr, batching, s.out_dir)
    return wstgr, batching, written


def all_lossless(wstgr: dict[str, Any], batching: dict[str, Any]) -> bool:
    return all(r["speculative"]["lossless"] for r in wstgr["results"]) and all(
        p["median"]["lossless"] for p in batching["results"]
    )


def main(argv: Sequence[str] | None = None) -> int:
    s = parse_args(argv)
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    wstgr, batching, written = run(s)
    print(table(wstgr, batching))
    print(f"written: {', '.join(str(p) for p in written)} ({wstgr['elapsed_s']:.0f} s)")
    return 0 if all_lossless(wstgr, batching) else 1


if __name__ == "__main__":
    sys.exit(main())
