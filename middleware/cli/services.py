"""``mw-cli verifier`` and ``mw-cli node``: build the services from configuration and run them."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import structlog

from middleware.broker_bridge.bus import Bus, Will
from middleware.broker_bridge.factory import make_bus
from middleware.config import Config, NodeSection, VerifierSection
from middleware.errors import ConfigError
from middleware.metrics import Registry, serve_metrics
from middleware.nodes.drafters.base import Drafter
from middleware.nodes.drafters.policy import PolicyConfig
from middleware.nodes.journal import Journal
from middleware.nodes.service import SESSION_FAILURES, NodeConfig, NodeService
from middleware.nodes.service import offline_status_payload as device_will
from middleware.nodes.session import SessionConfig
from middleware.protocol import SamplingParams, Topics
from middleware.systemd import notify_ready, notify_stopping, watchdog_loop

if TYPE_CHECKING:  # the verifier stack imports torch: only `mw-cli verifier` loads it
    from middleware.verifier.acceptance import RelaxedAcceptance
    from middleware.verifier.service import VerifierConfig, VerifierService

log = structlog.get_logger("middleware.cli")

WILL_DELAY_S = 2.0
_stop = {"requested": False}  # set by SIGTERM: the only cancellation that is a clean exit


def progress(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


# --- verifier -------------------------------------------------------------------
def verifier_config(cfg: Config) -> VerifierConfig:
    from middleware.verifier.batcher import BatchConfig
    from middleware.verifier.service import VerifierConfig

    v = cfg.verifier
    return VerifierConfig(
        verifier_id=v.id,
        prefix=cfg.bus.prefix,
        max_draft=v.max_draft,
        max_sessions=v.max_sessions,
        max_sessions_per_device=v.max_sessions_per_device,
        session_idle_timeout=v.session_idle_timeout_s,
        exclusive=v.exclusive,
        batch=BatchConfig(
            policy=v.batch_policy,  # type: ignore[arg-type]
            window=(v.planned_max_wait_ms if v.batch_policy == "planned" else v.batch_window_ms)
            / 1000.0,
            max_batch=v.max_batch,
        ),
        relaxed=_relaxed(v),
        tag_key=_tag_key(v.session_key_file),
        max_prompt_tokens=v.max_prompt_tokens,
        prefill_chunk=v.prefill_chunk,
        reuse_idle_s=v.reuse_idle_s,
        state_expiry_s=v.state_expiry_s,
    )


def _tag_key(path: str) -> bytes:
    """The commit-tag key shared by a fleet's verifiers ("" = a random per-process key)."""
    if not path:
        return b""
    from pathlib import Path

    try:
        key = Path(path).expanduser().read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"[verifier] session_key_file: cannot read {path!r}: {exc}") from exc
    if len(key) < 16:
        raise ConfigError(f"[verifier] session_key_file: {path!r} holds under 16 bytes")
    return key


def _relaxed(v: VerifierSection) -> RelaxedAcceptance | None:
    if not v.relaxed_lossy:
        return None
    from middleware.verifier.acceptance import RelaxedAcceptance

    try:
        return RelaxedAcceptance(v.relaxed_ratio, v.relaxed_confidence)
    except ValueError as exc:
        raise ConfigError(f"[verifier] relaxed_*: {exc}") from exc


def build_engine(v: VerifierSection, loaded: Any = None) -> tuple[Any, Any]:
    """(LoadedModel, TargetEngine) for the configured target model."""
    from middleware.models.loading import load_causal_lm
    from middleware.verifier.engine import TargetEngine

    loaded = loaded or load_causal_lm(v.model, v.device, v.dtype, progress=progress)
    engine = TargetEngine(
        loaded.model,
        memory_budget_tokens=v.memory_budget_tokens,
        forward_overhead_tokens=v.forward_overhead_tokens,
    )
    return loaded, engine


def verifier_bus(cfg: Config) -> Bus:
    from middleware.verifier.service import offline_status_payload as verifier_will

    vid = cfg.verifier.id
    will = Will(Topics(cfg.bus.prefix).verifier_status(vid), verifier_will(vid), qos=1, retain=True)
    return make_bus(cfg.bus, f"mw-verifier-{vid}", will=will, serve=True)


