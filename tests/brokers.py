"""Mosquitto in Docker (testcontainers) for machines without the mosquitto binary.

The same interface as :class:`middleware.mosquitto.MosquittoProcess` (start, stop,
kill, restart, close, context managers), with the project's broker config; the
tests' fixtures (``tests/conftest.py``) take the binary first.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any, Self

from middleware.errors import BusError
from middleware.mosquitto import (
    _REPO_CONFIG,
    FALLBACK_CONFIG,
    Broker,
    free_port,
    render_config,
    wait_for_port,
)

DOCKER_IMAGE = "eclipse-mosquitto:2"


def docker_available() -> bool:
    """True when testcontainers is importable and the Docker engine answers a ping."""
    try:
        import docker  # optional dependency, imported only when asked
        import testcontainers.core.container  # noqa: F401
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # any failure means "no usable engine"
        return False


class MosquittoContainer(Broker):
    """Mosquitto in Docker (testcontainers) with the same interface.

    The host port is fixed at construction so ``restart()`` keeps it; the
    persistence dir is a bind mount of a host temp dir.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        image: str = DOCKER_IMAGE,
        config: Path | str | None = None,
        extra_config: str = "",
        startup_timeout: float = 30.0,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_port()
        self.image = image
        cfg = Path(config) if config is not None else _REPO_CONFIG
        self._base_config = cfg.read_text() if cfg.exists() else FALLBACK_CONFIG
        self._extra = extra_config
        self.startup_timeout = startup_timeout
        self.workdir = Path(tempfile.mkdtemp(prefix="mw-mosquitto-docker-"))
        self.workdir.chmod(0o777)  # the image runs mosquitto as uid 1883
        self._container: Any = None  # testcontainers DockerContainer once started

    def start(self) -> Self:
        from testcontainers.core.container import DockerContainer

        if self._container is not None:
            self._wrapped().start()
        else:
            # Inside the container: listen on all its interfaces, Docker maps the port.
            conf = render_config(
                self._base_config, 1883, "0.0.0.0", Path("/mosquitto/data"), self._extra
            )
            (self.workdir / "mosquitto.conf").write_text(conf)
            container = (
                DockerContainer(self.image)
                .with_bind_ports(1883, self.port)
                .with_volume_mapping(str(self.workdir), "/mosquitto/data", mode="rw")
                .with_command("mosquitto -c /mosquitto/data/mosquitto.conf")
            )
            container.start()
            self._container = container
            self.host = container.get_container_host_ip()
        if not wait_for_port(self.host, self.port, self.startup_timeout):
            raise BusError(f"mosquitto container did not open {self.host}:{self.port}")
        return self

    def _wrapped(self) -> Any:
        """The docker SDK container (stop/kill/start keep its port binding)."""
        return self._container.get_wrapped_container()

    def stop(self) -> None:
        if self._container is not None:
            self._wrapped().stop(timeout=5)

    def kill(self) -> None:
        if self._container is not None:
            self._wrapped().kill()

    def close(self) -> None:
        if self._container is not None:
            with contextlib.suppress(Exception):
                self._container.stop()
            self._container = None
        shutil.rmtree(self.workdir, ignore_errors=True)
