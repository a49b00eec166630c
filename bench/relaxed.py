"""Relaxed (lossy) acceptance: its speed-up and its quality loss, side by side (issue #10).

In one process, no bus: the real SmolLM2-135M target (``TargetEngine``, the
verifier's own round code ``run_round``) and a 4-bit copy of it as the
drafter, one session at a time, on a small fixed set of questions with known
answers.  For each setting (lossless greedy, then relaxed rules from mild to
loose) it measures:

- speed: target forward passes per committed token and committed tokens per
  second of target time (the verifier's cost; drafting runs on the devices);
- quality against the lossless output (itself identical to the target alone):
  token agreement (share of positions where the token equals the lossless
  one), exact-output rate, and a task score: the share of answers that contain
  the expected keyword, for lossless and relaxed alike.

Prints a table, writes ``bench/results/relaxed.json`` and ``relaxed.png``::

    python -m bench.relaxed [--max-new 48] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import machine_info
from middleware.models.loading import load_causal_lm
from middleware.nodes.drafters import make_drafter
from middleware.nodes.service import encode_prompt, stop_ids_of
from middleware.protocol import Draft, SamplingParams
from middleware.verifier.acceptance import RelaxedAcceptance
from middleware.verifier.engine import TargetEngine
from middleware.verifier.reference import reference_greedy
from middleware.verifier.rounds import RoundInput, run_round

RESULTS = Path(__file__).resolve().parent / "results"

# (question, keyword a correct answer contains; case-insensitive)
TASKS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France? Answer in one sentence.", "paris"),
    ("What is the capital of Japan? Answer in one sentence.", "tokyo"),
    ("How many days are there in a week?", "seven"),
    ("What colour is the sky on a clear day?", "blue"),
    ("Which planet do we live on?", "earth"),
    ("What is the largest ocean on Earth?", "pacific"),
    ("What gas do plants absorb from the air?", "carbon dioxide"),
    ("What is the freezing point of water in Celsius?", "0"),
    ("Who wrote Romeo and Juliet?", "shakespeare"),
    ("What is the chemical symbol for gold?", "au"),
    ("How many legs does a spider have?", "eight"),
    ("What is the opposite of hot?", "cold"),
)

SETTINGS: tuple[tuple[str, RelaxedAcceptance | None], ...] = (
    ("lossless", None),
    ("relaxed r0.9 c0.3", RelaxedAcceptance(ratio=0.9, confidence=0.3)),
    ("relaxed r0.5 c0.5", RelaxedAcceptance(ratio=0.5, confidence=0.5)),
    ("relaxed r0.3 c0.7", RelaxedAcceptance(ratio=0.3, confidence=0.7)),
)


def generate(
    engine: TargetEngine,
    drafter: Any,
    prompt: list[int],
    max_new: int,
    stop: frozenset[int],
    rule: RelaxedAcceptance | None,
    key: str,
) -> dict[str, Any]:
    """One session, speculative, through the verifier's round code."""
    drafter.start(prompt, SamplingParams())
    committed: list[int] = []
    forwards, forward_s, relaxed, seq = 0, 0.0, 0, 0
    while len(committed) < max_new:
        p = drafter.propose(committed, [], min(8, max_new - len(committed)), len(committed))
        seq += 1
        inp = RoundInput(
            key,
            tuple(prompt),
            tuple(committed),
            Draft(key, 1, seq, len(committed), tuple(p.tokens)),
            SamplingParams(),
            max_new,
            stop,
            rule,
        )
        result = run_round(engine, [inp])
        out = result.outputs[0]
        forwards += 1
        forward_s += result.forward_s
        relaxed += out.relaxed
        drafter.observe(len(p.tokens), out.accepted)
        committed += out.tokens
        if out.finish_reason:
            break
    engine.close(key)
    return {"tokens": committed, "forwards": forwards, "forward_s": forward_s, "relaxed": relaxed}


