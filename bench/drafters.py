"""Drafting speed and agreement with the target, per drafter kind, on 1 thread and on a Pi budget.

For each drafter spec, a fresh child process drafts against the target's own greedy
continuation of real prompts (the demo's), the way a device does in greedy mode: a round
proposes ``--draft-len`` tokens after the committed text; the verifier would accept the
longest prefix equal to the target's tokens and add the target's next one, so the round
commits ``accepted + 1`` reference tokens and the next round drafts after them (a
drafter with a KV cache rolls its rejected tokens back).  No bus: this isolates the
drafter's cost and quality.  Figures per spec:

- ``tokens_per_s``: draft tokens per second of ``propose()`` time, each prompt's first
  round (the prompt prefill) excluded and reported as ``first_round_ms``;
- ``acceptance``: accepted / drafted tokens; ``tokens_per_round``: committed tokens per
  verification round (the speed-up a verifier round gives, before latency);
- ``load_s``, ``peak_rss_mib``.

Budgets (each child is a new process, so one budget never leaks into the next):

- ``thread``: 1 thread (llama.cpp ``n_threads=1``; ``torch.set_num_threads(1)``;
  ``OMP_NUM_THREADS=1``);
- ``pi``: the same, pinned to one core (``os.sched_setaffinity``) with the address space
  capped (``RLIMIT_AS``, ``--mem-mb``, default 1024 MiB: a Pi 3 / Zero 2 class board).
  Where a drafter cannot run under the cap (PyTorch's import alone reserves more address
  space than a small board has RAM), it runs pinned without the cap and the row says so.

Drafters run interleaved, ``--repeats`` times; a row is the median.  A run in which any
drafter failed reports no figure at all (``figures_valid: false``, no ratios).  Writes
``bench/results/drafters.json``::

    python -m bench.drafters [--repeats 1] [--prompts 6] [--max-new 32] [--draft-len 6]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, machine_info, say, utc_now, write_json

ROOT = Path(__file__).resolve().parent.parent
SPECS = (
    "ngram",
    "llamacpp:smollm2",
    "llamacpp:smollm2-q4_0",
    "llamacpp:smollm2-q3_k",
    "llamacpp:smollm2-q2_k",  # (smollm2-q2_0 drafts at 4 tok/s, ~0% accepted: left out)
    "quant4:smollm2",
    "hf:smollm2",
)
BUDGETS = ("thread", "pi")
FIGURES = ("tokens_per_s", "acceptance", "tokens_per_round", "first_round_ms")


# --- child: one drafter, one budget --------------------------------------------------------------
def apply_budget(budget: str, mem_mb: int | None) -> dict[str, Any]:
    """Pin to one core and cap the address space (``pi``), before anything is imported."""
    applied: dict[str, Any] = {}
    if budget == "pi":
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        applied["cpu"] = cpu
        if mem_mb:
            cap = mem_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
            applied["mem_cap_mib"] = mem_mb
    return applied


def draft_against(
    drafter: Any, prompt: Sequence[int], ref: Sequence[int], k: int
) -> dict[str, Any]:
    """Greedy speculation against the reference: figures of one prompt."""
    from middleware.protocol.session import SamplingParams

    drafter.start(prompt, SamplingParams())
    pos = rounds = drafted = accepted = 0
    times: list[float] = []
    counts: list[int] = []
    while pos < len(ref):
        t0 = time.perf_counter()
        proposal = drafter.propose(ref[:pos], (), min(k, len(ref) - pos), pos)
        times.append(time.perf_counter() - t0)
        counts.append(len(proposal))
        n = 0
        for tok in proposal.tokens:
            if pos + n >= len(ref) or tok != ref[pos + n]:
                break
            n += 1
        rounds += 1
        drafted += len(proposal)
        accepted += n
        pos += n + 1  # the target's next token comes with the verdict
    return {
        "rounds": rounds,
        "drafted": drafted,
        "accepted": accepted,
        "committed": len(ref),
        "first_round_s": times[0],
        "rest_s": sum(times[1:]),
        "rest_tokens": sum(counts[1:]),
    }


def peak_rss_mib() -> float | None:
    """This process's peak resident set (VmHWM).  Not ``ru_maxrss``: a child forked from a
    parent holding the target starts with the parent's maximum."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def child(job: dict[str, Any]) -> dict[str, Any]:
    budget = apply_budget(job["budget"], job.get("mem_mb"))
    from middleware.nodes.drafters import DrafterSpec, make_drafter
    from middleware.nodes.drafters.policy import PolicyConfig

    spec = DrafterSpec.parse(job["spec"])
    if spec.kind in ("hf", "quant"):
        import torch

        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    k = int(job["draft_len"])
    pol = PolicyConfig(threshold=0.0, min_len=k, max_len=k, max_len_cap=max(16, k), adaptive=False)
    t0 = time.perf_counter()
    drafter = make_drafter(spec, policy=pol)
    load_s = time.perf_counter() - t0
    warm = job["prompts"][0]
    draft_against(drafter, warm, job["references"][0][:k], k)  # warm-up, not counted
    per = [
        draft_against(drafter, p, r, k)
        for p, r in zip(job["prompts"], job["references"], strict=True)
    ]
    rest_tokens = sum(x["rest_tokens"] for x in per)
    rest_s = sum(x["rest_s"] for x in per)
    drafted = sum(x["drafted"] for x in per)
    rounds = sum(x["rounds"] for x in per)
    return {
        "budget_applied": budget,
        "load_s": round(load_s, 3),
        "tokens_per_s": round(rest_tokens / rest_s, 2) if rest_s > 0 else None,
        "acceptance": round(sum(x["accepted"] for x in per) / drafted, 4) if drafted else 0.0,
        "tokens_per_round": round(sum(x["committed"] for x in per) / rounds, 3),
        "first_round_ms": round(statistics.median(x["first_round_s"] for x in per) * 1e3, 1),
        "rounds": rounds,
        "drafted": drafted,
        "peak_rss_mib": peak_rss_mib(),
    }


