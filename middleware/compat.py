"""Python 3.10 (JetPack 6, Ubuntu 22.04) for what a device runs: the 3.11 names, backported.

The code is written for 3.11 (``asyncio.TaskGroup``/``timeout``/``timeout_at``,
``typing.Self``, ``tomllib``, ``BaseExceptionGroup``, one ``TimeoutError``).  On an older
Python, :func:`install` puts the maintained backports under those names once, before any
other module of the package is imported (``middleware/__init__.py`` calls it), so no module
needs a version switch of its own:

=====================================  ===================================================
3.11 name                              backport (installed with a ``python_version`` marker)
=====================================  ===================================================
asyncio.TaskGroup, timeout, timeout_at  ``taskgroup`` (CPython 3.12's code)
asyncio.run                            ``taskgroup.run``: its tasks have ``cancelling()`` and
                                       ``uncancel()``, which TaskGroup and our own cancel
                                       handling (``broker_bridge/_aio.py``) rely on
asyncio.TimeoutError                   the builtin ``TimeoutError``, as 3.11 unified them
                                       (``except TimeoutError`` around ``wait_for``)
typing.Self                            ``typing_extensions.Self``
tomllib                                ``tomli``
BaseExceptionGroup, ExceptionGroup     ``exceptiongroup``
=====================================  ===================================================

On 3.11 and later this does nothing.  ``tests/unit/test_python310.py`` runs vermin over
the device-side modules with these names excluded and requires 3.10; it is a static check,
not a run under 3.10 (no 3.10 interpreter can be installed here).
"""

from __future__ import annotations

import sys

# Names this module provides on < 3.11 (the vermin check excludes exactly these).
BACKPORTED = (
    "asyncio.TaskGroup",
    "asyncio.timeout",
    "asyncio.timeout_at",
    "typing.Self",
    "tomllib",
    "BaseExceptionGroup",
    "ExceptionGroup",
)


def install() -> None:
    if sys.version_info >= (3, 11):  # noqa: UP036 - the point: older Pythons
        return
    import asyncio
    import asyncio.exceptions
    import builtins
    import typing

    import exceptiongroup
    import taskgroup
    import tomli
    import typing_extensions

    for name in ("TaskGroup", "timeout", "timeout_at", "Timeout", "Runner", "run"):
        setattr(asyncio, name, getattr(taskgroup, name))
    asyncio.TimeoutError = asyncio.exceptions.TimeoutError = builtins.TimeoutError  # type: ignore[misc]
    typing.Self = typing_extensions.Self
    sys.modules.setdefault("tomllib", tomli)
    builtins.BaseExceptionGroup = exceptiongroup.BaseExceptionGroup  # type: ignore[misc]
    builtins.ExceptionGroup = exceptiongroup.ExceptionGroup  # type: ignore[misc]
