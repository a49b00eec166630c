"""Start a real Mosquitto for the demo, the benchmarks and the tests (not a transport).

:class:`MosquittoProcess` runs the local ``mosquitto`` binary on a free
loopback port with ``deploy/mosquitto/mosquitto.conf`` plus a listener line and
a persistence directory in a temp dir.  It can be stopped, killed (SIGKILL, for
fault tests) and restarted on the same port with the same persistence, so
sessions and retained messages survive a restart like on a real deployment::

    with MosquittoProcess() as broker:
        settings = MqttSettings(host=broker.host, port=broker.port)
        broker.kill(); broker.restart()

Machines without the binary run the tests against Docker instead
(``tests/brokers.py``, through testcontainers).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

from middleware.errors import BusError

_REPO_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto" / "mosquitto.conf"
_SEARCH = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")
# Used when the package is installed without the repository's deploy/ folder.
FALLBACK_CONFIG = """\
per_listener_settings false
allow_anonymous true
set_tcp_nodelay true
persistence true
persistence_file mosquitto.db
autosave_interval 1
max_inflight_messages 100
max_queued_messages 10000
max_packet_size 1048576
log_dest stderr
log_type error
log_type warning
log_type notice
log_type information
"""


def mosquitto_binary() -> str | None:
    """Path of the mosquitto executable (``$PATH`` first, then sbin dirs), or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in _SEARCH if os.access(p, os.X_OK)), None)


def mosquitto_available() -> bool:
    """True when a local mosquitto binary can be started."""
    return mosquitto_binary() is not None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(
    host: str, port: int, timeout: float, alive: Callable[[], bool] = lambda: True
) -> bool:
    """Poll until ``host:port`` accepts a TCP connection; False on timeout or if not ``alive()``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            return False
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return True
        time.sleep(0.02)
    return False


def render_config(base: str, port: int, host: str, persistence_dir: Path, extra: str = "") -> str:
    """The broker config: ``base`` plus the launcher's persistence path and listener."""
    return (
        f"{base.rstrip()}\n\n# --- added by the launcher ---\n"
        f"persistence_location {persistence_dir}/\n"
        f"listener {port} {host}\n{extra.rstrip()}\n"
    )


class Broker(ABC):
    """A broker the demo and the tests start, stop, kill and restart on one port with one
    persistence (:class:`MosquittoProcess`; ``tests/brokers.py`` runs one in Docker)."""

    host: str
    port: int

    @abstractmethod
    def start(self) -> Self: ...

    @abstractmethod
    def stop(self) -> None:
        """Shut down cleanly (the broker saves its database)."""

    @abstractmethod
    def kill(self) -> None:
        """Vanish without saving (fault tests)."""

    @abstractmethod
    def close(self) -> None:
        """Stop and remove what it left on disk."""

    def restart(self, *, hard: bool = False) -> Self:
        """Stop (or kill, with ``hard``) and start again on the same port and persistence."""
        if hard:
            self.kill()
        else:
            self.stop()
        return self.start()

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.close)


class MosquittoProcess(Broker):
    """A local mosquitto process on ``host:port`` with its own persistence dir.

    ``stop()`` keeps the temp dir (so ``restart()`` finds the persisted
    sessions); ``close()`` (and leaving the context) also deletes it.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        config: Path | str | None = None,
        extra_config: str = "",
        binary: str | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.binary = binary or mosquitto_binary()
        if self.binary is None:
            raise BusError("mosquitto binary not found on PATH or in /usr/sbin")
        cfg = Path(config) if config is not None else _REPO_CONFIG
        self._base_config = cfg.read_text() if cfg.exists() else FALLBACK_CONFIG
        self._extra = extra_config
        self.startup_timeout = startup_timeout
        self.workdir = Path(tempfile.mkdtemp(prefix="mw-mosquitto-"))
        if os.geteuid() == 0:
            # mosquitto started as root drops to the "mosquitto" user, which
            # must still be able to write its persistence database here.
            self.workdir.chmod(0o777)
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Start the broker and wait until it accepts TCP connections."""
        if self.running:
            return self
        self.config_path.write_text(
            render_config(self._base_config, self.port, self.host, self.workdir, self._extra)
        )
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [str(self.binary), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # a Ctrl-C in the test terminal is not its business
        self.starts += 1
        if not wait_for_port(
            self.host, self.port, self.startup_timeout, alive=lambda: self.running
        ):
            tail = self.log_tail()
            self._terminate(signal.SIGKILL, 2.0)
            raise BusError(f"mosquitto did not start on {self.host}:{self.port}:\n{tail}")
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (mosquitto saves its database), then SIGKILL after ``timeout``."""
        self._terminate(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without saving (fault tests)."""
        self._terminate(signal.SIGKILL, 5.0)

    def close(self) -> None:
        """Stop the broker and delete its temp dir."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, n: int = 40) -> str:
        """Last ``n`` lines of the broker's log (for failure messages)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _terminate(self, sig: signal.Signals, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"MosquittoProcess({self.host}:{self.port}, {state}, dir={self.workdir})"
