"""Why the middleware drives paho directly instead of aiomqtt: QoS 1 ping-pong latency.

One echo responder (an :class:`MqttBus`) answers every ping on a local Mosquitto; the
pinger is aiomqtt 2.x as shipped (paho underneath, no ``TCP_NODELAY``), aiomqtt with
``TCP_NODELAY`` set through its private paho client, or the middleware's
:class:`MqttBus` (paho's external-loop API, ``TCP_NODELAY`` on its socket).
Each ping is a 64-byte QoS 1 publish; one round trip is its send to the echo's arrival.
Interleaved chunks (aiomqtt, MqttBus, aiomqtt...), so all see the same machine; the
figure is the ratio of medians in the same run (bench/results/mqtt_clients.json).
aiomqtt is no dependency of the project: ``pip install aiomqtt`` to run this.  A run
with any error prints no figure::

    python -m bench.mqtt_clients [-n 200] [--chunks 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import machine_info, utc_now, write_json
from middleware.broker_bridge.mqtt import MqttBus, MqttSettings
from middleware.mosquitto import MosquittoProcess

PING, PONG = "bench/ping", "bench/pong"
RESULTS = Path(__file__).resolve().parent / "results" / "mqtt_clients.json"
PAYLOAD = b"x" * 64


async def _echo(bus: MqttBus, ready: asyncio.Event) -> None:
    async with bus.subscribe(PING) as sub:
        ready.set()
        async for msg in sub:
            await bus.publish(PONG, msg.payload, qos=1)


async def _with_mqttbus(host: str, port: int, n: int) -> list[float]:
    out = []
    async with MqttBus(MqttSettings(host=host, port=port, client_id="bench-mwbus")) as bus:
        async with bus.subscribe(PONG) as sub:
            for _ in range(n):
                t0 = time.perf_counter()
                await bus.publish(PING, PAYLOAD, qos=1)
                await sub.get(10)
                out.append(time.perf_counter() - t0)
    return out


async def _with_aiomqtt(host: str, port: int, n: int, nodelay: bool = False) -> list[float]:
    import socket

    import aiomqtt

    out = []
    async with aiomqtt.Client(host, port, identifier="bench-aiomqtt") as client:
        if nodelay:  # through aiomqtt's private paho client: what a fix would need
            sock = client._client.socket()
            assert isinstance(sock, socket.socket), sock
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await client.subscribe(PONG, qos=1)
        messages = aiter(client.messages)
        for _ in range(n):
            t0 = time.perf_counter()
            await client.publish(PING, PAYLOAD, qos=1)
            async with asyncio.timeout(10):
                await anext(messages)
            out.append(time.perf_counter() - t0)
    return out


def _summary(xs: list[float]) -> dict[str, float]:
    ms = sorted(x * 1000 for x in xs)
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 3),
        "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 3),
    }


async def main(n: int, chunks: int) -> dict[str, Any]:
    with MosquittoProcess() as broker:
        echo_bus = MqttBus(MqttSettings(host=broker.host, port=broker.port, client_id="echo"))
        async with echo_bus, asyncio.TaskGroup() as tg:
            ready = asyncio.Event()
            echo = tg.create_task(_echo(echo_bus, ready))
            await ready.wait()
            res: dict[str, list[float]] = {"aiomqtt": [], "aiomqtt_nodelay": [], "mqttbus": []}
            for _ in range(chunks):
                await _with_aiomqtt(broker.host, broker.port, 10)  # warm-up
                res["aiomqtt"] += await _with_aiomqtt(broker.host, broker.port, n)
                await _with_aiomqtt(broker.host, broker.port, 10, nodelay=True)
                res["aiomqtt_nodelay"] += await _with_aiomqtt(
                    broker.host, broker.port, n, nodelay=True
                )
                await _with_mqttbus(broker.host, broker.port, 10)
                res["mqttbus"] += await _with_mqttbus(broker.host, broker.port, n)
            echo.cancel()
    a, m = _summary(res["aiomqtt"]), _summary(res["mqttbus"])
    an = _summary(res["aiomqtt_nodelay"])
    return {
        "aiomqtt": a,
        "aiomqtt_nodelay": an,
        "mqttbus": m,
        "p50_ratio_aiomqtt_over_mqttbus": round(a["p50_ms"] / m["p50_ms"], 2),
        "p50_ratio_aiomqtt_nodelay_over_mqttbus": round(an["p50_ms"] / m["p50_ms"], 2),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=200, help="round trips per chunk and client")
    ap.add_argument("--chunks", type=int, default=3)
    a = ap.parse_args()
    try:
        report = asyncio.run(main(a.n, a.chunks))
    except Exception as exc:  # no figure from a run with errors
        print(f"bench failed, no figure: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
    report |= {"when": utc_now(), "machine": machine_info(), "n": a.n, "chunks": a.chunks}
    write_json(RESULTS, report)
    print(json.dumps(report, indent=2))
