"""Integration fixtures: the real SmolLM2-135M model, loaded once per test session."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def smollm2() -> Any:
    from middleware.models.loading import load_causal_lm

    return load_causal_lm("smollm2")
