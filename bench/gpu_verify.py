"""What a verify round costs on an accelerator, beside centralized decoding of the same batch.

Speculation across devices beats a server that decodes every session itself only if one
verify forward of B sessions x (k + 1) tokens costs about as much as one decode step of B
sessions x 1 token (memory-bound: the weights are read once either way).  On the 2-core
CPU here it does not (a verify token costs as much as a decode token), so this measures it
where it matters, on the lent GPU machine, with the project's own :class:`TargetEngine`:

- ``decode``: the model alone, B sessions decoded greedily as one batch with a KV cache;
  time of one step (B new tokens);
- ``verify``: the engine, B sessions each verifying a k-token draft in one forward (each
  session's cache growing by one token a round, as when only the bonus token is kept);
  time of one ``verify_batch`` call, host copies of the logits included;
- ``lossless``: sessions decoded through the engine and the verifier's own acceptance code
  (:func:`run_round`, greedy, drafts right 3 tokens in 4) against the model decoding
  alone: how many are identical, token for token, in float32 and in the timed dtype.

The target is a randomly initialised model of a real architecture (``--config``; the
SmolLM2 file cannot travel to the device machine; weights do not change timing).
Random weights give nearly flat logits, so greedy near-ties are far more common than in a
trained model: a difference in the half-precision check says how often padding and
batching moved a near-tie, not that trained models differ as often.

Writes ``gpu_verify.json`` to ``--out`` (default ``bench/results/``)::

    python -m bench.gpu_verify --device cuda --dtype bfloat16        # the device machine
    python -m bench.gpu_verify --config tiny --batches 1,2 --steps 2  # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS: dict[str, dict[str, Any]] = {
    # TinyLlama-1.1B's shape (Llama 2 architecture, grouped-query attention).
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=512,
    ),
}


def build(config: str, device: str, dtype: torch.dtype, seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**CONFIGS[config], torch_dtype=dtype)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(device: str, fn: Callable[[], Any], steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def _prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).tolist()


@torch.inference_mode()
def decode_step_s(model: Any, device: str, batch: int, prompt: int, steps: int) -> list[float]:
    """Seconds per greedy decode step of ``batch`` sessions (the model alone, KV cache)."""
    from transformers import DynamicCache

    ids = torch.tensor(_prompts(batch, prompt, model.config.vocab_size, 1), device=device)
    cache = DynamicCache()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)

    def step() -> None:
        nonlocal nxt
        o = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        nxt = o.logits[:, -1].argmax(-1, keepdim=True)

    for _ in range(3):  # warm-up
        step()
    return _timed(device, step, steps)


def verify_s(
    model: Any,
    device: str,
    batch: int,
    prompt: int,
    k: int,
    steps: int,
    profile: list[str] | None = None,
) -> list[float]:
    """Seconds per ``TargetEngine.verify_batch`` of ``batch`` sessions with k-token drafts."""
    from middleware.verifier.engine import TargetEngine, VerifyItem

    engine = TargetEngine(
        model, device=device, memory_budget_tokens=1 << 22, max_batch_tokens=1 << 16
    )
    vocab = model.config.vocab_size
    contexts = _prompts(batch, prompt, vocab, 2)
    g = torch.Generator().manual_seed(3)

    def items() -> list[VerifyItem]:
        drafts = torch.randint(3, vocab, (batch, k), generator=g).tolist()
        return [
            VerifyItem(i, list(c), d) for i, (c, d) in enumerate(zip(contexts, drafts, strict=True))
        ]

    def round_() -> None:
        its = items()
        logits = engine.verify_batch(its)
        for it, lg, ctx in zip(its, logits, contexts, strict=True):
            ctx.append(int(lg[0].argmax()))  # keep the first target token, as on a rejection
            engine.commit(it.session_key, len(ctx))

    round_()  # prefill of the prompts, not timed
    for _ in range(3):  # warm-up
        round_()
    if profile is not None:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device != "cpu" else [])
        with torch_profile(activities=acts) as prof:
            for _ in range(3):
                round_()
        profile.append(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))
    return _timed(device, round_, steps)


@torch.inference_mode()
def lossless(model: Any, sessions: int, prompt: int, new: int) -> dict[str, int]:
    """Greedy through the engine and the verifier's acceptance code vs the model alone."""
    from middleware.protocol import Draft, SamplingParams
    from middleware.verifier.engine import TargetEngine
    from middleware.verifier.reference import reference_greedy
    from middleware.verifier.rounds import RoundInput, run_round

    prompts = _prompts(sessions, prompt, model.config.vocab_size, 4)
    refs = [reference_greedy(model, p, new) for p in prompts]
    engine = TargetEngine(model)
    done: list[list[int]] = [[] for _ in prompts]
    g = torch.Generator().manual_seed(5)
    seq = 0
    while any(len(d) < new for d in done):
        seq += 1
        inputs = []
        for i, (p, d) in enumerate(zip(prompts, done, strict=True)):
            if len(d) >= new:
                continue
            right = refs[i][len(d) : len(d) + 4]  # a drafter right 3 tokens in 4
            draft = [t if torch.rand((), generator=g) < 0.75 else 3 for t in right]
            inputs.append(
                RoundInput(
                    str(i),
                    tuple(p),
                    tuple(d),
                    Draft(str(i), 1, seq, len(d), tuple(draft)),
                    SamplingParams(),
                    new,
                    frozenset(),
                )
            )
        for out in run_round(engine, inputs).outputs:
            done[int(out.session_id)].extend(out.tokens)
    same = sum(d[:new] == r for d, r in zip(done, refs, strict=True))
    return {"sessions": sessions, "identical": same, "new_tokens": new}


