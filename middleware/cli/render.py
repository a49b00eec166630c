"""Turn bus messages into lines for people (``mw-cli tail``) or for jq (``--json``)."""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from typing import Any

from middleware.broker_bridge.bus import BusMessage
from middleware.errors import ProtocolError
from middleware.protocol import PromptRequest, decode
from middleware.protocol.codec import unpack

KEY_FIELDS: dict[str, tuple[str, ...]] = {
    "open": ("device_id", "epoch", "seq", "prompt", "committed", "max_new_tokens", "drafter"),
    "draft": ("epoch", "seq", "base", "tokens"),
    "verdict": (
        "kind",
        "epoch",
        "seq",
        "base",
        "accepted",
        "tokens",
        "committed_len",
        "done",
        "reason",
    ),
    "state": ("status", "owner", "epoch", "committed"),
    "close": ("epoch", "seq", "reason"),
    "text": ("kind", "pos", "n_tokens", "text", "final"),
    "result": ("finish_reason", "n_tokens", "verified", "text"),
    "device_status": ("state", "drafter", "sessions", "stats"),
    "verifier_status": ("state", "model", "sessions", "stats"),
    "prompt": ("prompt", "session_id", "max_new_tokens"),
}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _wire(value: Any) -> dict[str, Any]:
    """The message's fields under their wire (AsyncAPI) names, as a consumer sees them."""
    env = unpack(value.encode())
    return {k: _plain(v) for k, v in env.items() if k not in ("v", "t")}


def describe(msg: BusMessage, tokenizer: Any = None, *, wire: bool = False) -> dict[str, Any]:
    """A JSON-able description: time, topic, type, fields (token text when a tokenizer is given).

    ``wire=True`` (``tail --json``) names fields as on the wire and in docs/asyncapi.yaml
    (``sid``, ``n``...); the human line keeps the descriptive names.  Inbox prompts, which
    any IoT stack may send as plain text or untyped JSON, are decoded as prompts."""
    out: dict[str, Any] = {"ts": round(time.time(), 3), "topic": msg.topic, "retain": msg.retain}
    if msg.topic.endswith("/inbox"):
        try:
            req = PromptRequest.parse(msg.payload)
        except ProtocolError:
            pass
        else:
            out["type"] = "prompt"
            out["msg"] = (
                {
                    "prompt": req.prompt,
                    "session": req.session_id,
                    "max_new_tokens": req.max_new_tokens,
                }
                if wire
                else _plain(req)
            )
            return out
    try:
        value: Any = decode(msg.payload)
    except ProtocolError as exc:
        out["type"] = "unknown"
        try:
            out["payload"] = json.loads(msg.payload)
        except ValueError:
            try:
                out["payload"] = msg.payload.decode("utf-8")
            except UnicodeDecodeError:
                out["payload_b64"] = base64.b64encode(msg.payload[:4096]).decode()
        out["error"] = str(exc)[:200]
        return out
    out["type"] = value.TYPE
    fields = _wire(value) if wire else _plain(value)
    if tokenizer is not None:
        for key in ("tokens", "committed", "prompt"):
            if isinstance(fields.get(key), list) and fields[key]:
                fields[key + "_text"] = tokenizer.decode(fields[key], skip_special_tokens=False)
    out["msg"] = fields
    return out


def human_line(d: dict[str, Any], width: int = 160) -> str:
    """One readable line: ``12:00:01.234 mw/v1/session/1/verdict verdict kind=accept ...``."""
    ts = time.strftime("%H:%M:%S", time.localtime(d["ts"])) + f".{int(d['ts'] * 1000) % 1000:03d}"
    head = f"{ts} {d['topic']} {d['type']}" + (" [retained]" if d.get("retain") else "")
    if "msg" not in d:
        body = json.dumps(d.get("payload", d.get("payload_b64")), ensure_ascii=False)
        return f"{head} {body[:width]}  ({d.get('error', '')})"
    fields = d["msg"]
    parts = []
    for key in KEY_FIELDS.get(d["type"], tuple(fields)):
        if key not in fields:
            continue
        v = fields[key]
        text_key = key + "_text"
        if text_key in fields:
            parts.append(f"{key}={json.dumps(fields[text_key], ensure_ascii=False)[:80]}")
            continue
        if isinstance(v, list) and len(v) > 12:
            v = f"[{len(v)} items: {', '.join(map(str, v[:6]))}, ...]"
        elif isinstance(v, str):
            v = json.dumps(v, ensure_ascii=False)
            v = v if len(v) <= 100 else v[:97] + '..."'
        parts.append(f"{key}={v}")
    return f"{head} " + " ".join(str(p) for p in parts)


DIM, YELLOW, RESET = "\x1b[2m", "\x1b[33m", "\x1b[0m"
CORRECTION_MARK = "\u27f2"  # ⟲, before corrected text on a terminal


class TextRenderer:
    """What ``mw-cli generate`` writes for each chunk of a session's text stream.

    A chunk is ``verified`` (committed by the target model), ``provisional`` (released by a
    device that could not reach the verifier; may still be replaced), ``confirmed`` (the
    provisional text so far was verified unchanged) or a ``correction`` (the committed text
    that replaces all provisional text).  Two outputs:

    * ``marked`` (stdout is a colour terminal): everything as it arrives, provisional text
      dim, a correction in yellow after ``⟲``; a confirmed chunk prints nothing, its text is
      already on screen.
    * otherwise (a pipe, a file, or ``NO_COLOR``, where nothing can be marked): committed
      text only, so ``mw-cli generate ... > answer.txt`` holds exactly the verified answer;
      provisional text never reaches the output, and :attr:`unverified` counts what was held
      back and never confirmed.

    Before this, every chunk's text was written as is: a piped answer with a correction
    carried both the wrong provisional words and their replacement, and confirmed text
    appeared twice.
    """

    def __init__(self, *, marked: bool) -> None:
        self.marked = marked
        self.committed = ""  # verified + confirmed + corrected text, in order
        self._provisional = ""  # shown or held back, not yet confirmed or replaced

    @property
    def unverified(self) -> int:
        """Characters of provisional text not (yet) confirmed or replaced."""
        return len(self._provisional)

    def feed(self, kind: str, text: str) -> str:
        """The text to write for one chunk ("" for nothing)."""
        if kind == "provisional":
            self._provisional += text
            return f"{DIM}{text}{RESET}" if self.marked and text else ""
        self.committed += text
        if kind == "confirmed":
            self._provisional = self._provisional[len(text) :]
            return "" if self.marked else text
        if kind == "correction":
            self._provisional = ""
            return f"{YELLOW}{CORRECTION_MARK}{text}{RESET}" if self.marked else text
        return text  # verified
