"""Small shared pieces of the benchmarks: statistics, machine description, JSON and plots."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) by linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    data = sorted(values)
    pos = q * (len(data) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """n, p50, p95 and mean in milliseconds."""
    return {
        "n": len(seconds),
        "p50_ms": round(percentile(seconds, 0.5) * 1e3, 2),
        "p95_ms": round(percentile(seconds, 0.95) * 1e3, 2),
        "mean_ms": round(statistics.fmean(seconds) * 1e3, 2) if seconds else 0.0,
    }


def median_of(runs: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Per key, the median over runs of every numeric value (nested dicts likewise).

    Booleans are combined with ``all``; other values are taken from the first run.
    """
    runs = list(runs)
    if not runs:
        return {}
    out: dict[str, Any] = {}
    for key, first in runs[0].items():
        values = [r[key] for r in runs if key in r]
        if isinstance(first, bool):
            out[key] = all(values)
        elif isinstance(first, int | float):
            out[key] = statistics.median(values)
        elif isinstance(first, Mapping):
            out[key] = median_of(values)
        else:
            out[key] = first
    return out


def machine_info() -> dict[str, Any]:
    """What the figures were measured on (torch imported lazily: it is already loaded here)."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            models = {line.split(":", 1)[1].strip() for line in f if line.startswith("model name")}
        info["cpu_model"] = ", ".join(sorted(models))
    except OSError:
        pass
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_json(path: Path, report: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of another process (Linux /proc), 0.0 if unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def say(msg: str) -> None:
    """Progress for people, on stderr (stdout carries the table)."""
    print(msg, file=sys.stderr, flush=True)


def positive_ints(text: str) -> tuple[int, ...]:
    """argparse type: ``"1,4,16"`` -> (1, 4, 16)."""
    values = tuple(int(x) for x in text.split(",") if x.strip())
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive integers, e.g. 1,4,16")
    return values
