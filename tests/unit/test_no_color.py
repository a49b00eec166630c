"""NO_COLOR (https://no-color.org) turns the CLI's colours off even on a terminal."""

from __future__ import annotations

import sys

import pytest

from middleware.cli import tools


def test_no_color_disables_colours(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert tools._colour()
    monkeypatch.setenv("NO_COLOR", "1")
    assert not tools._colour()
