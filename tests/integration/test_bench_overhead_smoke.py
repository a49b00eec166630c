"""Smoke test of ``bench.verifier_overhead --quick``: it runs end to end against a real
Mosquitto, the no-op verifier answers every draft, and it writes positive figures.

No timing assertions (the figures depend on the machine).  The benchmark runs in its own
process: it freezes its heap (``settle_heap``) as ``mw-cli verifier`` does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from middleware.mosquitto import mosquitto_available

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not mosquitto_available(), reason="the benchmark starts a mosquitto binary")
def test_quick_overhead_benchmark_reports_positive_figures(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench.verifier_overhead", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "verifier_overhead.json").read_text())
    rtt, tp = report["rtt"], report["throughput"]
    assert rtt["middleware_round"]["n"] == rtt["raw_paho_qos1"]["n"] > 0
    assert rtt["ratio_p50"] > 0 and rtt["ratio_p99"] > 0
    (run_,) = tp["runs"]  # --quick: one run; an invalid one (refusals, strays) raises instead
    assert run_["rejected"] == 0 and run_["load"]["unexpected"] == 0
    assert run_["load"]["opens"] >= tp["sessions"] and run_["rounds"] >= run_["load"]["verdicts"]
    assert tp["verifier_drafts_per_s"] > 0 and tp["echo_drafts_per_s"] > 0 and tp["ratio"] > 0
