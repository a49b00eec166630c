"""bench/gpu_verify.py runs (on the CPU, a tiny random Llama): its timings, and its lossless
check through the engine and the verifier's acceptance code, land in the JSON."""

from __future__ import annotations

import json
from pathlib import Path

from bench.gpu_verify import main


def test_gpu_verify_smoke_run_on_the_cpu(tmp_path: Path) -> None:
    argv = ["--config", "tiny", "--batches", "1,2", "--drafts", "2", "--steps", "2"]
    argv += ["--check-sessions", "2", "--check-tokens", "6", "--profile-batch", "2"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_verify.json").read_text())
    assert [c["batch"] for c in report["cases"]] == [1, 2]
    assert all(c["decode_step_ms"] > 0 and c["verify_k2_ms"] > 0 for c in report["cases"])
    assert report["lossless"]["float32"] == {"sessions": 2, "identical": 2, "new_tokens": 6}
    assert "aten::" in report["profile_verify"]["table"]
