"""Round-trip overhead of each transport against its raw baseline, side by side in one run.

A ping-pong: client A publishes ``ping``, client B answers each with ``pong``,
A waits for it; one round trip is A's send to A's receipt.  All clients of a
case run in this process (one thread or one asyncio loop, as the middleware
runs them); the broker, or the verifier's end on ZeroMQ, is another process.

==================  ===========================================================
mqtt  raw paho      two paho clients, one thread, select() loop, QoS 1 both
                    ways (PUBACKs included), TCP_NODELAY; Mosquitto we start
mqtt  MqttBus       two MqttBus in one asyncio loop, QoS 1, same Mosquitto
zmq   raw pyzmq     a DEALER, one thread, to a minimal ROUTER echo process
zmq   ZmqBus qos1   a device's ZmqBus to a verifier's ZmqServerBus in another
                    process that answers each ping with a pong (the verifier's
                    role); every publish waits for the verifier's ack
zmq   ZmqBus qos0   the same without acks
==================  ===========================================================

Ratios are bus / raw for p50 and p99.  The ``n`` round trips of each case are
taken in ``rounds`` interleaved chunks (case 1, 2, ... 5, case 1, 2, ...; each
chunk after its own warm-up on fresh connections), so every case sees the same
share of whatever else the machine is doing.  Prints a table, writes
``bench/results/transport_overhead.json``::

    python bench/transport_overhead.py [-n 2000] [--rounds 4] [--warmup 100] [--payload 128]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import select
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import zmq
from paho.mqtt.enums import CallbackAPIVersion

from middleware.broker_bridge.bus import Bus, Subscription
from middleware.broker_bridge.mqtt import MqttBus, MqttSettings
from middleware.broker_bridge.zmq import ZmqBus, ZmqServerBus, ZmqServerSettings, ZmqSettings
from middleware.mosquitto import MosquittoProcess, free_port, wait_for_port

RESULTS = Path(__file__).resolve().parent / "results" / "transport_overhead.json"
PING, PONG = "bench/ping", "bench/pong"


# --- statistics ----------------------------------------------------------------------------------
def summary(rtts: list[float]) -> dict[str, float]:
    """p50/p99/mean in microseconds of round-trip times given in seconds."""
    us = sorted(r * 1e6 for r in rtts)
    q = statistics.quantiles(us, n=100, method="inclusive")
    return {
        "n": len(us),
        "p50_us": round(q[49], 1),
        "p99_us": round(q[98], 1),
        "mean_us": round(statistics.fmean(us), 1),
        "max_us": round(us[-1], 1),
    }


# --- raw paho ------------------------------------------------------------------------------------
def _paho_client(name: str, host: str, port: int) -> paho.Client:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=paho.MQTTv5)
    c.connect(host, port, keepalive=60)
    sock = c.socket()
    assert isinstance(sock, socket.socket)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c


def _pump(clients: list[paho.Client], timeout: float) -> None:
    """One select() over both sockets, then read/write what is ready."""
    socks = {c.socket(): c for c in clients}
    writers = [s for s, c in socks.items() if c.want_write()]
    readable, writable, _ = select.select(list(socks), writers, [], timeout)
    for s in writable:
        socks[s].loop_write()
    for s in readable:
        socks[s].loop_read()


def raw_paho(host: str, port: int, n: int, warmup: int, payload: bytes) -> list[float]:
    a, b = _paho_client("raw-a", host, port), _paho_client("raw-b", host, port)
    clients = [a, b]
    state = {"pongs": 0, "subacks": 0}
    b.on_message = lambda c, u, m: c.publish(PONG, m.payload, qos=1)
    a.on_message = lambda c, u, m: state.__setitem__("pongs", state["pongs"] + 1)
    a.on_subscribe = b.on_subscribe = lambda *args: state.__setitem__(
        "subacks", state["subacks"] + 1
    )

    def run_until(cond: Callable[[], bool], limit: float = 10.0) -> None:
        deadline = time.monotonic() + limit
        while not cond():
            if time.monotonic() > deadline:
                raise TimeoutError("raw paho stalled")
            _pump(clients, 0.5)

    run_until(lambda: a.is_connected() and b.is_connected())
    b.subscribe(PING, qos=1)
    a.subscribe(PONG, qos=1)
    run_until(lambda: state["subacks"] == 2)
    rtts: list[float] = []
    for i in range(warmup + n):
        want = state["pongs"] + 1
        t0 = time.perf_counter()
        a.publish(PING, payload, qos=1)
        run_until(lambda w=want: state["pongs"] >= w)
        if i >= warmup:
            rtts.append(time.perf_counter() - t0)
    for c in clients:
        c.disconnect()
        with contextlib.suppress(Exception):
            _pump(clients, 0.05)
    return rtts


# --- raw pyzmq -----------------------------------------------------------------------------------
def serve_echo(port: int) -> None:
    """A minimal ROUTER echo: [peer, payload] in -> [peer, payload] out."""
    router: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
    router.bind(f"tcp://127.0.0.1:{port}")
    while True:
        router.send_multipart(router.recv_multipart())


def raw_zmq(port: int, n: int, warmup: int, payload: bytes) -> list[float]:
    a: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    a.setsockopt(zmq.LINGER, 0)
    a.connect(f"tcp://127.0.0.1:{port}")
    rtts: list[float] = []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        a.send(payload)
        if not a.poll(5000):
            raise TimeoutError("no echo")
        a.recv()
        if i >= warmup:
            rtts.append(time.perf_counter() - t0)
    a.close()
    return rtts


# --- the buses -----------------------------------------------------------------------------------
async def bus_ping_pong(
    make: Callable[[str], Bus], n: int, warmup: int, payload: bytes, qos: int
) -> list[float]:
    async with make("bus-a") as a, make("bus-b") as b:
        async with b.subscribe(PING, qos=qos) as pings, a.subscribe(PONG, qos=qos) as pongs:

            async def echo() -> None:
                async for m in pings:
                    await b.publish(PONG, m.payload, qos=qos)

            echoer = asyncio.create_task(echo(), name="echo")
            try:
                return await _pings(a, pongs, n, warmup, payload, qos)
            finally:
                echoer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await echoer


async def _pings(
    a: Bus, pongs: Subscription, n: int, warmup: int, payload: bytes, qos: int
) -> list[float]:
    """Round trips: publish a ping, wait for its pong; the first ``warmup`` not counted."""
    rtts: list[float] = []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        await a.publish(PING, payload, qos=qos)
        await pongs.get(10)
        if i >= warmup:
            rtts.append(time.perf_counter() - t0)
    return rtts


async def zmq_ping_pong(port: int, n: int, warmup: int, payload: bytes, qos: int) -> list[float]:
    """A device's bus against the verifier-role echo of ``--serve-verifier``."""
    settings = ZmqSettings(endpoints=(f"tcp://127.0.0.1:{port}",), client_id="bench-device")
    async with ZmqBus(settings) as a, a.subscribe(PONG, qos=qos) as pongs:
        return await _pings(a, pongs, n, warmup, payload, qos)


