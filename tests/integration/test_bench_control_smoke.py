"""Smoke test of the speculation-control benchmark's quick mode (``bench/control.py``).

No timing assertions: the figures depend on the machine; this only checks that
the comparison runs end to end on a heterogeneous fleet in its steady-state
mode (devices running sessions back to back), writes its JSON, held the
lossless guarantee in every session of every configuration, measured positive
figures in the window consistent with one another, and that the controller was
consulted and sent draft-length hints.
"""

from __future__ import annotations

import json
import math

import pytest

from bench.control import CLASSES, all_lossless, parse_args, run
from middleware.mosquitto import mosquitto_available

pytestmark = [pytest.mark.integration, pytest.mark.model, pytest.mark.slow]


@pytest.mark.skipif(not mosquitto_available(), reason="the benchmark starts a mosquitto binary")
def test_quick_control_benchmark_is_lossless_with_positive_figures(smollm2, tmp_path) -> None:
    settings = parse_args(["--quick", "--out-dir", str(tmp_path), "--no-cache"])
    report, written = run(settings, loaded=smollm2)

    assert (tmp_path / "control.json") in written
    on_disk = json.loads((tmp_path / "control.json").read_text())
    assert [r["case"] for r in on_disk["results"]] == [c.name for c in settings.cases()]
    assert all_lossless(report) and all(r["median"]["lossless"] for r in on_disk["results"])
    cfg = on_disk["config"]
    assert cfg["mode"] == "steady" and cfg["duration_s"] == settings.duration > 0
    assert 0 < cfg["warmup_s"] == settings.warmup < settings.duration
    window = settings.duration - settings.warmup

    names = {r["case"] for r in report["results"]}
    assert {"controller", "uniform-k4", "max-batch", "arrival-window"} <= names
    per_device = settings.devices // len(CLASSES)  # heterogeneous: two devices of each kind
    for row in report["results"]:
        md = row["median"]
        for one in row["runs"]:
            assert one["lossless"] and not one["mismatched_sessions"], row["case"]
            # Sessions finished, every one of them full length (no early stop in 8 tokens),
            # and the window a part of the whole run.  How many sessions fit in the window
            # depends on the machine's speed (a loaded machine finished fewer than one per
            # device), so only that some did is asserted.
            assert one["run"]["sessions"] >= 1
            assert one["run"]["committed_tokens"] == one["run"]["sessions"] * settings.tokens
            assert all(x["tokens"] == settings.tokens for x in one["sessions"])
            assert one["run"]["wall_s"] >= settings.duration
            assert math.isclose(one["window_s"], window, rel_tol=1e-9)
            assert 0 < one["committed_tokens"] < one["run"]["committed_tokens"]
            assert math.isclose(one["wstgr"], one["committed_tokens"] / window, rel_tol=1e-9)
            assert sum(one["steady"]["per_device_tokens"].values()) == one["committed_tokens"]
            assert one["latency"]["n"] == one["committed_tokens"]
        assert md["mode"] == "steady"
        assert md["wstgr"] > 0 and md["ms_per_token"] > 0
        assert 0 < md["latency"]["p50_ms"] <= md["latency"]["p95_ms"]
        assert 0 < md["verify_rounds_per_token"] <= 1 and md["verify_forwards_per_token"] > 0
        assert md["mean_batch"] >= 1
        for c in CLASSES:
            by_class = md["by_class"][c.name]
            assert by_class["devices"] == per_device and by_class["sessions"] >= 1
            assert by_class["ms_per_token"] > 0 and by_class["window_tokens"] > 0

    uniform = next(r for r in report["results"] if r["case"] == "uniform-k4")
    for session in uniform["runs"][0]["sessions"]:  # exactly k a round, less only near the end
        assert session["proposed"] <= 4 * session["rounds"]

    controller = next(r for r in report["results"] if r["case"] == "controller")
    probe = controller["runs"][0]["controller"]
    assert probe["plans"] > 0 and probe["decisions"].get("verify", 0) > 0
    hints = [
        int(h)
        for c in CLASSES
        for h, n in probe["by_class"][c.name]["hints"].items()
        for _ in range(n)
    ]
    assert hints and any(h > 0 for h in hints) and max(hints) <= 16
    assert probe["forward_model"]["observations"] > 0

    comparison = report["comparison"]
    assert set(comparison["controller"]) == names - {n for n in names if n.startswith("controller")}
    assert comparison["best_uniform_by_latency"] == "uniform-k4"
