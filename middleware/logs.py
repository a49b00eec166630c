"""structlog set-up: JSON lines for machines (systemd/journald), readable lines for a terminal.

Everything goes through one stdlib handler on stderr with structlog's ``ProcessorFormatter``
(the stdlib bridge): our structlog events, stdlib ``logging`` from libraries (transformers,
paho, asyncio) and Python ``warnings`` (``logging.captureWarnings``) all come out as the same
JSON lines.  Measured before this: 7 of 27 verifier start-up lines on a pipe were JSON; the
rest were warnings and transformers/tqdm progress bars with carriage returns, which are now
switched off when stderr is not a terminal.

Services bind ids per handler with ``structlog.contextvars.bound_contextvars``
so they follow asyncio tasks.  ``NO_COLOR`` (https://no-color.org) turns colours off.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog


def _quiet_progress_bars() -> None:
    """No progress bars (tqdm, transformers, huggingface_hub) when stderr is not a terminal."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if "transformers" in sys.modules:  # already imported: its own switch
        try:
            from transformers.utils import logging as tlog

            tlog.disable_progress_bar()
        except Exception:  # an old or partial install: the environment variables remain
            pass


def configure_logging(*, json: bool | None = None, level: str = "info") -> None:
    """Configure logging once per process.  ``json=None``: JSON unless stderr is a TTY."""
    tty = sys.stderr.isatty()
    if json is None:
        json = not tty
    if not tty:
        _quiet_progress_bars()
    lvl = getattr(logging, level.upper(), logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=tty and "NO_COLOR" not in os.environ)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(lvl)
    logging.captureWarnings(True)  # warnings.warn(...) -> the "py.warnings" logger -> JSON
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.filter_by_level,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
