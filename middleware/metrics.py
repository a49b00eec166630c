"""A small, dependency-free metrics registry with Prometheus text exposition.

Counters, gauges and summaries (count, sum, and p50/p95/p99 over a bounded
window) with optional labels.  ``serve_metrics`` exposes ``/metrics`` over
HTTP with asyncio; ``Registry.snapshot()`` gives plain numbers for status
messages and the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v).replace(chr(34), "")}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


class Counter:
    """Monotonic counter, optionally labelled."""

    def __init__(self, name: str, help_: str) -> None:
        self.name, self.help = name, help_
        self.values: dict[tuple[tuple[str, str], ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0.0)

    def total(self) -> float:
        return sum(self.values.values())

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        out += [f"{self.name}{_labels(dict(k))} {v}" for k, v in self.values.items()]
        return out


class Gauge(Counter):
    """A value that goes up and down."""

    def set(self, value: float, **labels: str) -> None:
        self.values[tuple(sorted(labels.items()))] = float(value)

    def render(self) -> list[str]:
        out = super().render()
        out[1] = f"# TYPE {self.name} gauge"
        return out


class Summary:
    """Count, sum and quantiles over the last ``window`` observations."""

    def __init__(self, name: str, help_: str, window: int = 2048) -> None:
        self.name, self.help = name, help_
        self.count = 0
        self.sum = 0.0
        self._recent: deque[float] = deque(maxlen=window)

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        self._recent.append(value)

    def quantile(self, q: float) -> float:
        if not self._recent:
            return 0.0
        data = sorted(self._recent)
        return data[round(q * (len(data) - 1))]

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else 0.0

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} summary"]
        for q in (0.5, 0.95, 0.99):
            out.append(f'{self.name}{{quantile="{q}"}} {self.quantile(q)}')
        out += [f"{self.name}_sum {self.sum}", f"{self.name}_count {self.count}"]
        return out


class Registry:
    """Holds named metrics; renders them for Prometheus."""

    def __init__(self) -> None:
        self._metrics: dict[str, Counter | Summary] = {}

    def counter(self, name: str, help_: str) -> Counter:
        return self._metrics.setdefault(name, Counter(name, help_))  # type: ignore[return-value]

    def gauge(self, name: str, help_: str) -> Gauge:
        return self._metrics.setdefault(name, Gauge(name, help_))  # type: ignore[return-value]

    def summary(self, name: str, help_: str) -> Summary:
        return self._metrics.setdefault(name, Summary(name, help_))  # type: ignore[return-value]

    def render(self) -> str:
        lines: list[str] = []
        for m in self._metrics.values():
            lines += m.render()
        return "\n".join(lines) + "\n"

    def snapshot(self) -> dict[str, float]:
        """Flat numbers (counter totals, gauge values, summary means) for status messages."""
        out: dict[str, float] = {}
        for name, m in self._metrics.items():
            if isinstance(m, Summary):
                out[name + "_mean"] = m.mean
                out[name + "_count"] = float(m.count)
            elif isinstance(m, Gauge):
                out[name] = m.total()
            else:
                out[name] = m.total()
        return out


@contextlib.asynccontextmanager
async def serve_metrics(
    registry: Registry, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[int]:
    """Serve ``GET /metrics``; yields the bound port.  Closed on exit."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b"/"
            if path.startswith(b"/metrics"):
                body, status = registry.render().encode(), b"200 OK"
            else:
                body, status = b"not found\n", b"404 Not Found"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain; version=0.0.4\r\n"
                b"Content-Length: "
                + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + body
            )
            await writer.drain()
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            ConnectionError,
            asyncio.LimitOverrunError,
        ):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()
