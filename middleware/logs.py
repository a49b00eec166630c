"""structlog set-up: JSON lines for machines (systemd/journald), readable lines for a terminal.

Services bind ids per handler with ``structlog.contextvars.bound_contextvars``
so they follow asyncio tasks.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def configure_logging(*, json: bool | None = None, level: str = "info") -> None:
    """Configure structlog once per process.  ``json=None``: JSON unless stderr is a TTY."""
    if json is None:
        json = not sys.stderr.isatty()
    lvl = getattr(logging, level.upper(), logging.INFO)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
