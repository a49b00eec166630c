"""Configuration: defaults, the file/env/flag layering, and the verifier's batch window."""

from __future__ import annotations

from pathlib import Path

import pytest

from middleware.cli.services import verifier_config
from middleware.config import load_config
from middleware.errors import ConfigError


def test_the_planned_policy_waits_within_its_own_bound_the_others_within_the_window(
    tmp_path: Path,
) -> None:
    path = tmp_path / "mw.toml"
    path.write_text('[verifier]\nbatch_policy = "planned"\n')
    planned = verifier_config(load_config(path, env={}))
    assert planned.batch.policy == "planned" and planned.batch.window == pytest.approx(0.5)
    adaptive = verifier_config(
        load_config(
            path,
            env={"MW_VERIFIER_BATCH_POLICY": "adaptive", "MW_VERIFIER_PLANNED_MAX_WAIT_MS": "80"},
        )
    )
    assert adaptive.batch.policy == "adaptive" and adaptive.batch.window == pytest.approx(0.005)
    tuned = verifier_config(load_config(path, env={"MW_VERIFIER_PLANNED_MAX_WAIT_MS": "80"}))
    assert tuned.batch.window == pytest.approx(0.08)


def test_a_bad_value_is_refused_with_its_key(tmp_path: Path) -> None:
    path = tmp_path / "mw.toml"
    path.write_text('[verifier]\nplanned_max_wait_ms = "soon"\n')
    with pytest.raises(ConfigError, match="planned_max_wait_ms"):
        load_config(path, env={})