def measure(max_new: int) -> dict[str, Any]:
    torch.manual_seed(0)
    loaded = load_causal_lm("smollm2")
    tok = loaded.tokenizer
    stop = frozenset(stop_ids_of(tok))
    prompts = [encode_prompt(tok, q) for q, _ in TASKS]
    refs = [reference_greedy(loaded.model, p, max_new, stop) for p in prompts]
    engine = TargetEngine(loaded.model)
    drafter = make_drafter("quant4:smollm2", base=loaded)
    rows = []
    lossless_tokens: list[list[int]] = []
    for name, rule in SETTINGS:
        t0 = time.perf_counter()
        runs = [
            generate(engine, drafter, p, max_new, stop, rule, f"{name.replace(' ', '_')}-{i}")
            for i, p in enumerate(prompts)
        ]
        wall = time.perf_counter() - t0
        outs = [r["tokens"] for r in runs]
        if rule is None:
            lossless_tokens = outs
            assert outs == refs, "lossless speculative output differs from the target alone"
        n_tokens = sum(len(o) for o in outs)
        agree = sum(
            sum(1 for a, b in zip(o, r, strict=False) if a == b)
            for o, r in zip(outs, lossless_tokens, strict=True)
        )
        positions = sum(max(len(o), len(r)) for o, r in zip(outs, lossless_tokens, strict=True))
        texts = [tok.decode(o, skip_special_tokens=True) for o in outs]
        score = sum(kw in t.lower() for t, (_, kw) in zip(texts, TASKS, strict=True)) / len(TASKS)
        forwards = sum(r["forwards"] for r in runs)
        fs = sum(r["forward_s"] for r in runs)
        rows.append(
            {
                "setting": name,
                "ratio": rule.ratio if rule else None,
                "confidence": rule.confidence if rule else None,
                "tokens": n_tokens,
                "forwards": forwards,
                "forwards_per_token": round(forwards / n_tokens, 4),
                "target_tokens_per_s": round(n_tokens / fs, 2),
                "wall_s": round(wall, 2),
                "relaxed_tokens": sum(r["relaxed"] for r in runs),
                "token_agreement": round(agree / positions, 4),
                "identical_outputs": sum(
                    o == r for o, r in zip(outs, lossless_tokens, strict=True)
                ),
                "task_score": round(score, 3),
                "answers": texts,
            }
        )
    base = rows[0]
    for r in rows:
        r["speedup_forwards"] = round(base["forwards_per_token"] / r["forwards_per_token"], 3)
        r["speedup_target_time"] = round(r["target_tokens_per_s"] / base["target_tokens_per_s"], 3)
    return {
        "machine": machine_info(),
        "max_new_tokens": max_new,
        "drafter": "quant4:smollm2",
        "target": "smollm2 (SmolLM2-135M-Instruct Q4_1 GGUF, float32)",
        "tasks": len(TASKS),
        "settings": rows,
    }


def table(report: dict[str, Any]) -> str:
    head = (
        f"{'setting':<20}{'fwd/tok':>9}{'speed-up':>10}{'tok/s tgt':>11}{'agree':>8}"
        f"{'same':>6}{'task':>7}"
    )
    lines = [head]
    for r in report["settings"]:
        lines.append(
            f"{r['setting']:<20}{r['forwards_per_token']:>9.3f}"
            f"{r['speedup_forwards']:>9.2f}x{r['target_tokens_per_s']:>11.1f}"
            f"{r['token_agreement']:>8.1%}{r['identical_outputs']:>4}/{report['tasks']:<2}"
            f"{r['task_score']:>6.0%}"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["settings"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["speedup_forwards"], r["token_agreement"] * 100, s=60)
        ax.annotate(
            r["setting"],
            (r["speedup_forwards"], r["token_agreement"] * 100),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=8,
        )
    ax.set_xlabel("speed-up in target forward passes per token (x lossless)")
    ax.set_ylabel("token agreement with lossless output (%)")
    ax.set_title("relaxed acceptance: speed vs quality")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-new", type=int, default=48)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = measure(args.max_new)
    print(table(report))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "relaxed.json").write_text(json.dumps(report, indent=2) + "\n")
    try:
        plot(report, args.out / "relaxed.png")
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
