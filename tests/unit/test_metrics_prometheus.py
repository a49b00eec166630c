"""The verifier's metrics on prometheus_client: histograms, counters present from the start,
process and build info, one registry per service, and a real scrape through promtool."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import urllib.request

import pytest

from middleware.metrics import Registry, serve_metrics
from middleware.verifier.service import REJECT_REASONS, VerifierMetrics


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool missing in CI: scripts/run.sh test installs Debian's prometheus")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return path


def test_counters_exist_before_first_use_and_two_services_coexist() -> None:
    a, b = VerifierMetrics(Registry()), VerifierMetrics(Registry())  # no duplicate error
    text = a.registry.render()
    assert "mw_verifier_rounds_total 0.0" in text
    for reason in REJECT_REASONS:
        assert f'mw_verifier_rejected_messages_total{{reason="{reason}"}} 0.0' in text
    assert 'mw_verifier_answers_total{kind="accept"} 0.0' in text
    assert "# TYPE mw_verifier_kv_evictions_total counter" in text
    assert "process_cpu_seconds_total" in text or "process_" not in text  # Linux only
    assert "mw_build_info{" in text
    b.rounds.inc()
    assert a.rounds.total() == 0 and b.rounds.total() == 1


def test_histograms_bucket_observations() -> None:
    m = VerifierMetrics(Registry())
    m.forward_time.observe(0.03)
    m.forward_time.observe(13.0)  # a start-up outlier lands in +Inf, not in every quantile
    m.batch_size.observe(4)
    text = m.registry.render()
    assert 'mw_verifier_forward_seconds_bucket{le="0.05"} 1.0' in text
    assert 'mw_verifier_forward_seconds_bucket{le="+Inf"} 2.0' in text
    assert 'mw_verifier_batch_size_bucket{le="4.0"} 1.0' in text
    assert m.forward_time.mean == pytest.approx(6.515)
    m.rejected.inc(reason="malformed")
    assert m.rejected.get(reason="malformed") == 1 and m.rejected.total() == 1


def test_real_scrape_passes_promtool_check_metrics() -> None:
    promtool = _promtool()
    m = VerifierMetrics(Registry())
    m.forward_time.observe(0.02)
    m.answers.inc(kind="accept")
    m.evictions.inc(2)

    async def scrape() -> bytes:
        async with serve_metrics(m.registry, port=0) as port:
            url = f"http://127.0.0.1:{port}/metrics"
            return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())

    body = asyncio.run(scrape())
    r = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()
    assert b"mw_verifier_kv_evictions_total 2.0" in body
