"""One TOML configuration shared by every ``mw-cli`` command.

Precedence: command-line flags > environment (``MW_<SECTION>_<KEY>``, e.g.
``MW_BUS_HOST``) > the file (``--config``, ``$MW_CONFIG``, or
``/etc/mw/mw.toml`` when present) > defaults.  A documented example lives in
``deploy/mw.example.toml``.

Every field carries its own check beside its default (``setting(default, check)``):
unknown keys, wrong types, values out of range or not among the choices, and the few
relations between fields (``CROSS_CHECKS``) are one ConfigError naming where the value
came from (``[verifier] max_batch``, ``environment variable MW_BUS_HOTS``; ``mw-cli``
names the flag), raised before anything connects or loads a model (``mw-cli`` exits 2).
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

from middleware.errors import ConfigError
from middleware.protocol.topics import DEFAULT_PREFIX

DEFAULT_PATHS = (Path("/etc/mw/mw.toml"),)

# --- validators ---------------------------------------------------------------------
# Each field names its own check beside its default (``setting(default, check)``): a
# function of the coerced value that returns what is wrong with it, or None.  The bounds
# are those of the code that consumes the value (SamplingParams, PolicyConfig, BatchConfig,
# the protocol's Limits, MQTT's 16-bit keepalive), so a value that passes here is never
# refused later, after a broker connection or a 60 s model load.
Check = Callable[[Any], str | None]


def setting(default: Any, check: Check | None) -> Any:
    """A config field: its default and its check (``None``: any value of the field's type)."""
    return field(default=default, metadata={"check": check})


def _num(v: float) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def between(lo: float, hi: float) -> Check:
    """lo <= value <= hi (finite)."""
    return lambda v: (
        None if lo <= v <= hi else f"must be between {_num(lo)} and {_num(hi)}, got {_num(v)}"
    )


def at_least(lo: float) -> Check:
    """lo <= value, finite."""

    def check(v: float) -> str | None:
        if not math.isfinite(v):
            return f"must be a finite number \u2265 {_num(lo)}, got {_num(v)}"
        return None if v >= lo else f"must be \u2265 {_num(lo)}, got {_num(v)}"

    return check


def fraction(v: float) -> str | None:
    """0 < value <= 1."""
    return None if 0.0 < v <= 1.0 else f"must be in (0, 1], got {_num(v)}"


def one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}, got {v!r}"


def identifier(v: str) -> str | None:
    """A topic-safe id (it becomes one level of every topic of the device or verifier)."""
    from middleware.errors import ProtocolError
    from middleware.protocol.codec import check_id

    try:
        check_id(v, "id")
    except ProtocolError:
        return (
            "must be 1-64 characters of A-Z a-z 0-9 _ . : -, starting with a letter or digit, "
            f"got {v!r}"
        )
    return None


def topic_prefix(v: str) -> str | None:
    from middleware.errors import TopicError
    from middleware.protocol.topics import Topics

    try:
        Topics(v)
    except TopicError as exc:
        return str(exc)
    return None


_HOST_RE = re.compile(r"^[A-Za-z0-9_.:%\[\]-]{1,253}$")


def hostname(v: str) -> str | None:
    return None if _HOST_RE.fullmatch(v) else f"must be a host name or address, got {v!r}"


def zmq_endpoints(v: str) -> str | None:
    """Comma-separated verifier endpoints (tcp://host:port), tried in turn."""
    from middleware.broker_bridge.zmq import check_endpoint
    from middleware.errors import ConfigError

    parts = [e.strip() for e in v.split(",")]
    try:
        for e in parts:
            check_endpoint(e)
    except ConfigError as exc:
        return f"must be comma-separated tcp://host:port endpoints; {exc}"
    return None


def zmq_bind(v: str) -> str | None:
    """Where a verifier binds its ROUTER: tcp://host:port (``*`` for any host)."""
    from middleware.broker_bridge.zmq import check_endpoint
    from middleware.errors import ConfigError

    try:
        check_endpoint(v, bind=True)
    except ConfigError as exc:
        return f"must be a bind address like tcp://*:5555; {exc}"
    return None