def run_bus(
    make: Callable[[str], Bus], n: int, warmup: int, payload: bytes, qos: int
) -> list[float]:
    return asyncio.run(bus_ping_pong(make, n, warmup, payload, qos))


# --- helper processes ----------------------------------------------------------------------------
@contextlib.contextmanager
def child(mode: str, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """This script in ``--serve-echo``/``--serve-verifier`` mode on ``port``, stopped on exit."""
    proc = subprocess.Popen(
        [sys.executable, __file__, mode, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        if not wait_for_port("127.0.0.1", port, 15, alive=lambda: proc.poll() is None):
            raise RuntimeError(f"{mode} did not start on port {port}")
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


def _serve_verifier(port: int) -> None:
    async def serve() -> None:
        settings = ZmqServerSettings(bind=f"tcp://127.0.0.1:{port}", server_id="bench-verifier")
        async with ZmqServerBus(settings) as v, v.subscribe(PING) as pings:
            async for m in pings:
                await v.publish(PONG, m.payload, qos=m.qos)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


# --- main ----------------------------------------------------------------------------------------
def measure(n: int, rounds: int, warmup: int, payload_size: int) -> dict[str, Any]:
    payload = os.urandom(payload_size)
    chunk = -(-n // rounds)
    rtts: dict[str, list[float]] = {}
    echo_port, verifier_port = free_port(), free_port()
    with (
        MosquittoProcess() as broker,
        child("--serve-echo", echo_port),
        child("--serve-verifier", verifier_port),
    ):

        def mqtt(name: str) -> Bus:
            return MqttBus(
                MqttSettings(host=broker.host, port=broker.port, client_id=f"bench-{name}")
            )

        cases: dict[str, Callable[[int], list[float]]] = {
            "mqtt_raw_paho": lambda k: raw_paho(broker.host, broker.port, k, warmup, payload),
            "mqtt_bus": lambda k: run_bus(mqtt, k, warmup, payload, 1),
            "zmq_raw_pyzmq": lambda k: raw_zmq(echo_port, k, warmup, payload),
            "zmq_bus_qos1": lambda k: asyncio.run(
                zmq_ping_pong(verifier_port, k, warmup, payload, 1)
            ),
            "zmq_bus_qos0": lambda k: asyncio.run(
                zmq_ping_pong(verifier_port, k, warmup, payload, 0)
            ),
        }
        for r in range(rounds):
            for name, case in cases.items():
                k = min(chunk, n - r * chunk)
                if k > 0:
                    rtts.setdefault(name, []).extend(case(k))
    results = {name: summary(values) for name, values in rtts.items()}
    pairs = {
        "mqtt_bus": "mqtt_raw_paho",
        "zmq_bus_qos1": "zmq_raw_pyzmq",
        "zmq_bus_qos0": "zmq_raw_pyzmq",
    }
    ratios = {
        f"{bus}/{raw}": {
            k: round(results[bus][k] / results[raw][k], 2) for k in ("p50_us", "p99_us")
        }
        for bus, raw in pairs.items()
    }
    return {
        "benchmark": "transport_overhead",
        "round_trips": n,
        "rounds": rounds,
        "warmup_per_round": warmup,
        "payload_bytes": payload_size,
        "results": results,
        "ratios": ratios,
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "zmq": zmq.zmq_version(),
            "pyzmq": zmq.__version__,
            "paho": getattr(paho, "__version__", "?"),
        },
        "load_average": os.getloadavg(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def table(report: dict[str, Any]) -> str:
    r, x = report["results"], report["ratios"]
    rows = [
        ("mqtt", "raw paho (QoS 1)", "mqtt_raw_paho", None),
        ("mqtt", "MqttBus (QoS 1)", "mqtt_bus", "mqtt_bus/mqtt_raw_paho"),
        ("zmq", "raw pyzmq echo", "zmq_raw_pyzmq", None),
        ("zmq", "ZmqBus->verifier (QoS 1)", "zmq_bus_qos1", "zmq_bus_qos1/zmq_raw_pyzmq"),
        ("zmq", "ZmqBus->verifier (QoS 0)", "zmq_bus_qos0", "zmq_bus_qos0/zmq_raw_pyzmq"),
    ]
    load = ", ".join(f"{x:.2f}" for x in report["load_average"])
    lines = [
        f"{report['round_trips']} round trips per case in {report['rounds']} interleaved "
        f"rounds, {report['payload_bytes']} B payload, load average {load}",
        f"{'transport':<9} {'client':<24} {'p50 us':>9} {'p99 us':>9} {'x p50':>7} {'x p99':>7}",
    ]
    for transport, label, key, ratio in rows:
        rx = x[ratio] if ratio else {"p50_us": 1.0, "p99_us": 1.0}
        lines.append(
            f"{transport:<9} {label:<24} {r[key]['p50_us']:>9.1f} "
            f"{r[key]['p99_us']:>9.1f} {rx['p50_us']:>7.2f} {rx['p99_us']:>7.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--serve-echo"]:
        serve_echo(int(args[1]))
        return 0
    if args[:1] == ["--serve-verifier"]:
        _serve_verifier(int(args[1]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=2000, help="round trips per case")
    p.add_argument("--rounds", type=int, default=4, help="interleaved chunks per case")
    p.add_argument("--warmup", type=int, default=100, help="round trips before each chunk")
    p.add_argument("--payload", type=int, default=128, help="payload bytes")
    p.add_argument("--out", type=Path, default=RESULTS)
    ns = p.parse_args(args)
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    report = measure(ns.n, max(1, ns.rounds), ns.warmup, ns.payload)
    print(table(report))
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