async def run_verifier(cfg: Config, args: argparse.Namespace) -> int:
    from middleware.verifier.service import VerifierService, settle_heap

    stop_on_sigterm()
    config = verifier_config(cfg)  # refuse bad settings before a model load of up to a minute
    loaded, engine = await asyncio.to_thread(build_engine, cfg.verifier)
    settle_heap()  # no full garbage collection walks the model and modules while serving
    registry = Registry()
    async with verifier_bus(cfg) as bus, contextlib.AsyncExitStack() as stack:
        if cfg.verifier.metrics_port:
            port = await stack.enter_async_context(
                serve_metrics(registry, cfg.verifier.metrics_host, cfg.verifier.metrics_port)
            )
            log.info("metrics_endpoint", url=f"http://{cfg.verifier.metrics_host}:{port}/metrics")
        service = VerifierService(
            bus,
            engine,
            tokenizer_fingerprint=loaded.fingerprint,
            model_name=loaded.name,
            config=config,
            registry=registry,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                await until_done(
                    tg.create_task(service.run(), name="verifier"),
                    tg.create_task(_notify_when_ready(service.ready), name="sd-notify"),
                    tg.create_task(_verifier_discovery(bus, cfg, service), name="ha-discovery"),
                )
        finally:
            notify_stopping()
    return 0


async def until_done(*tasks: asyncio.Task[Any]) -> None:
    """Wait for a TaskGroup's ``tasks`` inside its body, never in its ``__aexit__``.

    On Python 3.11, a child that fails while the parent task already waits in
    ``__aexit__`` leaves the parent with a cancellation request TaskGroup never takes
    back (3.12 fixed it); the next await that checks ``cancelling()`` (the bus's close)
    then turned the crash into a CancelledError, and ``mw-cli`` exited 0 with no log line,
    so systemd's ``Restart=on-failure`` never restarted the service.  Waiting in the body,
    the parent is cancelled there and TaskGroup takes the request back as it should."""
    await asyncio.wait(tasks)


async def _verifier_discovery(bus: Bus, cfg: Config, service: VerifierService) -> None:
    """Retained Home Assistant discovery configs for this verifier, once it is ready."""
    from middleware.protocol.homeassistant import verifier_configs

    await service.ready.wait()
    t = Topics(cfg.bus.prefix)
    for topic, payload in verifier_configs(t, cfg.verifier.id, service.model_name):
        await bus.publish(topic, payload, qos=1, retain=True, content_type="application/json")


async def _notify_when_ready(ready: asyncio.Event) -> None:
    """Under systemd (Type=notify): READY=1 once connected and subscribed, then watchdog
    pings from this event loop (a stalled loop stops them and systemd restarts us)."""
    await ready.wait()
    notify_ready()
    await watchdog_loop()


def stop_on_sigterm() -> None:
    """``systemctl stop`` cancels the main task, so buses close cleanly (no last will)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    if task is not None:

        def stop() -> None:
            _stop["requested"] = True
            task.cancel()

        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, stop)


def stop_requested() -> bool:
    """Whether SIGTERM asked us to stop (a CancelledError is then a clean exit)."""
    return _stop["requested"]


# --- node -------------------------------------------------------------------------
def session_config(n: NodeSection) -> SessionConfig:
    return SessionConfig(
        max_new_tokens=n.max_new_tokens,
        max_failures=n.max_failures,
        offline_enabled=n.offline,
        sampling=SamplingParams(
            mode=n.mode,  # type: ignore[arg-type]  # checked by one_of(MODES) in config
            seed=n.seed,
            temperature=n.temperature,
            top_k=n.top_k,
            top_p=n.top_p,
        ),
    )


def policy_config(n: NodeSection) -> PolicyConfig:
    return PolicyConfig(
        threshold=n.threshold,
        min_len=n.min_draft,
        max_len=n.max_draft,
        max_len_cap=max(16, n.max_draft),
    )


def drafter_factory(
    spec: str, policy: PolicyConfig, *, base: Any = None, models: dict[str, Any] | None = None
) -> tuple[Callable[[], Drafter], Any]:
    """A factory of per-session drafters sharing one (maybe quantized) model; the tokenizer."""
    from middleware.nodes.drafters import DrafterSpec, make_drafter

    ds = DrafterSpec.parse(spec, policy)
    if ds.kind == "ngram":
        return (lambda: make_drafter(ds)), None
    if ds.kind == "llamacpp":  # one llama.cpp context per session; the weights are mmapped
        make_drafter(ds)  # load once now: a bad path fails at start-up, not per session
        return (lambda: make_drafter(ds)), None
    from middleware.models.loading import load_causal_lm
    from middleware.nodes.drafters.hf import HFDrafter
    from middleware.nodes.drafters.policy import DraftPolicy

    models = {} if models is None else models
    loaded = base or models.get(ds.model) or load_causal_lm(ds.model, progress=progress)
    models[ds.model] = loaded
    model = loaded.model
    if ds.kind == "quant":
        from middleware.nodes.drafters.quantized import quantize_model

        model = quantize_model(
            loaded.model, ds.bits, ds.group_size, symmetric=ds.symmetric, embeddings=ds.embeddings
        )
    label = str(ds)
    return (
        lambda: HFDrafter(model, loaded.tokenizer, DraftPolicy(ds.policy), name=label)
    ), loaded.tokenizer


def load_tokenizer(spec: str) -> tuple[Any, str]:
    from middleware.models.loading import load_tokenizer as _load

    return _load(spec)


def node_bus(cfg: Config) -> Bus:
    did = cfg.node.id
    will = Will(
        Topics(cfg.bus.prefix).device_status(did),
        device_will(did),
        qos=1,
        retain=True,
        delay=WILL_DELAY_S,
    )
    return make_bus(cfg.bus, f"mw-node-{did}", will=will, persistent=True, device_id=did)


def journal_file(n: NodeSection, env: dict[str, str] | None = None) -> str:
    """The journal's path: ``[node] journal``; ``auto`` is systemd's state directory
    (``$STATE_DIRECTORY``, from ``StateDirectory=``) or off when there is none."""
    if n.journal != "auto":
        return n.journal
    state = (os.environ if env is None else env).get("STATE_DIRECTORY", "").split(":")[0]
    return os.path.join(state, f"journal-{n.id}.sqlite") if state else ""


def open_journal(n: NodeSection) -> Journal:
    path = journal_file(n)
    try:
        journal = Journal(path)
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError(f"[node] journal: cannot open {path!r}: {exc}") from None
    log.info("journal", path=path or ":memory:", unfinished=len(journal.unfinished()))
    return journal


async def run_node(cfg: Config, args: argparse.Namespace) -> int:
    stop_on_sigterm()
    n = cfg.node
    node_cfg = NodeConfig(  # settings first: refused before any model or tokenizer loads
        device_id=n.id,
        prefix=cfg.bus.prefix,
        max_concurrent=n.max_concurrent,
        session=session_config(n),
        retained_expiry=cfg.bus.retained_expiry_s,
    )
    policy = policy_config(n)
    journal = open_journal(n)  # a bad path is refused before a model loads
    factory, _ = await asyncio.to_thread(drafter_factory, n.drafter, policy)
    tokenizer, fp = await asyncio.to_thread(load_tokenizer, n.tokenizer)
    bus = node_bus(cfg)
    node = NodeService(
        bus,
        tokenizer=tokenizer,
        tokenizer_fp=fp,
        drafter_factory=factory,
        drafter_name=n.drafter,
        config=node_cfg,
        journal=journal,
    )
    # Before connecting: the persistent session's queued prompts arrive right after CONNACK.
    await node.subscribe_inbox()
    async with bus, contextlib.AsyncExitStack() as stack:
        stack.callback(journal.close)
        failed = 0
        if n.metrics_port:
            port = await stack.enter_async_context(
                serve_metrics(node.metrics.registry, n.metrics_host, n.metrics_port)
            )
            log.info("metrics_endpoint", url=f"http://{n.metrics_host}:{port}/metrics")
        async with asyncio.TaskGroup() as tg:
            runner = tg.create_task(node.run(), name="node")
            notifier = tg.create_task(_notify_when_ready(node.ready), name="sd-notify")
            await node.ready.wait()
            if args.prompt:
                outs = await asyncio.gather(
                    *(node.submit(p) for p in args.prompt), return_exceptions=True
                )
                for o in outs:
                    if isinstance(o, SESSION_FAILURES):  # logged, failed result published
                        print(f"mw-cli: session failed: {o}", file=sys.stderr)
                        failed += 1
                        continue
                    if isinstance(o, BaseException):
                        raise o
                    print(o.text)
                    print(
                        f"-- {o.session_id}: {len(o.tokens)} tokens, acceptance "
                        f"{o.stats['acceptance_rate']:.0%}, {o.stats['tokens_per_s']:.1f} tok/s",
                        file=sys.stderr,
                    )
                if not args.serve:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(node.flush(), 5.0)
                    runner.cancel()
                    notifier.cancel()
            await until_done(runner, notifier)
    notify_stopping()
    return 1 if failed else 0  # only without --serve: a served node stops by signal


# --- MQTT <-> ZeroMQ bridge ---------------------------------------------------------
async def run_bridge(cfg: Config, args: argparse.Namespace) -> int:
    from middleware.broker_bridge.bridge import Bridge

    stop_on_sigterm()
    mqtt_cfg = replace(cfg.bus, transport="mqtt")
    zmq_cfg = replace(cfg.bus, transport="zmq")
    bridge_id = f"bridge-{cfg.bus.host}-{cfg.bus.port}".replace(".", "-").replace(":", "-")
    ready = asyncio.Event()
    async with (
        make_bus(mqtt_cfg, f"mw-{bridge_id}") as m,
        make_bus(zmq_cfg, f"mw-{bridge_id}") as z,
    ):
        async with Bridge(m, z, prefix=cfg.bus.prefix, bridge_id=bridge_id):
            log.info(
                "bridge_ready",
                mqtt=f"{cfg.bus.host}:{cfg.bus.port}",
                zmq=cfg.bus.zmq_endpoints,
                prefix=cfg.bus.prefix,
            )
            ready.set()
            try:
                await _notify_when_ready(ready)
                await asyncio.Event().wait()  # until cancelled (SIGTERM, Ctrl-C)
            finally:
                notify_stopping()
    return 0