def run(args: argparse.Namespace) -> dict[str, Any]:
    dtype = getattr(torch, args.dtype)
    if args.device.startswith("cuda") and not args.cudnn_sdp:
        # cuDNN's attention plans each new sequence length the first time it sees it: a
        # 1B decode step took 57 ms (cold lengths) instead of 14 ms on the H200 (flash).
        torch.backends.cuda.enable_cudnn_sdp(False)
    report: dict[str, Any] = {
        "machine": {
            "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "host": platform.node(),
        },
        "config": args.config,
        "dtype": args.dtype,
        "prompt_tokens": args.prompt,
        "cudnn_sdp": bool(args.cudnn_sdp),
        "steps": args.steps,
        "cases": [],
    }
    model = build(args.config, args.device, dtype)
    report["params_millions"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    for batch in args.batches:
        row: dict[str, Any] = {"batch": batch}
        row["decode_step_ms"] = _ms(
            decode_step_s(model, args.device, batch, args.prompt, args.steps)
        )
        for k in args.drafts:
            profiled = batch == args.profile_batch and k == args.drafts[0]
            prof: list[str] | None = [] if profiled else None
            ms = _ms(verify_s(model, args.device, batch, args.prompt, k, args.steps, prof))
            if prof:
                report["profile_verify"] = {"batch": batch, "k": k, "table": prof[0]}
                print(prof[0], flush=True)
            row[f"verify_k{k}_ms"] = ms
            row[f"verify_k{k}_over_decode"] = round(ms / row["decode_step_ms"], 2)
        report["cases"].append(row)
        print(json.dumps(row), flush=True)
        save(report, args.out)  # each case as it comes: a run cut short keeps what it measured
    checks: dict[str, Any] = {}
    report["lossless"] = checks
    for name, dt in ((args.dtype, dtype), ("float32", torch.float32)):
        if name in checks:
            continue
        try:
            m = model if dt == dtype else build(args.config, args.device, dt)
            checks[name] = lossless(m, args.check_sessions, 16, args.check_tokens)
        except Exception as exc:  # recorded, not hidden: the timing above still stands
            checks[name] = {"error": repr(exc)[:500]}
        print(name, json.dumps(checks[name]), flush=True)
        save(report, args.out)
    return report


def save(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_verify.json").write_text(json.dumps(report, indent=2) + "\n")


def _ms(xs: Sequence[float]) -> float:
    return round(statistics.median(xs) * 1e3, 3)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_verify", description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--config", default="llama-1b", choices=sorted(CONFIGS))
    p.add_argument("--batches", type=_ints, default=[1, 4, 16, 32, 64])
    p.add_argument("--drafts", type=_ints, default=[4, 8])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--check-sessions", type=int, default=8)
    p.add_argument("--check-tokens", type=int, default=32)
    p.add_argument("--cudnn-sdp", action="store_true", help="keep cuDNN attention (see run)")
    p.add_argument("--profile-batch", type=int, default=32, help="profile verify at this batch")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    report = run(args)
    errors = [c for c in report["lossless"].values() if "error" in c]
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
