"""Smoke test of bench/drafters.py: it measures positive figures per drafter and budget, and a
run in which a drafter fails reports no figure at all.  No timing assertions."""

from __future__ import annotations

import json

import pytest

from bench.drafters import main, parse_args, run

pytest.importorskip("llama_cpp")
pytestmark = [pytest.mark.model, pytest.mark.slow]


def test_quick_run_reports_positive_figures_per_budget(smollm2, tmp_path) -> None:
    quick = "--specs ngram,llamacpp:smollm2 --prompts 1 --max-new 8 --draft-len 4".split()
    args = parse_args([*quick, "--out", str(tmp_path / "d.json")])
    report = run(args, loaded=smollm2)
    assert report["figures_valid"] and not report["errors"]
    for budget in ("thread", "pi"):
        for spec in ("ngram", "llamacpp:smollm2"):
            row = report["results"][budget][spec]
            assert row["tokens_per_s"] > 0 and 0.0 <= row["acceptance"] <= 1.0, row
            assert row["tokens_per_round"] >= 1.0 and row["drafted"] > 0
        pi = report["results"]["pi"]["llamacpp:smollm2"]
        assert pi["budget_applied"]["mem_cap_mib"] == 1024  # ran under the cap
        assert "mem_cap_refused" not in pi
        assert len({row["budget_applied"].get("cpu", -1) for row in [pi]}) == 1
    # llama.cpp on the packaged Q4_1 file agrees with the float32 target most of the time
    assert report["results"]["thread"]["llamacpp:smollm2"]["acceptance"] > 0.5
    assert report["llamacpp_over_quant4"] == {"thread": None, "pi": None}  # quant4 not run


def test_a_run_with_an_error_reports_no_figure(tmp_path) -> None:
    out = tmp_path / "d.json"
    bad = "--specs ngram,llamacpp:/nonexistent/model.gguf --budgets thread --prompts 1".split()
    rc = main([*bad, "--max-new", "4", "--out", str(out)])
    assert rc == 1
    report = json.loads(out.read_text())
    assert report["figures_valid"] is False and report["errors"]
    assert "llamacpp_over_quant4" not in report
    rows = report["results"]["thread"]
    assert rows["ngram"] == {"withheld": True}  # its figures are withheld too
    assert "not a .gguf file" in rows["llamacpp:/nonexistent/model.gguf"]["error"]
