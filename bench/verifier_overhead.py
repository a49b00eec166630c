"""What the middleware costs per verify round, and how many drafts a verifier sustains.

Two measurements with a no-op target (``bench/noop_engine.py``: accepts every
draft, no model), so what remains is the middleware: codecs, topics, the
MQTT bus, the verifier service (triage, batcher, state and verdict
publishing) and the device link.  Not the worker-thread hop of a model engine:
the no-op engine runs on the event loop (``blocking = False``; the hop costs
about 160 us per round here).

``rtt`` (issue #9 a)
    One device session (``MqttBus`` + ``BusLink``, the node's own link) sends
    a 4-token draft, the ``VerifierService`` verifies and answers; one round
    trip is the draft's send to the verdict's arrival.  Side by side, a raw
    paho QoS 1 ping-pong (two paho clients, one thread, TCP_NODELAY) over the
    same Mosquitto.  Interleaved chunks, each after its own warm-up, so both
    see the same machine.  Targets: p50 <= 1.5x raw, p99 <= 2x raw.
    The middleware round carries more than the raw ping-pong: the draft and
    verdict are real encoded protocol messages with MQTT 5 properties, and the
    verifier publishes the retained session state when a session opens and at
    most every ``state_interval`` (1 s) while it runs.

``throughput`` (issue #9 d)
    A load process (raw paho, so the load generator is not the bottleneck)
    keeps ``--sessions`` sessions busy, one draft outstanding each (the
    protocol's rule), and the verifier (this process) answers.  Measured: drafts
    verified per second at the verifier (its own counters) over ``--seconds``.
    Baseline in the same run: the same load against a raw paho echo responder
    that answers each draft with a verdict-sized message (the broker and
    client ceiling on this machine).  Target: >= 5000 drafts/s over MQTT.

Both baselines run paho as shipped (:func:`shipped_paho`): the bus's faster decoding
of received packets would otherwise speed them up too.

Prints a table, writes ``bench/results/verifier_overhead.json`` and a PNG::

    python -m bench.verifier_overhead [-n 2000] [--rounds 4] [--sessions 128] [--seconds 8]
    python -m bench.verifier_overhead --quick       # a smoke run, seconds
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt import _packet
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bench.common import machine_info
from bench.noop_engine import NoopEngine
from bench.transport_overhead import raw_paho, summary
from middleware.broker_bridge.mqtt import MqttBus, MqttSettings
from middleware.logs import configure_logging
from middleware.metrics import Registry
from middleware.mosquitto import MosquittoProcess
from middleware.nodes.link import BusLink
from middleware.protocol import Draft, OpenSession, Topics, Verdict, decode
from middleware.verifier.batcher import BatchConfig
from middleware.verifier.service import VerifierConfig, VerifierService, settle_heap

RESULTS = Path(__file__).resolve().parent / "results"
PREFIX = "bench/v1"
DEVICE = "bench-dev"
DRAFT_LEN = 4
PROMPT = (1, 2, 3)
MAX_NEW = 4000  # tokens per session before it is rotated
# The verifier admits at most 64 sessions per device; the load spreads its sessions over devices
# of 32 each so that none is refused (a refusal fails the run instead of skewing the figure).
SESSIONS_PER_DEVICE = 32


def _device_of(i: int) -> str:
    return f"{DEVICE}-{i // SESSIONS_PER_DEVICE}"


def _fast_paho(name: str, port: int) -> paho.Client:
    """A paho client for the load side: many QoS 1 messages in flight, TCP_NODELAY."""
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=paho.MQTTv5)
    c.max_inflight_messages_set(100)  # the broker's Receive Maximum (max_inflight_messages)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port, keepalive=60)
    sock = c.socket()
    assert isinstance(sock, socket.socket)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c


@contextlib.contextmanager
def shipped_paho() -> Iterator[None]:
    """The raw baselines run paho as shipped: importing the bus gives every paho client of
    the process its faster decoding of received packets (``ReceivedProperties``,
    ``ReceivedReasonCode`` in broker_bridge/mqtt.py), which the baselines must not get."""
    saved = _packet.Properties, _packet.ReasonCode
    _packet.Properties, _packet.ReasonCode = Properties, ReasonCode  # type: ignore[misc]
    try:
        yield
    finally:
        _packet.Properties, _packet.ReasonCode = saved  # type: ignore[misc]


def _settings(port: int, name: str) -> MqttSettings:
    return MqttSettings(port=port, client_id=name, keepalive=60)


def _verifier(bus: MqttBus, max_batch: int = 64) -> VerifierService:
    return VerifierService(
        bus,
        NoopEngine(),
        tokenizer_fingerprint="noop",  # type: ignore[arg-type]
        config=VerifierConfig(
            verifier_id="bench-v",
            prefix=PREFIX,
            batch=BatchConfig(max_batch=max_batch),
            status_interval=3600,
        ),
        registry=Registry(),
    )


# --- rtt ---------------------------------------------------------------------------------------
async def _middleware_rtts(port: int, n: int, warmup: int, tag: str) -> list[float]:
    """Round trips of ``n`` verify rounds through device link -> broker -> verifier -> back."""
    topics = Topics(PREFIX)
    async with (
        MqttBus(_settings(port, f"bv-{tag}")) as vbus,
        MqttBus(_settings(port, f"bd-{tag}")) as dbus,
        asyncio.TaskGroup() as tg,
    ):
        verifier = _verifier(vbus)
        link = BusLink(dbus, topics, DEVICE)
        vtask = tg.create_task(verifier.run())
        ready = asyncio.Event()
        ltask = tg.create_task(link.run(ready))
        await verifier.ready.wait()
        await ready.wait()
        rtts: list[float] = []
        sid, base, seq, epoch = "", 0, 0, 1
        for i in range(warmup + n):
            if not sid or base + DRAFT_LEN + 1 > MAX_NEW:
                sid, base, seq = f"rtt-{tag}-{i}", 0, 0
                await link.attach(sid)
                await link.send(
                    OpenSession(
                        session_id=sid,
                        device_id=DEVICE,
                        epoch=epoch,
                        seq=0,
                        tokenizer="noop",
                        prompt=PROMPT,
                        max_new_tokens=MAX_NEW,
                    )
                )
                v = await link.next_verdict(sid, 10)
                assert isinstance(v, Verdict) and v.kind == "opened", v
            seq += 1
            draft = Draft(
                sid, epoch, seq, base, tuple((base + j) % 60 + 1 for j in range(DRAFT_LEN))
            )
            t0 = time.perf_counter()
            await link.send(draft)
            v = await link.next_verdict(sid, 10)
            elapsed = time.perf_counter() - t0
            if not isinstance(v, Verdict) or v.kind != "accept" or v.seq != seq:
                raise RuntimeError(f"unexpected answer {v!r}")
            base = v.committed_len
            if i >= warmup:
                rtts.append(elapsed)
        vtask.cancel()
        ltask.cancel()
    return rtts


def measure_rtt(port: int, n: int, rounds: int, warmup: int) -> dict[str, Any]:
    chunk = -(-n // rounds)
    raw: list[float] = []
    mw: list[float] = []
    payload = os.urandom(64)
    for r in range(rounds):
        with shipped_paho():
            raw += raw_paho("127.0.0.1", port, chunk, warmup, payload)
        mw += asyncio.run(_middleware_rtts(port, chunk, warmup, str(r)))
    s_raw, s_mw = summary(raw), summary(mw)
    return {
        "raw_paho_qos1": s_raw,
        "middleware_round": s_mw,
        "ratio_p50": round(s_mw["p50_us"] / s_raw["p50_us"], 2),
        "ratio_p99": round(s_mw["p99_us"] / s_raw["p99_us"], 2),
        "target": {"ratio_p50": 1.5, "ratio_p99": 2.0},
    }


# --- throughput ------------------------------------------------------------------------------
def load_main(port: int, sessions: int, seconds: float, mode: str) -> None:
    """The load process: ``sessions`` closed loops of drafts; prints one JSON line of counts.

    ``mode`` "verifier": real protocol against the VerifierService.  "echo": the same drafts to
    a raw responder that answers each on the verdict topic (no protocol state).
    """
    topics = Topics(PREFIX)
    c = _fast_paho(f"load-{mode}", port)
    lock = threading.Lock()
    state: dict[str, list[int]] = {}  # sid -> [epoch, seq, base, gen]
    device: dict[str, str] = {}  # sid -> device id
    counts = {"verdicts": 0, "opens": 0, "unexpected": 0}
    started = threading.Event()
    stop_at = [float("inf")]

    def send_open(sid: str) -> None:
        state[sid] = [1, 0, 0, state.get(sid, [0, 0, 0, 0])[3]]
        c.publish(
            topics.session(device[sid], sid, "open"),
            OpenSession(
                session_id=sid,
                device_id=device[sid],
                epoch=1,
                seq=0,
                tokenizer="noop",
                prompt=PROMPT,
                max_new_tokens=MAX_NEW,
            ).encode(),
            qos=1,
        )

    def send_draft(sid: str) -> None:
        st = state[sid]
        st[1] += 1
        draft = Draft(
            sid, st[0], st[1], st[2], tuple((st[2] + j) % 60 + 1 for j in range(DRAFT_LEN))
        )
        c.publish(topics.session(device[sid], sid, "draft"), draft.encode(), qos=1)

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        if time.monotonic() > stop_at[0]:
            return
        with lock:
            if mode == "echo":
                sid = msg.topic.split("/")[-2]
                counts["verdicts"] += 1
                st = state[sid]
                st[2] += DRAFT_LEN + 1
                send_draft(sid)
                return
            v = decode(msg.payload, expect=Verdict)
            st = state.get(v.session_id)
            if st is None:
                counts["unexpected"] += 1
                return
            if v.kind == "opened":
                counts["opens"] += 1
                send_draft(v.session_id)
            elif v.kind == "accept" and v.seq == st[1]:
                counts["verdicts"] += 1
                st[2] = v.committed_len
                if v.done or st[2] + DRAFT_LEN + 1 > MAX_NEW:
                    send_open(v.session_id)  # the session is used up: reopen (epoch 1 again)
                else:
                    send_draft(v.session_id)
            else:
                counts["unexpected"] += 1

    def on_subscribe(*args: Any) -> None:
        started.set()

    c.on_message = on_message
    c.on_subscribe = on_subscribe
    c.subscribe(topics.all_sessions("verdict"), qos=1)
    c.loop_start()
    if not started.wait(10):
        raise SystemExit("load: no SUBACK")
    t0 = time.monotonic()
    stop_at[0] = t0 + seconds
    with lock:
        for i in range(sessions):
            sid = f"load-{os.getpid()}-{i}"
            device[sid] = _device_of(i)
            if mode == "echo":
                state[sid] = [1, 0, 0, 0]
                send_draft(sid)
            else:
                send_open(sid)
    time.sleep(seconds)
    with lock:
        n = counts["verdicts"]
    c.loop_stop()
    print(json.dumps({**counts, "verdicts": n, "seconds": seconds}), flush=True)


def _echo_responder(port: int, stop: threading.Event) -> threading.Thread:
    """Answers every draft with a verdict-sized message on the verdict topic (raw paho)."""
    topics = Topics(PREFIX)
    reply = Verdict(
        session_id="x" * 12,
        epoch=1,
        seq=1,
        kind="accept",
        base=0,
        accepted=4,
        tokens=(1, 2, 3, 4, 5),
        committed_len=5,
        verifier_id="bench-v",
    ).encode()
    c = _fast_paho("echo", port)

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        parts = msg.topic.split("/")
        client.publish(topics.session(parts[-3], parts[-2], "verdict"), reply, qos=1)

    c.on_message = on_message
    c.subscribe(topics.all_sessions("draft"), qos=1)

    def loop() -> None:
        while not stop.is_set():
            c.loop(0.1)
        c.disconnect()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


def _run_load(port: int, sessions: int, seconds: float, mode: str) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.verifier_overhead",
            "--load",
            mode,
            "--port",
            str(port),
            "--sessions",
            str(sessions),
            "--seconds",
            str(seconds),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        cwd=Path(__file__).resolve().parents[1],
    )
    if out.returncode != 0:
        raise RuntimeError(f"load process failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


async def _verifier_under_load(
    port: int, sessions: int, seconds: float, max_batch: int
) -> dict[str, Any]:
    async with MqttBus(
        MqttSettings(
            port=port, client_id="bench-v", keepalive=60, max_inflight=100, max_queued=100_000
        )
    ) as bus:
        verifier = _verifier(bus, max_batch)
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(verifier.run())
            await verifier.ready.wait()
            load = await asyncio.to_thread(_run_load, port, sessions, seconds, "verifier")
            task.cancel()
    m = verifier.metrics
    batches = m.forwards.get()
    if load["unexpected"] or m.rejected.total() or load["opens"] < sessions:
        # A refusal, rejection or stray answer means the load was not what the figure claims.
        raise RuntimeError(
            f"invalid throughput run: {load['unexpected']} unexpected answers, "
            f"{m.rejected.total()} rejected messages, {load['opens']}/{sessions} sessions opened"
        )
    return {
        "load": load,
        "rounds": m.rounds.get(),
        "forwards": batches,
        "mean_batch": round(m.rounds.get() / batches, 2) if batches else 0.0,
        "rejected": m.rejected.total(),
    }


def measure_throughput(
    port: int, sessions: int, seconds: float, repeats: int, max_batch: int
) -> dict[str, Any]:
    echo_rates, mw_rates, details = [], [], []
    for _ in range(repeats):
        stop = threading.Event()
        with shipped_paho():
            t = _echo_responder(port, stop)
            try:
                echo = _run_load(port, sessions, seconds, "echo")
            finally:
                stop.set()
                t.join(5)
        echo_rates.append(echo["verdicts"] / seconds)
        mw = asyncio.run(_verifier_under_load(port, sessions, seconds, max_batch))
        mw_rates.append(mw["load"]["verdicts"] / seconds)
        details.append(mw)
    return {
        "sessions": sessions,
        "seconds": seconds,
        "repeats": repeats,
        "draft_len": DRAFT_LEN,
        "max_batch": max_batch,
        "echo_drafts_per_s": round(statistics.median(echo_rates)),
        "verifier_drafts_per_s": round(statistics.median(mw_rates)),
        "ratio": round(statistics.median(mw_rates) / statistics.median(echo_rates), 2),
        "target_drafts_per_s": 5000,
        "runs": details,
        "echo_runs": [round(r) for r in echo_rates],
        "verifier_runs": [round(r) for r in mw_rates],
    }


# --- report ----------------------------------------------------------------------------------
def table(report: dict[str, Any]) -> str:
    lines = []
    if "rtt" in report:
        r = report["rtt"]
        lines.append("verify-round round trip (us)      p50       p99     mean")
        for name in ("raw_paho_qos1", "middleware_round"):
            s = r[name]
            lines.append(f"  {name:<28} {s['p50_us']:>8} {s['p99_us']:>9} {s['mean_us']:>8}")
        lines.append(
            f"  ratio p50 {r['ratio_p50']} (target <= 1.5), p99 {r['ratio_p99']} (target <= 2.0)"
        )
    if "throughput" in report:
        t = report["throughput"]
        lines.append(
            f"drafts per second, {t['sessions']} sessions, {t['seconds']} s x {t['repeats']}"
        )
        lines.append(f"  raw echo responder            {t['echo_drafts_per_s']:>8}")
        lines.append(
            f"  verifier service (no-op)      {t['verifier_drafts_per_s']:>8}   "
            f"ratio {t['ratio']}, target >= 5000"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if "rtt" in report:
        r = report["rtt"]
        names = ["raw paho QoS 1", "middleware round"]
        p50 = [r["raw_paho_qos1"]["p50_us"], r["middleware_round"]["p50_us"]]
        p99 = [r["raw_paho_qos1"]["p99_us"], r["middleware_round"]["p99_us"]]
        x = range(2)
        axes[0].bar([i - 0.2 for i in x], p50, 0.4, label="p50")
        axes[0].bar([i + 0.2 for i in x], p99, 0.4, label="p99")
        axes[0].set_xticks(list(x), names)
        axes[0].set_ylabel("round trip (us)")
        axes[0].set_title(f"per round: p50 x{r['ratio_p50']}, p99 x{r['ratio_p99']}")
        axes[0].legend()
    if "throughput" in report:
        t = report["throughput"]
        axes[1].bar(
            ["raw echo", "verifier (no-op)"], [t["echo_drafts_per_s"], t["verifier_drafts_per_s"]]
        )
        axes[1].axhline(5000, color="red", linestyle="--", label="target 5000/s")
        axes[1].set_ylabel("drafts per second")
        axes[1].set_title(f"{t['sessions']} sessions over MQTT")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=2000, help="verify rounds per side (rtt)")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved chunks (rtt)")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--sessions", type=int, default=128, help="concurrent sessions (throughput)")
    ap.add_argument("--seconds", type=float, default=8.0, help="per throughput run")
    ap.add_argument("--repeats", type=int, default=3, help="throughput runs per side")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--only", choices=("rtt", "throughput"))
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--load", choices=("verifier", "echo"), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.load:
        load_main(args.port, args.sessions, args.seconds, args.load)
        return 0
    if args.quick:
        args.n, args.rounds, args.warmup, args.seconds, args.repeats = 200, 2, 20, 2.0, 1
        args.sessions = min(args.sessions, 32)
    configure_logging(level="warning")
    settle_heap()  # as ``mw-cli verifier`` does once its model is loaded
    report: dict[str, Any] = {"machine": machine_info(), "quick": args.quick}
    with MosquittoProcess() as broker:
        if args.only in (None, "rtt"):
            report["rtt"] = measure_rtt(broker.port, args.n, args.rounds, args.warmup)
        if args.only in (None, "throughput"):
            report["throughput"] = measure_throughput(
                broker.port, args.sessions, args.seconds, args.repeats, args.max_batch
            )
    print(table(report))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "verifier_overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    with contextlib.suppress(ImportError):
        plot(report, args.out / "verifier_overhead.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
