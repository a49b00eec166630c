"""Retained presence messages (UTF-8 JSON, readable by any IoT stack).

Both are published retained and set as the client's MQTT last will with
``online: false`` so a dead device or verifier is visible to everyone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Self

from middleware.errors import ProtocolError
from middleware.protocol.codec import (
    DEFAULT_LIMITS,
    Fields,
    Limits,
    check_id,
    check_utf8,
    pack_json,
)

State = Literal["online", "offline", "degraded"]
STATES: tuple[str, ...] = ("online", "offline", "degraded")


def _stats(v: Any) -> dict[str, float]:
    if not isinstance(v, dict) or len(v) > 64:
        raise ProtocolError("stats: expected a small map")
    out: dict[str, float] = {}
    for k, x in v.items():
        if (
            not isinstance(k, str)
            or len(k) > 64
            or isinstance(x, bool)
            or not isinstance(x, int | float)
        ):
            raise ProtocolError("stats: string keys and numeric values only")
        check_utf8(k, "stats key")
        try:
            x = float(x)
        except OverflowError as exc:
            raise ProtocolError("stats: number too large") from exc
        if not math.isfinite(x):  # NaN/Infinity are not JSON and NaN breaks equality
            raise ProtocolError("stats: values must be finite")
        out[k] = x
    return out


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """Retained ``device/{id}/status``."""

    TYPE: ClassVar[str] = "device_status"

    device_id: str
    state: State
    drafter: str = ""
    tokenizer: str = ""
    sessions: tuple[str, ...] = ()
    stats: dict[str, float] = field(default_factory=dict)  # acceptance_rate, mean_accepted...
    at: float = 0.0

    def __post_init__(self) -> None:
        check_id(self.device_id, "device_status.device_id")
        if self.state not in STATES:
            raise ProtocolError(f"device_status.state: {self.state!r}")

    @property
    def online(self) -> bool:
        return self.state != "offline"

    def encode(self) -> bytes:
        return pack_json(
            self.TYPE,
            {
                "device": self.device_id,
                "state": self.state,
                "online": self.online,
                "drafter": self.drafter,
                "tokenizer": self.tokenizer,
                "sessions": list(self.sessions),
                "stats": self.stats,
                # A last will is written at connect time, so its time is unknown: omitted
                # rather than 0.0, which Home Assistant and Grafana show as 1970.
                **({"at": self.at} if self.at else {}),
            },
        )

    @classmethod
    def from_wire(cls, d: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> Self:
        f = Fields(d, cls.TYPE, limits)
        sessions = f.raw("sessions", [])
        if not isinstance(sessions, list) or len(sessions) > 1024:
            raise ProtocolError("device_status.sessions: expected a list")
        return cls(
            device_id=f.id("device"),
            state=f.choice("state", STATES),  # type: ignore[arg-type]
            drafter=f.str("drafter", ""),
            tokenizer=f.str("tokenizer", ""),
            sessions=tuple(check_id(s, "device_status.sessions") for s in sessions),
            stats=_stats(f.raw("stats", {})),
            at=f.float("at", 0.0, 1e12, 0.0),
        )


@dataclass(frozen=True, slots=True)
class VerifierStatus:
    """Retained ``verifier/{id}/status``."""

    TYPE: ClassVar[str] = "verifier_status"

    verifier_id: str
    state: State
    model: str = ""
    tokenizer: str = ""
    sessions: int = 0
    stats: dict[str, float] = field(default_factory=dict)
    at: float = 0.0

    def __post_init__(self) -> None:
        check_id(self.verifier_id, "verifier_status.verifier_id")
        if self.state not in STATES:
            raise ProtocolError(f"verifier_status.state: {self.state!r}")

    @property
    def online(self) -> bool:
        return self.state != "offline"

    def encode(self) -> bytes:
        return pack_json(
            self.TYPE,
            {
                "verifier": self.verifier_id,
                "state": self.state,
                "online": self.online,
                "model": self.model,
                "tokenizer": self.tokenizer,
                "sessions": self.sessions,
                "stats": self.stats,
                # A last will is written at connect time, so its time is unknown: omitted
                # rather than 0.0, which Home Assistant and Grafana show as 1970.
                **({"at": self.at} if self.at else {}),
            },
        )

    @classmethod
    def from_wire(cls, d: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> Self:
        f = Fields(d, cls.TYPE, limits)
        return cls(
            verifier_id=f.id("verifier"),
            state=f.choice("state", STATES),  # type: ignore[arg-type]
            model=f.str("model", ""),
            tokenizer=f.str("tokenizer", ""),
            sessions=f.int("sessions", 0, 1 << 30, 0),
            stats=_stats(f.raw("stats", {})),
            at=f.float("at", 0.0, 1e12, 0.0),
        )