def mqtt_string(v: str) -> str | None:
    """An MQTT UTF-8 string: at most 65,535 bytes, no U+0000."""
    if "\x00" in v or len(v.encode("utf-8", "surrogatepass")) > 65_535:
        return "must be at most 65,535 bytes with no NUL character"
    return None


def file_or_empty(v: str) -> str | None:
    return None if not v or Path(v).expanduser().is_file() else f"no such file: {v!r}"


def model_spec(v: str) -> str | None:
    """smollm2, a local path or a hub id: resolved when loaded; here only non-blank."""
    return (
        None
        if v.strip() == v and v
        else f"must be a model spec (smollm2, a path, a hub id), got {v!r}"
    )


def drafter_spec(v: str) -> str | None:
    from middleware.nodes.drafters import DrafterSpec

    try:
        DrafterSpec.parse(v)
    except ConfigError as exc:
        return str(exc)
    return None


def torch_device(v: str) -> str | None:
    if re.fullmatch(r"cpu|mps|(cuda|xpu)(:[0-9]{1,2})?", v):
        return None
    return f"must be cpu, cuda, cuda:N, mps or xpu[:N], got {v!r}"


PORT = between(1, 65_535)


def journal_path(v: str) -> str | None:
    """``auto``, ``""`` (off: in memory) or a file path whose directory exists or can be made."""
    if v in ("", "auto"):
        return None
    p = Path(v).expanduser()
    if p.is_dir():
        return f"must be a file path, not a directory, got {v!r}"
    parent = next((a for a in (p.parent, *p.parent.parents) if a.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
        return f"directory of {v!r} does not exist and cannot be created"
    return None


def retained_expiry(v: float) -> str | None:
    """0 (never) or 1 s .. 2^32-1 s (MQTT 5's message expiry interval)."""
    if v == 0 or 1 <= v <= 2**32 - 1:
        return None
    return f"must be 0 (never) or between 1 and 4294967295 seconds, got {_num(v)}"


def broker_list(v: tuple[str, ...]) -> str | None:
    """``host:port`` entries (``host`` alone: port 1883), distinct, at most 64."""
    from middleware.broker_bridge.sharded import parse_endpoint

    if len(v) > 64:
        return f"at most 64 brokers, got {len(v)}"
    seen = set()
    for spec in v:
        try:
            endpoint = parse_endpoint(spec)
        except ConfigError as exc:
            return str(exc)
        if hostname(endpoint[0]):
            return f"broker address {spec!r}: bad host"
        if endpoint in seen:
            return f"broker {spec!r} listed twice"
        seen.add(endpoint)
    return None


@dataclass(frozen=True, slots=True)
class BusSection:
    transport: str = setting("mqtt", one_of("mqtt", "zmq"))
    host: str = setting("127.0.0.1", hostname)
    port: int = setting(1883, PORT)
    prefix: str = setting(DEFAULT_PREFIX, topic_prefix)
    username: str = setting("", mqtt_string)
    password: str = setting("", mqtt_string)
    tls_ca: str = setting("", file_or_empty)
    tls_cert: str = setting("", file_or_empty)
    tls_key: str = setting("", file_or_empty)
    keepalive: int = setting(15, PORT)  # MQTT's keepalive is 16 bits; 0 (none) is refused
    # seconds the broker keeps a device's session while offline (MQTT 5: 32 bits)
    session_expiry: int = setting(300, between(0, 2**32 - 1))
    # MQTT 5 message expiry of the retained results devices publish (0: never), so the
    # broker's retained store stays bounded
    retained_expiry_s: float = setting(86_400.0, retained_expiry)
    # transport = "zmq" (no broker): devices, tools and `mw-cli bridge` connect to these
    # verifiers, one at a time, moving to the next when one goes silent
    zmq_endpoints: str = setting("tcp://127.0.0.1:5555", zmq_endpoints)
    # transport = "zmq": where `mw-cli verifier` binds its ROUTER
    zmq_bind: str = setting("tcp://*:5555", zmq_bind)
    # Fleets past one broker (broker_bridge/sharded.py): ["host:port", ...].  Devices use
    # the one their id hashes to (host/port are then ignored); verifiers and tools use all.
    # From the environment or a flag: comma-separated.
    brokers: tuple[str, ...] = setting((), broker_list)
    # a device whose broker is unreachable moves to its second-ranked broker of ``brokers``
    failover: bool = setting(False, None)


@dataclass(frozen=True, slots=True)
class VerifierSection:
    id: str = setting("verifier-1", identifier)
    model: str = setting("smollm2", model_spec)
    device: str = setting("cpu", torch_device)
    dtype: str = setting("float32", one_of("float32", "bfloat16", "float16", "float64"))
    # planned (speculation control) | adaptive | fixed | none
    batch_policy: str = setting("planned", one_of("planned", "adaptive", "fixed", "none"))
    # adaptive/fixed: the longest a draft waits for company (BatchConfig: at most 10 s)
    batch_window_ms: float = setting(5.0, between(0.0, 10_000.0))
    # planned: the bound on the planner's own waiting
    planned_max_wait_ms: float = setting(500.0, between(0.0, 10_000.0))
    max_batch: int = setting(16, between(1, 1024))
    max_draft: int = setting(64, between(1, 256))  # the protocol's Limits.max_draft_tokens
    memory_budget_tokens: int = setting(65_536, at_least(1))
    # A batch's drafts of different lengths are split into forwards of similar lengths when
    # that saves more padded token slots than this (one forward's fixed cost in tokens; CPU
    # ~8, a GPU far more).
    forward_overhead_tokens: int = setting(8, at_least(0))
    max_sessions: int = setting(1024, at_least(1))
    max_sessions_per_device: int = setting(64, at_least(1))
    # drop sessions silent this long; 0 keeps them
    session_idle_timeout_s: float = setting(900.0, at_least(0.0))
    # the only verifier on the prefix; false for scale-out (several verifiers)
    exclusive: bool = setting(True, None)
    metrics_port: int = setting(0, between(0, 65_535))  # 0: no endpoint
    metrics_host: str = setting("127.0.0.1", hostname)
    # Commit-tag key (a file of at least 16 bytes, mode 0600) shared by the verifiers of a
    # fleet: they then accept each other's rejection-mode tokens on failover.  Empty: a
    # random key per process (a restarted verifier re-proves greedy/coupled claims and rolls
    # rejection-mode ones back).  See docs/threat-model.md.
    session_key_file: str = setting("", file_or_empty)
    max_prompt_tokens: int = setting(0, between(0, 1 << 20))  # 0: the model's max positions
    prefill_chunk: int = setting(256, between(1, 65_536))  # prompt tokens per prefill step
    # an idle session yields its slot (full verifier) or its id (another generation) after
    reuse_idle_s: float = setting(10.0, at_least(0.0))
    state_expiry_s: float = setting(86_400.0, between(0.0, 4_294_967_295.0))  # 0: never
    # Opt-in and LOSSY (output differs from the target alone; marked lossy everywhere).
    relaxed_lossy: bool = setting(False, None)
    relaxed_ratio: float = setting(0.5, fraction)
    relaxed_confidence: float = setting(0.5, fraction)


@dataclass(frozen=True, slots=True)
class NodeSection:
    id: str = setting("device-1", identifier)
    drafter: str = setting("ngram", drafter_spec)  # ngram | hf:SPEC | quant4:SPEC | quant3:SPEC
    tokenizer: str = setting("smollm2", model_spec)  # model spec whose tokenizer the device uses
    mode: str = setting("greedy", one_of("greedy", "coupled", "rejection"))
    # The sampling bounds are SamplingParams' (the wire format's).
    seed: int = setting(0, between(0, 2**63 - 1))
    temperature: float = setting(1.0, between(1e-4, 100.0))
    top_k: int = setting(0, between(0, 1 << 20))
    top_p: float = setting(1.0, fraction)
    max_new_tokens: int = setting(128, between(1, 32_768))  # Limits.max_context_tokens
    max_concurrent: int = setting(4, at_least(1))
    threshold: float = setting(0.4, between(0.0, 0.9))  # PolicyConfig's threshold_max
    min_draft: int = setting(1, between(1, 256))
    max_draft: int = setting(8, between(1, 256))
    max_failures: int = setting(3, at_least(1))
    offline: bool = setting(True, None)
    # SQLite journal of unfinished sessions and recent results (resume after a restart,
    # republish after a broker crash): "auto" = $STATE_DIRECTORY/journal-<id>.sqlite under
    # systemd (StateDirectory=) and off elsewhere; "" = off; or a file path
    journal: str = setting("auto", journal_path)
    metrics_port: int = setting(0, between(0, 65_535))  # device-side Prometheus endpoint; 0: none
    metrics_host: str = setting("127.0.0.1", hostname)


@dataclass(frozen=True, slots=True)
class LogSection:
    level: str = setting("info", one_of("debug", "info", "warning", "error"))
    json: str = setting("auto", one_of("auto", "true", "false"))


# Checks that involve two fields of a section: (section, key reported, check of the section).
CROSS_CHECKS: tuple[tuple[str, str, Callable[[Any], str | None]], ...] = (
    (
        "node",
        "min_draft",
        lambda n: (
            None
            if n.min_draft <= n.max_draft
            else f"must be \u2264 max_draft ({n.max_draft}), got {n.min_draft}"
        ),
    ),
    (
        "bus",
        "failover",
        lambda b: (
            None
            if not b.failover or len(b.brokers) >= 2
            else "needs at least two entries in [bus] brokers"
        ),
    ),
    (
        "bus",
        "brokers",
        lambda b: None if not b.brokers or b.transport == "mqtt" else "needs transport = mqtt",
    ),
    (
        "bus",
        "tls_key",
        lambda b: (
            None if not b.tls_key or b.tls_cert else "needs tls_cert (the client certificate)"
        ),
    ),
)


@dataclass(frozen=True, slots=True)
class Config:
    bus: BusSection = field(default_factory=BusSection)
    verifier: VerifierSection = field(default_factory=VerifierSection)
    node: NodeSection = field(default_factory=NodeSection)
    log: LogSection = field(default_factory=LogSection)


def _coerce(typ: Any, value: Any) -> Any:
    """``value`` (TOML, or a string from the environment or a flag) as ``typ``; raises _Bad."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOLS:
            return _BOOLS[value.lower()]
        raise _Bad(f"expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise _Bad(f"expected an integer, got {value!r}")  # 3.7 is not silently 3
    if typ is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _Bad(f"expected a number, got {value!r}")
    if typ == tuple[str, ...]:
        if isinstance(value, str):  # environment or flag: comma-separated
            return tuple(p.strip() for p in value.split(",") if p.strip())
        if isinstance(value, list | tuple) and all(isinstance(x, str) for x in value):
            return tuple(value)
        raise _Bad(f"expected a list of strings, got {value!r}")
    if not isinstance(value, str):
        raise _Bad(f"expected a string, got {value!r}")
    return value


_BOOLS = {
    **dict.fromkeys(("1", "true", "yes", "on"), True),
    **dict.fromkeys(("0", "false", "no", "off"), False),
}


class _Bad(Exception):
    """What is wrong with one value, before the caller says where it came from."""


class _Unknown(_Bad):
    """The key is not a field of its section."""


_SECTIONS: dict[str, type] = {
    "bus": BusSection,
    "verifier": VerifierSection,
    "node": NodeSection,
    "log": LogSection,
}


def _field(section: str, key: str) -> tuple[Any, Check | None]:
    cls = _SECTIONS[section]
    f = {f.name: f for f in fields(cls)}.get(key)
    if f is None:
        known = ", ".join(sorted(x.name for x in fields(cls)))
        raise _Unknown(f"unknown key [{section}] {key}; known: {known}")
    return get_type_hints(cls)[key], f.metadata.get("check")


def _value(section: str, key: str, raw: Any) -> Any:
    typ, check = _field(section, key)
    value = _coerce(typ, raw)
    problem = check(value) if check is not None else None
    if problem:
        raise _Bad(problem)
    return value


def parse_setting(section: str, key: str, raw: Any) -> Any:
    """``raw`` as the value of ``[section] key``, checked; ConfigError says what is wrong
    without saying where (``mw-cli``'s flags put the flag's name in front)."""
    try:
        return _value(section, key, raw)
    except _Bad as exc:
        raise ConfigError(str(exc)) from None


def _apply(
    cfg: Config,
    section: str,
    values: Mapping[str, Any],
    where: Callable[[str], str],
    unknown_where: Callable[[str], str] | None = None,
) -> Config:
    """``where(key)`` names a bad value's origin in errors, ``unknown_where(key)`` an unknown
    key's (default ``where``)."""
    updates = {}
    for key, raw in values.items():
        try:
            updates[key] = _value(section, key, raw)
        except _Unknown as exc:
            raise ConfigError(f"{(unknown_where or where)(key)}: {exc}") from None
        except _Bad as exc:
            raise ConfigError(f"{where(key)}: {exc}") from None
    current = getattr(cfg, section)
    return replace(cfg, **{section: replace(current, **updates)})


def validate(cfg: Config) -> Config:
    """Every field's check, then the checks across fields; ConfigError names the key."""
    for name in _SECTIONS:
        section = getattr(cfg, name)
        for f in fields(section):
            check = f.metadata.get("check")
            problem = check(getattr(section, f.name)) if check is not None else None
            if problem:
                raise ConfigError(f"[{name}] {f.name}: {problem}")
    for name, key, check in CROSS_CHECKS:
        problem = check(getattr(cfg, name))
        if problem:
            raise ConfigError(f"[{name}] {key}: {problem}")
    return cfg


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start : exc.start + 1]!r})"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None


