"""Debugging tools: ``tail``, ``sessions``, ``stats``, ``generate``."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from typing import Any

import structlog

from middleware.broker_bridge.bus import CONTENT_JSON, Bus
from middleware.broker_bridge.factory import make_bus
from middleware.cli.render import describe, human_line
from middleware.config import Config
from middleware.errors import ProtocolError
from middleware.protocol import (
    DeviceStatus,
    PromptRequest,
    Result,
    SessionState,
    TextChunk,
    Topics,
    VerifierStatus,
    decode,
)


def tool_bus(cfg: Config, role: str) -> Bus:
    return make_bus(cfg.bus, f"mw-{role}-{uuid.uuid4().hex[:8]}")


def _colour() -> bool:
    """ANSI colours only on a terminal, and never with NO_COLOR set (https://no-color.org)."""
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ


def _print(line: str) -> None:
    try:
        print(line, flush=True)
    except BrokenPipeError:  # `mw-cli tail | head`
        sys.exit(0)


async def tail(cfg: Config, args: argparse.Namespace) -> int:
    topics = Topics(cfg.bus.prefix)
    filter_ = topics.subtree(args.spec)
    tokenizer = None
    if args.tokenizer:
        from middleware.models.loading import load_tokenizer

        tokenizer, _ = await asyncio.to_thread(load_tokenizer, args.tokenizer)
    types = {t for arg in args.type for t in arg.split(",") if t}
    seen = 0
    deadline = time.monotonic() + args.timeout if args.timeout else None
    async with tool_bus(cfg, "tail") as bus, bus.subscribe(filter_) as sub:
        if sys.stderr.isatty():
            print(f"# tail {filter_} on {cfg.bus.host}:{cfg.bus.port}", file=sys.stderr, flush=True)
        else:  # every stderr line is JSON off a terminal
            structlog.get_logger("mw.cli").info("tail_subscribed", filter=filter_)
        while args.count is None or seen < args.count:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            try:
                msg = await sub.get(remaining)
            except TimeoutError:
                break
            d = describe(msg, tokenizer, wire=bool(args.json))
            if types and d["type"] not in types:
                continue
            seen += 1
            if args.raw:
                try:
                    body = msg.payload.decode("utf-8")
                except UnicodeDecodeError:
                    body = msg.payload.hex()
                _print(f"{msg.topic} {body}")
            elif args.json:
                _print(json.dumps(d, ensure_ascii=False))
            else:
                _print(human_line(d))
    return 0


async def _collect_retained(cfg: Config, filters: list[str], wait: float) -> list[Any]:
    """Retained messages on every filter, read concurrently for ``wait`` seconds.

    One reader per filter: reading them one after another spent the whole wait on the first
    filter (``stats`` never listed devices).  Keyed by topic, so a status seen twice (retained
    copy, then a live update) is listed once, latest first wins."""
    by_topic: dict[str, Any] = {}
    async with tool_bus(cfg, "query") as bus:
        subs = [await bus.subscribe(f) for f in filters]
        deadline = time.monotonic() + wait

        async def drain(sub: Any) -> None:
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    msg = await sub.get(remaining)
                except TimeoutError:
                    break
                if not msg.payload:  # a cleared retained topic (decommissioned)
                    by_topic.pop(msg.topic, None)
                    continue
                try:
                    by_topic[msg.topic] = decode(msg.payload)
                except ProtocolError:
                    continue

        async with asyncio.TaskGroup() as tg:
            for sub in subs:
                tg.create_task(drain(sub))
    return list(by_topic.values())


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


async def sessions(cfg: Config, args: argparse.Namespace) -> int:
    t = Topics(cfg.bus.prefix)
    states = [
        s
        for s in await _collect_retained(cfg, [t.all_sessions("state")], args.wait)
        if isinstance(s, SessionState)
    ]
    if args.json:
        for s in states:
            _print(
                json.dumps(
                    {
                        "session": s.session_id,
                        "device": s.device_id,
                        "status": s.status,
                        "owner": s.owner,
                        "epoch": s.epoch,
                        "committed": len(s.committed),
                        "finish_reason": s.finish_reason,
                        "updated_at": s.updated_at,
                    }
                )
            )
        return 0
    rows = [
        [
            s.session_id,
            s.device_id,
            s.status,
            s.owner,
            str(s.epoch),
            str(len(s.committed)),
            s.finish_reason or "-",
            time.strftime("%H:%M:%S", time.localtime(s.updated_at)),
        ]
        for s in sorted(states, key=lambda s: -s.updated_at)
    ]
    _print(
        _table(
            rows, ["SESSION", "DEVICE", "STATUS", "OWNER", "EPOCH", "TOKENS", "FINISH", "UPDATED"]
        )
    )
    return 0


async def stats(cfg: Config, args: argparse.Namespace) -> int:
    t = Topics(cfg.bus.prefix)
    found = await _collect_retained(
        cfg, [t.all_verifier_status(), t.all_device_status()], args.wait
    )
    if args.json:
        for s in found:
            _print(
                json.dumps(
                    {
                        "type": s.TYPE,
                        **{k: getattr(s, k) for k in ("state", "stats")},
                        "id": getattr(s, "verifier_id", getattr(s, "device_id", "")),
                    }
                )
            )
        return 0
    vrows = [
        [
            s.verifier_id,
            s.state,
            s.model,
            str(s.sessions),
            f"{s.stats.get('acceptance_rate', 0):.0%}",
            f"{s.stats.get('mean_batch_size', 0):.2f}",
            f"{s.stats.get('committed_tokens', 0):.0f}",
            f"{s.stats.get('rejected_messages', 0):.0f}",
        ]
        for s in found
        if isinstance(s, VerifierStatus)
    ]
    drows = [
        [
            s.device_id,
            s.state,
            s.drafter,
            str(len(s.sessions)),
            f"{s.stats.get('acceptance_rate', 0):.0%}",
            f"{s.stats.get('mean_accepted', 0):.2f}",
            f"{s.stats.get('tokens', 0):.0f}",
        ]
        for s in found
        if isinstance(s, DeviceStatus)
    ]
    _print(
        _table(
            vrows,
            ["VERIFIER", "STATE", "MODEL", "SESSIONS", "ACCEPT", "BATCH", "TOKENS", "REJECTED"],
        )
    )
    _print("")
    _print(_table(drows, ["DEVICE", "STATE", "DRAFTER", "ACTIVE", "ACCEPT", "MEAN_ACC", "TOKENS"]))
    return 0


# `generate` to a device whose retained status says offline, or that has none: a distinct
# exit status so scripts can tell "device down" from "broker down" (3) or "no result" (1).
EXIT_DEVICE_UNAVAILABLE = 5
STATUS_WAIT_S = 2.0  # retained messages arrive right after SUBACK; 2 s is generous


async def _device_status(bus: Bus, topic: str, wait: float) -> DeviceStatus | None:
    async with bus.subscribe(topic) as sub:
        try:
            msg = await sub.get(wait)
        except TimeoutError:
            return None
    if not msg.payload:
        return None
    try:
        return decode(msg.payload, expect=DeviceStatus)
    except ProtocolError:
        return None


async def generate(cfg: Config, args: argparse.Namespace) -> int:
    """Send a prompt with a fresh request id and show only what answers *that* request.

    A session id may be reused (``--session``): the topic can hold an earlier generation's
    retained result and carry its text.  Only the Result whose ``request`` is ours counts;
    text chunks are shown from the first chunk (seq 1) of a generation that starts after
    the request went out, and only of that instance.  If the Result names another instance
    than the one streamed, the stream is discarded and the Result's text printed."""
    t = Topics(cfg.bus.prefix)
    sid = args.session or f"gen-{uuid.uuid4().hex[:8]}"
    request_id = uuid.uuid4().hex[:16]
    req = PromptRequest(
        prompt=args.prompt,
        session_id=sid,
        max_new_tokens=args.max_new_tokens,
        request_id=request_id,
    )
    log = structlog.get_logger("mw.cli")
    async with (
        tool_bus(cfg, "generate") as bus,
        bus.subscribe(t.session(args.device, sid, "text"), qos=2) as text,  # each chunk once
        bus.subscribe(t.session(args.device, sid, "result")) as res,
    ):
        # The device's retained status first: an offline or unknown device would otherwise
        # leave us waiting the whole --timeout (300 s) in silence.
        status = await _device_status(
            bus, t.device_status(args.device), min(STATUS_WAIT_S, args.timeout)
        )
        if status is None or not status.online:
            why = (
                "has no retained status (unknown or decommissioned)"
                if status is None
                else ("is offline (its retained status says so)")
            )
            print(f"mw-cli: device {args.device} {why}; nothing sent", file=sys.stderr)
            return EXIT_DEVICE_UNAVAILABLE
        await bus.publish(
            t.device_inbox(args.device), req.encode(), qos=1, content_type=CONTENT_JSON
        )
        print(f"# session {sid} on device {args.device}", file=sys.stderr, flush=True)
        deadline = time.monotonic() + args.timeout
        streamed: dict[str, str] = {}  # the instance whose text is shown

        async def stream() -> None:
            async for msg in text:
                try:
                    c = decode(msg.payload, expect=TextChunk)
                except ProtocolError:
                    continue
                if "inst" not in streamed:
                    if c.seq != 1:
                        continue  # the middle of another generation under this session id
                    streamed["inst"] = c.instance
                if c.instance != streamed["inst"]:
                    continue
                marker = {"provisional": "\x1b[2m", "correction": "\x1b[33m"}.get(c.kind, "")
                sys.stdout.write(f"{marker}{c.text}\x1b[0m" if marker and _colour() else c.text)
                sys.stdout.flush()

        async def ours() -> Result:
            while True:
                msg = await res.get(max(0.0, deadline - time.monotonic()))
                try:
                    r = decode(msg.payload, expect=Result)
                except ProtocolError:
                    continue
                if r.request == request_id:
                    return r
                log.info("result_of_another_request_ignored", session=sid, request=r.request)

        async with asyncio.TaskGroup() as tg:
            streamer = tg.create_task(stream(), name="stream")
            try:
                r = await ours()
            except TimeoutError:
                streamer.cancel()
                print(
                    f"\nmw-cli: no result for session {sid} within {args.timeout:.0f} s",
                    file=sys.stderr,
                )
                return 1
            await asyncio.sleep(0.2)  # let the last text chunks print
            streamer.cancel()
        if streamed.get("inst") != r.instance:
            if streamed:
                print("\n# (streamed text was another generation's; the result follows)")
            sys.stdout.write(r.text)
        print(
            f"\n# {r.n_tokens} tokens, finish={r.finish_reason}, verified={r.verified}, "
            f"acceptance={r.stats.get('acceptance_rate', 0):.0%}"
            + (f", error: {r.error}" if r.error else ""),
            file=sys.stderr,
        )
    return 0


async def decommission(cfg: Config, args: argparse.Namespace) -> int:
    """Empty retained payloads on the device's discovery configs (Home Assistant deletes the
    entities) and on its status topic (``stats`` stops listing it)."""
    from middleware.protocol.homeassistant import device_removal

    t = Topics(cfg.bus.prefix)
    targets = [*device_removal(t, args.device), t.device_status(args.device)]
    async with tool_bus(cfg, "decommission") as bus:
        for topic in targets:
            await bus.publish(topic, b"", qos=1, retain=True)
    structlog.get_logger("mw.cli").info("decommissioned", device=args.device, cleared=len(targets))
    return 0
