"""``mw-cli demo``: the whole system on one machine.

A broker (the local Mosquitto; when it is not installed, said plainly, the
brokerless ZeroMQ transport instead: devices connect to the verifier directly),
a verifier with SmolLM2-135M, and three heterogeneous devices generating for
several prompts at once: two llama.cpp drafters (the packaged Q4_1 GGUF and a
Q4_0 copy of it) and an n-gram drafter, or, without llama-cpp-python, a 4-bit
and a 3-bit torch copy instead.  The table shows each device's drafting speed
(DRAFT TOK/S: drafted tokens per second spent in its drafter).  It ends with a
summary table and a token-for-token comparison with the target model alone;
exit status 1 if any output differs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from middleware.broker_bridge.bus import Bus, Will
from middleware.broker_bridge.factory import make_bus
from middleware.cli.services import (
    build_engine,
    drafter_factory,
    policy_config,
    session_config,
    verifier_config,
)
from middleware.config import Config
from middleware.errors import ProtocolError
from middleware.metrics import Registry
from middleware.mosquitto import MosquittoProcess, free_port, mosquitto_available
from middleware.nodes.service import NodeConfig, NodeService, Outcome, encode_prompt, stop_ids_of
from middleware.nodes.service import offline_status_payload as device_will
from middleware.protocol import TextChunk, Topics, decode
from middleware.verifier.service import VerifierService
from middleware.verifier.service import offline_status_payload as verifier_will

PROMPTS = (
    "What is MQTT and why is it used for IoT devices?",
    "Explain speculative decoding in two sentences.",
    "Write a haiku about a Raspberry Pi.",
    "List three uses of a temperature sensor in a smart home.",
    "What is the capital of France? Answer briefly.",
    "Give one tip for saving battery on an edge device.",
    "Describe a message broker to a child.",
    "Why is TCP_NODELAY important for low latency?",
)

# Model devices draft with llama.cpp where llama-cpp-python is installed: on 1 thread it
# drafts several times faster than the torch 4-bit copy at the same or better agreement
# with the target (bench/results/drafters.json); otherwise with the torch copies.
LLAMACPP_DEVICES = (
    ("pi-q4_1", "llamacpp:smollm2"),  # the packaged Q4_1 file
    ("pi-q4_0", "llamacpp:smollm2-q4_0"),  # requantized here once, cached
    ("esp-ngram", "ngram"),
)
TORCH_DEVICES = (
    ("pi-4bit", "quant4:smollm2"),
    ("pi-3bit", "quant3:smollm2"),
    ("esp-ngram", "ngram"),
)


def llamacpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def demo_devices() -> tuple[tuple[str, str], ...]:
    return LLAMACPP_DEVICES if llamacpp_available() else TORCH_DEVICES


@dataclass
class DeviceRun:
    device_id: str
    drafter: str
    node: NodeService | None = None


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def run(cfg: Config, args: argparse.Namespace) -> int:
    if args.model:
        cfg = replace(cfg, verifier=replace(cfg.verifier, model=args.model))
    n_prompts = max(1, min(args.prompts, len(PROMPTS)))
    async with contextlib.AsyncExitStack() as stack:
        make, brokerless = await _start_broker(cfg, args, stack)
        _say("[demo] loading the target model (SmolLM2-135M-Instruct, GGUF) ...")
        t0 = time.monotonic()
        loaded, engine = await asyncio.to_thread(build_engine, cfg.verifier)
        _say(f"[demo] target loaded in {time.monotonic() - t0:.1f} s; building device drafters ...")
        devices = [DeviceRun(d, s) for d, s in demo_devices()]
        factories = {}
        for dev in devices:
            factories[dev.device_id], _ = await asyncio.to_thread(
                drafter_factory, dev.drafter, policy_config(cfg.node), base=loaded
            )
        registry = Registry()
        topics = Topics(cfg.bus.prefix)
        vbus = await stack.enter_async_context(
            make(
                "mw-demo-verifier",
                Will(
                    topics.verifier_status(cfg.verifier.id),
                    verifier_will(cfg.verifier.id),
                    retain=True,
                ),
                serve=True,
            )
        )
        verifier = VerifierService(
            vbus,
            engine,
            tokenizer_fingerprint=loaded.fingerprint,
            model_name=loaded.name,
            config=verifier_config(cfg),
            registry=registry,
        )
        scfg = replace(
            session_config(cfg.node),
            max_new_tokens=args.max_new_tokens,
            stop_ids=stop_ids_of(loaded.tokenizer),
        )
        for dev in devices:
            bus = await stack.enter_async_context(
                make(
                    f"mw-demo-{dev.device_id}",
                    Will(
                        topics.device_status(dev.device_id),
                        device_will(dev.device_id),
                        retain=True,
                        delay=2.0,
                    ),
                )
            )
            dev.node = NodeService(
                bus,
                tokenizer=loaded.tokenizer,
                tokenizer_fp=loaded.fingerprint,
                drafter_factory=factories[dev.device_id],
                drafter_name=dev.drafter,
                config=NodeConfig(device_id=dev.device_id, prefix=cfg.bus.prefix, session=scfg),
            )
        # Without a broker nothing relays one device's text to another client: the
        # progress is read where it arrives, on the verifier's bus.
        watch_bus = vbus if brokerless else await stack.enter_async_context(make("mw-demo-watch"))
        prompts = [PROMPTS[i] for i in range(n_prompts)]
        assignment = [(devices[i % len(devices)], i, p) for i, p in enumerate(prompts)]
        outcomes: dict[int, Outcome] = {}
        t_gen = time.monotonic()
        async with asyncio.TaskGroup() as tg:
            services = [tg.create_task(verifier.run(), name="verifier")]
            services += [tg.create_task(d.node.run(), name=f"node-{d.device_id}") for d in devices]  # type: ignore[union-attr]
            watcher = tg.create_task(_watch(watch_bus, topics, len(prompts)), name="progress")
            await verifier.ready.wait()
            for d in devices:
                await d.node.ready.wait()  # type: ignore[union-attr]
            _say(
                f"[demo] verifier and {len(devices)} devices online; generating {len(prompts)} "
                f"answers of up to {args.max_new_tokens} tokens ..."
            )
            tasks = {
                i: d.node.submit(p, session_id=f"demo-{i}")  # type: ignore[union-attr]
                for d, i, p in assignment
            }
            for i, task in tasks.items():
                outcomes[i] = await task
            gen_s = time.monotonic() - t_gen
            watcher.cancel()
            for s in services:
                s.cancel()
        refs = None
        if not args.no_reference:
            _say("[demo] computing the target-only reference (no speculation) ...")
            refs = await asyncio.to_thread(_references, loaded, prompts, args.max_new_tokens)
        return _report(loaded, devices, assignment, outcomes, refs, registry, gen_s)
    return 1


async def _start_broker(
    cfg: Config, args: argparse.Namespace, stack: contextlib.AsyncExitStack
) -> tuple[Callable[..., Bus], bool]:
    """A bus factory ``make(client_id, will=None, serve=False)`` and whether it is brokerless."""
    use_mosquitto = args.broker == "mosquitto" or (args.broker == "auto" and mosquitto_available())
    if use_mosquitto:
        broker = await stack.enter_async_context(MosquittoProcess())
        _say(
            f"[demo] broker: local Mosquitto on {broker.host}:{broker.port} "
            f"(config deploy/mosquitto/mosquitto.conf)"
        )
        bus_cfg = replace(cfg.bus, host=broker.host, port=broker.port)
    else:
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        _say(
            f"[demo] broker: none (Mosquitto is not installed: apt-get install -y mosquitto); "
            f"ZeroMQ instead, devices connect to the verifier at {endpoint}"
        )
        bus_cfg = replace(cfg.bus, transport="zmq", zmq_bind=endpoint, zmq_endpoints=endpoint)

    def make(client_id: str, will: Will | None = None, serve: bool = False) -> Bus:
        # Devices (a will with a delay) keep a persistent session, like in production.
        persistent = bool(will and will.delay)
        return make_bus(bus_cfg, client_id, will=will, persistent=persistent, serve=serve)

    return make, not use_mosquitto


async def _watch(bus: Bus, topics: Topics, n: int) -> None:
    """Live progress from the JSON text topics (what any IoT stack would see)."""
    counts: dict[str, int] = {}
    done: set[str] = set()
    last = 0.0
    async with bus.subscribe(topics.all_sessions("text")) as sub:
        async for msg in sub:
            try:
                c = decode(msg.payload, expect=TextChunk)
            except ProtocolError:
                continue
            counts[c.session_id] = max(counts.get(c.session_id, 0), c.pos + c.n_tokens)
            if c.final:
                done.add(c.session_id)
            now = time.monotonic()
            if now - last > 1.0 or c.final:
                last = now
                line = "  ".join(
                    f"{k}:{v}{'*' if k in done else ''}" for k, v in sorted(counts.items())
                )
                _say(f"[demo] tokens {line}   ({len(done)}/{n} done)")


def _references(loaded: Any, prompts: list[str], max_new: int) -> list[list[int]]:
    from middleware.verifier.reference import reference_greedy

    stops = stop_ids_of(loaded.tokenizer)
    return [
        list(reference_greedy(loaded.model, encode_prompt(loaded.tokenizer, p), max_new, stops))
        for p in prompts
    ]


def _report(
    loaded: Any,
    devices: list[DeviceRun],
    assignment: list[tuple[DeviceRun, int, str]],
    outcomes: dict[int, Outcome],
    refs: list[list[int]] | None,
    registry: Registry,
    gen_s: float,
) -> int:
    print()
    for dev, i, prompt in assignment:
        o = outcomes[i]
        same = (
            ""
            if refs is None
            else (
                "  [identical to target-only]"
                if list(o.tokens) == refs[i]
                else "  [DIFFERS from target-only]"
            )
        )
        print(
            f"--- {o.session_id} on {dev.device_id} ({dev.drafter}){same}\n"
            f"> {prompt}\n{o.text.strip()}\n"
        )
    snap = registry.snapshot()
    committed = snap.get("mw_verifier_committed_tokens_total", 0.0)
    forwards = snap.get("mw_verifier_forward_passes_total", 0.0)
    header = [
        "DEVICE",
        "DRAFTER",
        "SESSIONS",
        "TOKENS",
        "ACCEPT",
        "MEAN_ACC_LEN",
        "TOK/S",
        "DRAFT TOK/S",
        "IDENTICAL",
    ]
    rows = []
    all_equal = True
    for dev in devices:
        mine = [(i, outcomes[i]) for d, i, _ in assignment if d is dev]
        proposed = sum(o.stats["proposed"] for _, o in mine)
        accepted = sum(o.stats["accepted"] for _, o in mine)
        rounds = sum(o.stats["rounds"] for _, o in mine)
        tokens = sum(len(o.tokens) for _, o in mine)
        elapsed = max((o.stats["elapsed_s"] for _, o in mine), default=0.0)
        # drafting speed: tokens its drafter produced per second spent drafting
        draft_s = sum(o.stats.get("draft_s", 0.0) for _, o in mine)
        drafted = sum(o.stats.get("drafted", 0) for _, o in mine)
        if refs is None:
            ident = "not checked"
        else:
            eq = sum(list(o.tokens) == refs[i] for i, o in mine)
            all_equal &= eq == len(mine)
            ident = f"{eq}/{len(mine)}"
        rows.append(
            [
                dev.device_id,
                dev.drafter,
                str(len(mine)),
                str(tokens),
                f"{accepted / proposed:.0%}" if proposed else "-",
                f"{accepted / rounds:.2f}" if rounds else "-",
                f"{tokens / elapsed:.1f}" if elapsed else "-",
                f"{drafted / draft_s:.1f}" if draft_s else "-",
                ident,
            ]
        )
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    print(
        f"\nverifier: {forwards:.0f} forward passes for {committed:.0f} committed tokens "
        f"({forwards / committed if committed else 0:.2f} per token; "
        "target-only decoding needs 1.00), "
        f"mean batch size {snap.get('mw_verifier_batch_size_mean', 0):.2f}, "
        f"wall time {gen_s:.1f} s"
    )
    if refs is not None:
        print(
            "lossless check: "
            + (
                "every output is identical, token for token, to the target model alone"
                if all_equal
                else "SOME OUTPUTS DIFFER from the target model alone"
            )
        )
    return 0 if all_equal else 1
