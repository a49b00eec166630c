"""Smoke test of the WSTGR benchmark's quick mode: it runs end to end and reports sane figures.

No timing assertions: the numbers depend on the machine; this only checks that
the benchmark runs, writes its JSON, held the lossless guarantee and measured
positive figures.
"""

from __future__ import annotations

import json

import pytest

from bench.wstgr import POLICIES, all_lossless, parse_args, run
from middleware.mosquitto import mosquitto_available

pytestmark = [pytest.mark.integration, pytest.mark.model, pytest.mark.slow]


@pytest.mark.skipif(not mosquitto_available(), reason="the benchmark starts a mosquitto binary")
def test_quick_benchmark_writes_lossless_positive_figures(smollm2, tmp_path) -> None:
    settings = parse_args(
        [
            "--quick",
            "--devices",
            "2",
            "--tokens",
            "4",
            "--repeats",
            "1",
            "--out-dir",
            str(tmp_path),
            "--no-cache",
        ]
    )
    wstgr, batching, written = run(settings, loaded=smollm2)

    assert (tmp_path / "wstgr.json") in written and (tmp_path / "batching.json") in written
    on_disk = json.loads((tmp_path / "wstgr.json").read_text())
    assert on_disk["results"] == json.loads(json.dumps(wstgr["results"]))
    assert json.loads((tmp_path / "batching.json").read_text())["devices"] == 2
    assert all_lossless(wstgr, batching)

    (row,) = wstgr["results"]
    assert row["devices"] == 2 and row["profile"] == "jetson"
    spec, central = row["speculative"], row["centralized"]
    assert spec["committed_tokens"] == 2 * 4 == central["tokens"]  # budget, no early stop
    assert spec["wstgr"] > 0 and central["tokens_per_s"] > 0 and row["ratio"] > 0
    assert spec["latency"]["n"] == spec["committed_tokens"]
    assert 0 < spec["latency"]["p50_ms"] <= spec["latency"]["p95_ms"]
    assert 0 < spec["verify_rounds_per_token"] <= 1
    assert central["all_match_reference"]
    assert wstgr["machine"]["torch_threads"] == 1 and wstgr["machine"]["cpu_count"] >= 1

    assert [p["policy"] for p in batching["results"]] == ["adaptive", "fixed", "none"]
    assert set(POLICIES) >= {"adaptive", "fixed", "none"}
    for p in batching["results"]:
        med = p["median"]
        assert med["lossless"] and med["wstgr"] > 0 and med["latency"]["p95_ms"] > 0
        assert med["committed_tokens"] == 8
    none = next(p["median"] for p in batching["results"] if p["policy"] == "none")
    assert none["mean_batch"] == 1.0  # "none" verifies one draft per forward pass
