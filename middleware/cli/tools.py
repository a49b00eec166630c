"""Debugging tools: ``tail``, ``sessions``, ``stats``, ``generate``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import structlog

from middleware.broker_bridge.bus import CONTENT_JSON, Bus
from middleware.broker_bridge.client import Refused
from middleware.broker_bridge.factory import make_bus
from middleware.cli.render import TextRenderer, describe, human_line
from middleware.config import Config
from middleware.errors import BusError, ProtocolError
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

# A tool gives up connecting after this, or after its --timeout when shorter: a person at a
# terminal or a script wants "broker unreachable" (exit 3) promptly, not 300 s of silence.
CONNECT_TIMEOUT_S = 10.0


@contextlib.asynccontextmanager
async def tool_bus(
    cfg: Config, role: str, connect_within: float | None = None
) -> AsyncIterator[Bus]:
    """A connected bus for a tool, closed on exit.

    Connecting is quiet: the transport's per-attempt ``connect_failed`` warnings (six JSON
    lines in 2 s against a refused port) are held back while the first connection is
    tried, and an unreachable broker ends in one BusError naming it and the time waited
    (``mw-cli`` prints it as one line, exit 3).  Reconnect warnings after that still show.
    """
    limit = CONNECT_TIMEOUT_S if connect_within is None else min(connect_within, CONNECT_TIMEOUT_S)
    bus = make_bus(cfg.bus, f"mw-{role}-{uuid.uuid4().hex[:8]}", connect_timeout=limit)
    quiet = logging.getLogger("middleware.client")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    started = time.monotonic()
    try:
        await bus.connect()
    except Refused:  # bad credentials, not authorized: not a reachability problem
        raise
    except BusError as exc:
        # Retries back off (0.1, 0.2, 0.4... s) and stop when the next would pass the limit.
        where, took = f"{cfg.bus.host}:{cfg.bus.port}", time.monotonic() - started
        raise BusError(
            f"no connection to {where} (tried {took:.1f} s, limit {limit:g} s): {exc}"
        ) from None
    finally:
        quiet.setLevel(level)
    try:
        yield bus
    finally:
        await bus.close()


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
    async with tool_bus(cfg, "tail", args.timeout) as bus, bus.subscribe(filter_) as sub:
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


async def _collect_retained(
    cfg: Config, filters: list[str], wait: float, connect_within: float | None = None
) -> list[Any]:
    """Retained messages on every filter, read concurrently for ``wait`` seconds.

    One reader per filter: reading them one after another spent the whole wait on the first
    filter (``stats`` never listed devices).  Keyed by topic, so a status seen twice (retained
    copy, then a live update) is listed once, latest first wins."""
    by_topic: dict[str, Any] = {}
    async with tool_bus(cfg, "query", connect_within) as bus:
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
        for s in await _collect_retained(
            cfg, [t.all_sessions("state")], args.wait, getattr(args, "timeout", None)
        )
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
        cfg,
        [t.all_verifier_status(), t.all_device_status()],
        args.wait,
        getattr(args, "timeout", None),
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


class _Resent:
    """Committed text a device sends again: after a node restart, the text the broker had not
    acknowledged comes again as a ``correction`` from that position.  Where the correction
    starts with exactly the text already written from there, only the rest is new (a
    pipe cannot take text back); any other correction passes through as one."""

    def __init__(self) -> None:
        self.segments: list[tuple[int, int, str]] = []  # committed chunks: pos, n, text
        self.end = 0  # token position the committed chunks reach

    def chunk(self, c: TextChunk) -> tuple[str, str]:
        if c.kind == "provisional":
            return c.kind, c.text
        if c.kind == "correction" and c.pos < self.end:
            written = "".join(t for p, _, t in self.segments if p >= c.pos)
            self.segments = [s for s in self.segments if s[0] < c.pos]
            self.segments.append((c.pos, c.n_tokens, c.text))
            self.end = c.pos + c.n_tokens
            if c.text.startswith(written):
                return "verified", c.text[len(written) :]
            return c.kind, c.text
        self.segments.append((c.pos, c.n_tokens, c.text))
        self.end = max(self.end, c.pos + c.n_tokens)
        return c.kind, c.text


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
        tool_bus(cfg, "generate", args.timeout) as bus,
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

        renderer = TextRenderer(marked=_colour())  # a pipe gets verified text only
        resent = _Resent()

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
                kind, body = resent.chunk(c)
                if out := renderer.feed(kind, body):
                    sys.stdout.write(out)
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
        if renderer.unverified and not renderer.marked:
            print(
                f"\n# {renderer.unverified} characters of provisional text were never "
                "verified and are not in the output",
                file=sys.stderr,
            )
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
    async with tool_bus(cfg, "decommission", getattr(args, "timeout", None)) as bus:
        for topic in targets:
            await bus.publish(topic, b"", qos=1, retain=True)
    structlog.get_logger("mw.cli").info("decommissioned", device=args.device, cleared=len(targets))
    return 0
