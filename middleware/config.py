"""One TOML configuration shared by every ``mw-cli`` command.

Precedence: command-line flags > environment (``MW_<SECTION>_<KEY>``, e.g.
``MW_BUS_HOST``) > the file (``--config``, ``$MW_CONFIG``, or
``/etc/mw/mw.toml`` when present) > defaults.  Unknown keys and wrong types are
errors, reported with the offending key.  A documented example lives in
``deploy/mw.example.toml``.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

from middleware.errors import ConfigError

DEFAULT_PATHS = (Path("/etc/mw/mw.toml"),)


@dataclass(frozen=True, slots=True)
class BusSection:
    transport: str = "mqtt"  # mqtt | zmq
    host: str = "127.0.0.1"
    port: int = 1883
    prefix: str = "mw/v1"
    username: str = ""
    password: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    keepalive: int = 15
    session_expiry: int = 300  # seconds the broker keeps a device's session while offline
    zmq_host: str = (
        "127.0.0.1"  # mw-cli bridge: the ZeroMQ hub it relays to; mw-cli hub: bind address
    )
    zmq_port: int = 5555


@dataclass(frozen=True, slots=True)
class VerifierSection:
    id: str = "verifier-1"
    model: str = "smollm2"
    device: str = "cpu"
    dtype: str = "float32"
    batch_policy: str = "planned"  # planned (speculation control) | adaptive | fixed | none
    batch_window_ms: float = 5.0  # adaptive/fixed: the longest a draft waits for company
    planned_max_wait_ms: float = 500.0  # planned: the bound on the planner's own waiting
    max_batch: int = 16
    max_draft: int = 64
    memory_budget_tokens: int = 65_536
    # A batch's drafts of different lengths are split into forwards of similar lengths when
    # that saves more padded token slots than this (one forward's fixed cost in tokens; CPU
    # ~8, a GPU far more).
    forward_overhead_tokens: int = 8
    max_sessions: int = 1024
    max_sessions_per_device: int = 64
    session_idle_timeout_s: float = 900.0  # drop sessions silent this long; 0 keeps them
    exclusive: bool = (
        True  # the only verifier on the prefix; false for scale-out (several verifiers)
    )
    metrics_port: int = 0  # 0: no endpoint
    metrics_host: str = "127.0.0.1"
    # Opt-in and LOSSY (output differs from the target alone; marked lossy everywhere).
    relaxed_lossy: bool = False
    relaxed_ratio: float = 0.5
    relaxed_confidence: float = 0.5


@dataclass(frozen=True, slots=True)
class NodeSection:
    id: str = "device-1"
    drafter: str = "ngram"  # ngram | hf:SPEC | quant4:SPEC | quant3:SPEC
    tokenizer: str = "smollm2"  # model spec whose tokenizer the device uses
    mode: str = "greedy"  # greedy | coupled | rejection
    seed: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 128
    max_concurrent: int = 4
    threshold: float = 0.4
    min_draft: int = 1
    max_draft: int = 8
    max_failures: int = 3
    offline: bool = True
    metrics_port: int = 0  # device-side Prometheus endpoint; 0: none
    metrics_host: str = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class LogSection:
    level: str = "info"
    json: str = "auto"  # auto | true | false


@dataclass(frozen=True, slots=True)
class Config:
    bus: BusSection = field(default_factory=BusSection)
    verifier: VerifierSection = field(default_factory=VerifierSection)
    node: NodeSection = field(default_factory=NodeSection)
    log: LogSection = field(default_factory=LogSection)


def _coerce(section: str, key: str, typ: Any, value: Any) -> Any:
    where = f"[{section}] {key}"
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "1",
            "true",
            "yes",
            "on",
            "0",
            "false",
            "no",
            "off",
        ):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if typ is int:
        try:
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if typ is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _apply(cfg: Config, section: str, values: dict[str, Any]) -> Config:
    current = getattr(cfg, section)
    hints = get_type_hints(type(current))
    known = {f.name for f in fields(current)}
    updates = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"[{section}] unknown key {key!r}; known: {', '.join(sorted(known))}")
        updates[key] = _coerce(section, key, hints[key], value)
    return replace(cfg, **{section: replace(current, **updates)})


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: dict[str, str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Config:
    """Build the configuration from file, environment and flag overrides."""
    env = dict(os.environ if env is None else env)
    cfg = Config()
    chosen = Path(path) if path else (Path(env["MW_CONFIG"]) if env.get("MW_CONFIG") else None)
    if chosen is None:
        chosen = next((p for p in DEFAULT_PATHS if p.is_file()), None)
    if chosen is not None:
        try:
            data = tomllib.loads(chosen.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {chosen}") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {chosen}: {exc}") from exc
        for section, values in data.items():
            if section not in {f.name for f in fields(Config)} or not isinstance(values, dict):
                raise ConfigError(f"{chosen}: unknown section [{section}]")
            cfg = _apply(cfg, section, values)
    for f in fields(Config):
        head = f"MW_{f.name.upper()}_"
        found = {k[len(head) :].lower(): v for k, v in env.items() if k.startswith(head)}
        if found:
            cfg = _apply(cfg, f.name, found)
    for section, values in (overrides or {}).items():
        clean = {k: v for k, v in values.items() if v is not None}
        if clean:
            cfg = _apply(cfg, section, clean)
    return cfg
