"""A tiny, dependency-free sd_notify for services run by systemd.

With ``Type=notify`` systemd waits for ``READY=1`` before it considers the
unit started; with ``WatchdogSec=`` it restarts the service when
``WATCHDOG=1`` pings stop.  Both are datagrams to the unix socket named by
``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace).  Outside
systemd the variable is unset and every call is a cheap no-op returning False.

The watchdog is pinged from the event loop itself (:func:`watchdog_loop`), so
a loop blocked by synchronous work stops the pings and systemd restarts the
service - the failure a watchdog is for::

    async with asyncio.TaskGroup() as tg:
        tg.create_task(service.run(), name="verifier")
        tg.create_task(watchdog_loop(), name="sd-watchdog")
        await service.ready.wait()
        notify_ready()
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger("middleware.systemd")


def _address(path: str) -> str | None:
    """The socket address for ``$NOTIFY_SOCKET``, or None if it is not a unix socket."""
    if path.startswith("@"):
        return "\0" + path[1:]  # abstract namespace
    if path.startswith("/"):
        return path
    return None  # e.g. "vsock:..." (VMs): not used by these services


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (newline-separated ``KEY=VALUE`` lines) to systemd.

    Returns True when the datagram was sent, False when not run under a
    notify-enabled unit or when sending failed (a notification is never worth
    crashing the service for; failures are logged)."""
    path = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    address = _address(path) if path else None
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify_failed", socket=path, state=state.split("\n", 1)[0], error=str(exc))
        return False
    return True


def notify_ready(status: str = "") -> bool:
    """``READY=1`` (plus an optional ``STATUS=`` line shown by ``systemctl status``)."""
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def notify_stopping(status: str = "") -> bool:
    """``STOPPING=1``: the service is shutting down on purpose."""
    return notify("STOPPING=1" + (f"\nSTATUS={status}" if status else ""))


def notify_status(status: str) -> bool:
    """Update the free-text status line of ``systemctl status``."""
    return notify(f"STATUS={status}")


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout in seconds (``WatchdogSec=``), or None when not enabled
    for this process (``WATCHDOG_USEC`` unset/invalid, or ``WATCHDOG_PID`` is another pid)."""
    env = os.environ if env is None else env
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None  # meant for the process that spawned us
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None


async def watchdog_loop(
    interval: float | None = None, healthy: Callable[[], bool] | None = None
) -> None:
    """Ping ``WATCHDOG=1`` every half watchdog interval until cancelled.

    ``interval`` defaults to :func:`watchdog_interval`; without a watchdog the
    coroutine returns at once (harmless in a TaskGroup).  ``healthy``, when
    given, is asked before each ping: returning False skips it, so a service
    whose loop runs but whose work is stuck (e.g. a hung model forward in a
    worker thread) is restarted too."""
    timeout = watchdog_interval() if interval is None else interval
    if timeout is None or timeout <= 0:
        return
    period = timeout / 2
    log.info("sd_watchdog_started", timeout_s=timeout, ping_every_s=period)
    while True:
        if healthy is None or healthy():
            notify("WATCHDOG=1")
        else:
            log.warning("sd_watchdog_ping_skipped", reason="service reports unhealthy")
        await asyncio.sleep(period)
