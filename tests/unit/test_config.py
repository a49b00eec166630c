"""Configuration: defaults, the file/env/flag layering, and the verifier's batch window."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from middleware.cli.services import verifier_config
from middleware.config import (
    BusSection,
    Config,
    LogSection,
    NodeSection,
    VerifierSection,
    load_config,
    parse_setting,
    validate,
)
from middleware.errors import ConfigError


def test_the_planned_policy_waits_within_its_own_bound_the_others_within_the_window(
    tmp_path: Path,
) -> None:
    path = tmp_path / "mw.toml"
    path.write_text('[verifier]\nbatch_policy = "planned"\n')
    planned = verifier_config(load_config(path, env={}))
    assert planned.batch.policy == "planned" and planned.batch.window == pytest.approx(0.5)
    adaptive = verifier_config(
        load_config(
            path,
            env={"MW_VERIFIER_BATCH_POLICY": "adaptive", "MW_VERIFIER_PLANNED_MAX_WAIT_MS": "80"},
        )
    )
    assert adaptive.batch.policy == "adaptive" and adaptive.batch.window == pytest.approx(0.005)
    tuned = verifier_config(load_config(path, env={"MW_VERIFIER_PLANNED_MAX_WAIT_MS": "80"}))
    assert tuned.batch.window == pytest.approx(0.08)


def test_a_bad_value_is_refused_with_its_key(tmp_path: Path) -> None:
    path = tmp_path / "mw.toml"
    path.write_text('[verifier]\nplanned_max_wait_ms = "soon"\n')
    with pytest.raises(ConfigError, match="planned_max_wait_ms"):
        load_config(path, env={})


# --- validation: every field has a check, each refusal names its key --------------------
SECTIONS = {"bus": BusSection, "verifier": VerifierSection, "node": NodeSection, "log": LogSection}


def test_every_field_of_every_section_declares_its_check() -> None:
    """The declarative guarantee: no field is added without deciding its range or choices
    (booleans alone need none: the type check is all there is)."""
    for name, cls in SECTIONS.items():
        for f in fields(cls):
            assert "check" in f.metadata, f"[{name}] {f.name} has no check"
            if f.metadata["check"] is None:
                assert f.type in ("bool", bool), f"[{name}] {f.name}: only booleans go unchecked"


def test_the_defaults_and_the_example_config_pass() -> None:
    assert validate(Config()) == Config()
    example = Path(__file__).parents[2] / "deploy" / "mw.example.toml"
    load_config(example, env={})


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[node]\nmode = "lossy"\n', "[node] mode: must be one of greedy, coupled, rejection"),
        (
            "[verifier]\nmax_batch = -3\n",
            "[verifier] max_batch: must be between 1 and 1024, got -3",
        ),
        ("[node]\ntemperature = -5\n", "[node] temperature: must be between 0.0001 and 100"),
        ("[node]\nmax_new_tokens = 0\n", "[node] max_new_tokens: must be between 1 and 32768"),
        ("[node]\nmax_new_tokens = -1\n", "[node] max_new_tokens: must be between 1 and 32768"),
        ('[node]\nid = "bad/id"\n', "[node] id: must be 1-64 characters"),
        ('[verifier]\nid = ""\n', "[verifier] id: must be 1-64 characters"),
        ("[node]\nmax_batch = 3\n", "unknown key [node] max_batch"),
        ("[nodes]\nid = 'x'\n", "unknown section [nodes]"),
        ("[node]\nmin_draft = 9\n", "[node] min_draft: must be \u2264 max_draft (8), got 9"),
        ("[node]\ntop_p = 0.0\n", "[node] top_p: must be in (0, 1]"),
        ("[node]\nthreshold = 0.95\n", "[node] threshold: must be between 0 and 0.9"),
        ('[node]\ndrafter = "gguf"\n', "[node] drafter: drafter spec 'gguf'"),
        ("[node]\nseed = -1\n", "[node] seed: must be between 0 and"),
        ("[node]\nmax_concurrent = 0\n", "[node] max_concurrent: must be \u2265 1, got 0"),
        ("[node]\nmax_failures = 0\n", "[node] max_failures: must be \u2265 1, got 0"),
        ("[bus]\nport = 0\n", "[bus] port: must be between 1 and 65535, got 0"),
        ("[bus]\nkeepalive = 0\n", "[bus] keepalive: must be between 1 and 65535"),
        ("[bus]\nsession_expiry = -1\n", "[bus] session_expiry: must be between 0 and"),
        ('[bus]\ntransport = "amqp"\n', "[bus] transport: must be one of mqtt, zmq"),
        ('[bus]\nprefix = "mw/#"\n', "[bus] prefix: invalid topic prefix"),
        ('[bus]\nzmq_endpoints = "v1:5555"\n', "[bus] zmq_endpoints: must be comma-separated"),
        (
            '[bus]\nzmq_endpoints = "tcp://v1:5555,tcp://*:5555"\n',
            "[bus] zmq_endpoints: must be comma-separated",
        ),
        ('[bus]\nzmq_bind = "tcp://*:70000"\n', "[bus] zmq_bind: must be a bind address"),
        ('[bus]\nhost = "my broker"\n', "[bus] host: must be a host name or address"),
        ('[bus]\ntls_ca = "/nonexistent/ca.pem"\n', "[bus] tls_ca: no such file"),
        ('[bus]\nusername = "a\\u0000b"\n', "[bus] username: must be at most 65,535 bytes"),
        ("[verifier]\nmax_batch = 3.7\n", "[verifier] max_batch: expected an integer, got 3.7"),
        ("[verifier]\nmax_draft = 257\n", "[verifier] max_draft: must be between 1 and 256"),
        ("[verifier]\nbatch_window_ms = nan\n", "[verifier] batch_window_ms: must be between"),
        ("[verifier]\nsession_idle_timeout_s = inf\n", "must be a finite number \u2265 0"),
        ("[verifier]\nmemory_budget_tokens = 0\n", "[verifier] memory_budget_tokens: must be"),
        ("[verifier]\nforward_overhead_tokens = -1\n", "[verifier] forward_overhead_tokens"),
        ("[verifier]\nmax_sessions = 0\n", "[verifier] max_sessions: must be \u2265 1"),
        ("[verifier]\nprefill_chunk = 0\n", "[verifier] prefill_chunk: must be between 1"),
        ("[verifier]\nsession_key_file = '/nonexistent/k'\n", "[verifier] session_key_file"),
        ("[verifier]\nstate_expiry_s = -1\n", "[verifier] state_expiry_s: must be between 0"),
        ("[verifier]\nmax_sessions_per_device = 0\n", "[verifier] max_sessions_per_device"),
        ("[verifier]\nmetrics_port = 70000\n", "[verifier] metrics_port: must be between 0"),
        ("[verifier]\nrelaxed_ratio = 1.5\n", "[verifier] relaxed_ratio: must be in (0, 1]"),
        ("[verifier]\nrelaxed_confidence = 0\n", "[verifier] relaxed_confidence: must be in"),
        ('[verifier]\ndevice = "gpu"\n', "[verifier] device: must be cpu, cuda"),
        ('[verifier]\ndtype = "int8"\n', "[verifier] dtype: must be one of float32"),
        ('[verifier]\nbatch_policy = "max"\n', "[verifier] batch_policy: must be one of"),
        ('[verifier]\nmodel = " "\n', "[verifier] model: must be a model spec"),
        ('[verifier]\nexclusive = "maybe"\n', "[verifier] exclusive: expected true/false"),
        ('[log]\nlevel = "loud"\n', "[log] level: must be one of debug, info, warning, error"),
        ('[log]\njson = "yes"\n', "[log] json: must be one of auto, true, false"),
        ('[bus]\ntls_key = "{key}"\n', "[bus] tls_key: needs tls_cert"),
        ('[node]\njournal = "{tmp}"\n', "[node] journal: must be a file path, not a directory"),
        ('[node]\njournal = "{key}/sub/j.sqlite"\n', "[node] journal: directory of"),
        ("[bus]\nretained_expiry_s = 0.5\n", "[bus] retained_expiry_s: must be 0 (never) or"),
        ("[bus]\nretained_expiry_s = -1\n", "[bus] retained_expiry_s: must be 0 (never) or"),
        ("[bus]\nretained_expiry_s = 5e9\n", "[bus] retained_expiry_s: must be 0 (never) or"),
        ('[bus]\nbrokers = ["a:1883", "b:99999"]\n', "[bus] brokers: broker address 'b:99999'"),
        ('[bus]\nbrokers = ["a:1883", "a:1883"]\n', "[bus] brokers: broker 'a:1883' listed twice"),
        ('[bus]\nbrokers = ["bad host:1"]\n', "[bus] brokers: broker address 'bad host:1'"),
        ("[bus]\nbrokers = [1, 2]\n", "[bus] brokers: expected a list of strings"),
        ('[bus]\nbrokers = ["a"]\nfailover = true\n', "[bus] failover: needs at least two"),
        ('[bus]\nbrokers = ["a", "b"]\ntransport = "zmq"\n', "[bus] brokers: needs transport"),
    ],
)
def test_each_bad_value_is_one_error_naming_its_key(
    tmp_path: Path, toml: str, message: str
) -> None:
    key = tmp_path / "client.key"
    key.write_text("not a key")
    path = tmp_path / "mw.toml"
    path.write_text(toml.replace("{key}", str(key)).replace("{tmp}", str(tmp_path)))
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_config_file_that_is_not_utf8_is_named_not_decoded(tmp_path: Path) -> None:
    path = tmp_path / "mw.toml"
    path.write_bytes(b'[node]\nid = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"mw\.toml: not UTF-8 text \(byte 16"):
        load_config(path, env={})


def test_a_config_file_that_is_not_toml_is_named(tmp_path: Path) -> None:
    path = tmp_path / "mw.toml"
    path.write_text("[node\n")
    with pytest.raises(ConfigError, match=r"mw\.toml: not valid TOML"):
        load_config(path, env={})


def test_environment_variables_are_named_in_their_errors() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(env={"MW_BUS_HOTS": "broker.local"})
    assert str(err.value).startswith("environment variable MW_BUS_HOTS: unknown key [bus] hots")
    with pytest.raises(ConfigError) as err:
        load_config(env={"MW_VERIFIER_MAX_BATCH": "-3"})
    assert str(err.value) == (
        "environment variable MW_VERIFIER_MAX_BATCH ([verifier] max_batch): "
        "must be between 1 and 1024, got -3"
    )
    with pytest.raises(ConfigError, match="environment variable MW_NODE_OFFLINE"):
        load_config(env={"MW_NODE_OFFLINE": "sometimes"})
    # Variables outside the config's sections belong to other tools (tests, CI) and pass.
    assert load_config(env={"MW_FAULTS_FULL": "1", "MW_CONFIG": ""}) == Config()


def test_environment_values_are_typed_and_layered_under_flags() -> None:
    cfg = load_config(
        env={"MW_NODE_OFFLINE": "off", "MW_NODE_TEMPERATURE": "0.7", "MW_BUS_PORT": "1884"},
        overrides={"bus": {"port": 1885}},
    )
    assert cfg.node.offline is False and cfg.node.temperature == 0.7 and cfg.bus.port == 1885


def test_parse_setting_checks_one_value_without_saying_where() -> None:
    assert parse_setting("node", "temperature", "0.5") == 0.5
    with pytest.raises(ConfigError) as err:
        parse_setting("node", "temperature", "-5")
    assert str(err.value) == "must be between 0.0001 and 100, got -5"


def test_the_bounds_are_those_of_the_code_that_consumes_them() -> None:
    """A value the validator accepts is never refused later (after a connect or a model
    load): each section at its extremes builds the service configs."""
    from middleware.cli.services import policy_config, session_config
    from middleware.protocol.session import MODES
    from middleware.verifier.batcher import POLICIES

    for lo_hi in (
        {"temperature": "0.0001", "top_p": "0.0001", "threshold": "0", "max_new_tokens": "1"},
        {
            "temperature": "100",
            "top_p": "1",
            "top_k": str(1 << 20),
            "threshold": "0.9",
            "max_new_tokens": "32768",
            "seed": str(2**63 - 1),
            "min_draft": "256",
            "max_draft": "256",
        },
    ):
        n = load_config(env={f"MW_NODE_{k.upper()}": v for k, v in lo_hi.items()}).node
        session_config(n)
        policy_config(n)
    for mode in MODES:
        assert parse_setting("node", "mode", mode) == mode
    for policy in POLICIES:
        v = load_config(env={"MW_VERIFIER_BATCH_POLICY": policy}).verifier
        for window in ("0", "10000"):
            for max_batch in ("1", "1024"):
                cfg = load_config(
                    env={
                        "MW_VERIFIER_BATCH_POLICY": policy,
                        "MW_VERIFIER_BATCH_WINDOW_MS": window,
                        "MW_VERIFIER_PLANNED_MAX_WAIT_MS": window,
                        "MW_VERIFIER_MAX_BATCH": max_batch,
                        "MW_VERIFIER_RELAXED_LOSSY": "true",
                        "MW_VERIFIER_RELAXED_RATIO": "1",
                        "MW_VERIFIER_RELAXED_CONFIDENCE": "1",
                    }
                )
                verifier_config(cfg)
        assert v.batch_policy == policy


def test_journal_auto_is_systemds_state_directory_or_off() -> None:
    from middleware.cli.services import journal_file
    from middleware.config import NodeSection

    n = NodeSection(id="pi-7")
    assert journal_file(n, {"STATE_DIRECTORY": "/var/lib/mw/node-pi-7"}) == (
        "/var/lib/mw/node-pi-7/journal-pi-7.sqlite"
    )
    assert journal_file(n, {}) == ""  # a test or a shell: no journal across restarts
    assert journal_file(NodeSection(journal="/tmp/j.sqlite"), {}) == "/tmp/j.sqlite"


def test_brokers_come_from_a_toml_list_or_a_comma_separated_variable(tmp_path: Path) -> None:
    path = tmp_path / "mw.toml"
    path.write_text('[bus]\nbrokers = ["mq-1:1883", "mq-2"]\nfailover = true\n')
    assert load_config(path, env={}).bus.brokers == ("mq-1:1883", "mq-2")
    cfg = load_config(env={"MW_BUS_BROKERS": "mq-1:1883, [::1]:1884"})
    assert cfg.bus.brokers == ("mq-1:1883", "[::1]:1884")