def _by_key(section: str) -> Callable[[str], str]:
    """Names a value by its section and key: ``[node] mode``."""
    return lambda key: f"[{section}] {key}"


def _by_variable(section: str, variables: dict[str, str], *, key_too: bool) -> Callable[[str], str]:
    """Names a value by its environment variable: ``environment variable MW_BUS_HOTS``."""
    return lambda key: (
        f"environment variable {variables[key]}" + (f" ([{section}] {key})" if key_too else "")
    )


def _check_section_typos(env: dict[str, str]) -> None:
    """``MW_BUSS_HOST`` would otherwise be ignored in silence (no section ``buss``): a
    variable whose first word is a near miss of a section (difflib ratio >= 0.8: a letter
    added or dropped, as in BUSS, NOD, LOGS, VERIFER; not a swap like BSU, 0.67) is an
    error naming it.  Other ``MW_`` variables (``MW_CONFIG``, ``MW_VENV``, test switches)
    are not ours to judge."""
    for var in sorted(env):
        m = re.fullmatch(r"MW_([A-Z0-9]+)_(\w+)", var)
        if m is None or m.group(1).lower() in _SECTIONS:
            continue
        close = difflib.get_close_matches(m.group(1).lower(), list(_SECTIONS), n=1, cutoff=0.8)
        if close:
            raise ConfigError(
                f"environment variable {var}: unknown section {m.group(1).lower()!r}; "
                f"did you mean MW_{close[0].upper()}_{m.group(2)}?"
            )


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: dict[str, str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Config:
    """Build the configuration from file, environment and flag overrides, and check it.

    Every error is one ConfigError naming where the value came from: ``[node] mode``
    (the file), ``environment variable MW_BUS_HOTS`` or the section and key (overrides;
    ``mw-cli`` checks its flags as it parses them, naming the flag).
    """
    env = dict(os.environ if env is None else env)
    cfg = Config()
    chosen = Path(path) if path else (Path(env["MW_CONFIG"]) if env.get("MW_CONFIG") else None)
    if chosen is None:
        chosen = next((p for p in DEFAULT_PATHS if p.is_file()), None)
    if chosen is not None:
        file = str(chosen)
        for section, values in _read(chosen).items():
            if section not in _SECTIONS or not isinstance(values, dict):
                known = ", ".join(f"[{s}]" for s in _SECTIONS)
                raise ConfigError(f"{file}: unknown section [{section}]; known: {known}")
            cfg = _apply(cfg, section, values, _by_key(section), lambda _key: file)
    for section in _SECTIONS:
        head = f"MW_{section.upper()}_"
        found = {k[len(head) :].lower(): k for k in sorted(env) if k.startswith(head)}
        if found:
            values = {key: env[var] for key, var in found.items()}
            cfg = _apply(
                cfg,
                section,
                values,
                _by_variable(section, found, key_too=True),
                _by_variable(section, found, key_too=False),
            )
    _check_section_typos(env)
    for section, values in (overrides or {}).items():
        clean = {k: v for k, v in values.items() if v is not None}
        if clean:
            cfg = _apply(cfg, section, clean, _by_key(section))
    return validate(cfg)