# --- parent --------------------------------------------------------------------------------------
def references(prompts: Sequence[str], max_new: int, loaded: Any = None) -> dict[str, Any]:
    """Prompt ids (chat template) and the target's greedy continuations (SmolLM2-135M)."""
    from middleware.models.loading import load_causal_lm
    from middleware.nodes.service import encode_prompt, stop_ids_of
    from middleware.verifier.reference import reference_greedy

    loaded = loaded or load_causal_lm("smollm2")
    tok = loaded.tokenizer
    ids = [encode_prompt(tok, p) for p in prompts]
    refs = [reference_greedy(loaded.model, i, max_new, stop_ids_of(tok)) for i in ids]
    return {"prompts": ids, "references": refs}


def run_child(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.drafters", "--child"],
            input=json.dumps(job),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:300]}"}
    return json.loads(lines[-1])


def measure(spec: str, budget: str, base: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One child run; on the Pi budget, uncapped if the drafter cannot run under the cap."""
    job = {**base, "spec": spec, "budget": budget}
    out = run_child(job, timeout)
    if budget == "pi" and "error" in out and job.get("mem_mb"):
        uncapped = run_child({**job, "mem_mb": None}, timeout)
        if "error" not in uncapped:
            uncapped["mem_cap_refused"] = out["error"]
        out = uncapped
    return out


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    errors = [r["error"] for r in runs if "error" in r]
    if errors:
        return {"error": errors[0], "runs": len(runs)}
    row = dict(runs[0])
    for key in (*FIGURES, "load_s", "peak_rss_mib"):
        values = [r[key] for r in runs if r.get(key) is not None]
        row[key] = round(statistics.median(values), 3) if values else None
    row["runs"] = len(runs)
    if len(runs) > 1:
        row["tokens_per_s_runs"] = [r["tokens_per_s"] for r in runs]
    return row


def ratio(rows: dict[str, Any], a: str, b: str) -> float | None:
    ra, rb = rows.get(a, {}), rows.get(b, {})
    if ra.get("tokens_per_s") and rb.get("tokens_per_s"):
        return round(ra["tokens_per_s"] / rb["tokens_per_s"], 2)
    return None


def run(args: argparse.Namespace, loaded: Any = None) -> dict[str, Any]:
    from middleware.cli.demo import PROMPTS

    prompts = list(PROMPTS[: args.prompts])
    say(f"[drafters] target references for {len(prompts)} prompts, {args.max_new} tokens each")
    base = {
        **references(prompts, args.max_new, loaded),
        "draft_len": args.draft_len,
        "mem_mb": args.mem_mb,
    }
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        b: {s: [] for s in args.specs} for b in args.budgets
    }
    for rep in range(args.repeats):
        for budget in args.budgets:
            for spec in args.specs:  # interleaved: every drafter sees the same machine
                out = measure(spec, budget, base, args.timeout)
                runs[budget][spec].append(out)
                shown = out.get("error") or f"{out['tokens_per_s']} tok/s, acc {out['acceptance']}"
                say(f"[drafters] {rep + 1}/{args.repeats} {budget:6s} {spec:24s} {shown}")
    results = {b: {s: median_row(r) for s, r in per.items()} for b, per in runs.items()}
    failed = [
        f"{b} {s}: {row['error']}"
        for b, per in results.items()
        for s, row in per.items()
        if "error" in row
    ]
    report: dict[str, Any] = {
        "benchmark": "drafters",
        "at": utc_now(),
        "machine": machine_info(),
        "settings": {
            "prompts": len(prompts),
            "max_new_tokens": args.max_new,
            "draft_len": args.draft_len,
            "repeats": args.repeats,
            "mem_cap_mib": args.mem_mb,
            "committed_tokens": sum(len(r) for r in base["references"]),
        },
        "figures_valid": not failed,
        "errors": failed,
    }
    if failed:  # a run with errors reports no figure
        report["results"] = {
            b: {
                s: {"error": r["error"]} if "error" in r else {"withheld": True}
                for s, r in per.items()
            }
            for b, per in results.items()
        }
        return report
    report["results"] = results
    report["llamacpp_over_quant4"] = {
        b: ratio(results[b], "llamacpp:smollm2", "quant4:smollm2") for b in args.budgets
    }
    report["llamacpp_over_hf"] = {
        b: ratio(results[b], "llamacpp:smollm2", "hf:smollm2") for b in args.budgets
    }
    return report


def table(report: dict[str, Any]) -> str:
    lines = [
        f"{'budget':7s} {'drafter':24s} {'tok/s':>8s} {'accept':>7s} {'tok/round':>9s} "
        f"{'1st ms':>7s} {'RSS MiB':>8s}  note"
    ]
    for budget, per in report["results"].items():
        for spec, row in per.items():
            if "error" in row or "withheld" in row:
                what = f"error: {row['error']}" if "error" in row else "withheld (errors in run)"
                lines.append(f"{budget:7s} {spec:24s} {'-':>8s}  {what}")
                continue
            note = "no memory cap: " + row["mem_cap_refused"] if "mem_cap_refused" in row else ""
            lines.append(
                f"{budget:7s} {spec:24s} {row['tokens_per_s']:8.1f} {row['acceptance']:7.1%} "
                f"{row['tokens_per_round']:9.2f} {row['first_round_ms']:7.0f} "
                f"{row['peak_rss_mib'] or 0:8.0f}  {note[:80]}"
            )
    if report.get("llamacpp_over_quant4"):
        lines.append(f"llama.cpp / quant4 drafting speed: {report['llamacpp_over_quant4']}")
    if not report["figures_valid"]:
        lines.append("errors: no figures reported")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--specs", type=lambda s: tuple(s.split(",")), default=SPECS)
    p.add_argument("--budgets", type=lambda s: tuple(s.split(",")), default=BUDGETS)
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--max-new", type=int, default=32)
    p.add_argument("--draft-len", type=int, default=6)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--mem-mb", type=int, default=1024, help="Pi budget address-space cap, MiB")
    p.add_argument("--timeout", type=float, default=600.0, help="per child run, seconds")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "drafters.json")
    args = p.parse_args(argv)
    if not set(args.budgets) <= set(BUDGETS):
        p.error(f"--budgets: choose from {', '.join(BUDGETS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        try:
            print(json.dumps(child(json.loads(sys.stdin.read()))))
        except MemoryError as exc:
            print(f"MemoryError: {exc}", file=sys.stderr)
            return 1
        return 0
    report = run(args)
    write_json(args.out, report)
    print(table(report))
    say(f"[drafters] wrote {args.out}")
    return 0 if report["figures_valid"] else 1


if __name__ == "__main__":
    sys.exit(main())
