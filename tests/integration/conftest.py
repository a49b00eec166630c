"""Integration fixtures: the real SmolLM2-135M model, loaded once per test session."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def smollm2() -> Any:
    from middleware.models.loading import load_causal_lm

    return load_causal_lm("smollm2")


@pytest.fixture(scope="session")
def quant4(smollm2: Any) -> Any:
    """A 4-bit copy of SmolLM2 (made once): a realistic, imperfect drafter."""
    from middleware.nodes.drafters.quantized import quantize_model

    return quantize_model(smollm2.model, 4)
