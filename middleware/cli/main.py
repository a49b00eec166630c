"""``mw-cli``: run the services and debug a fleet from the shell.

Exit codes:
  0  success
  1  runtime failure (a session failed, an output differed from the reference)
  2  usage or configuration error
  3  broker unreachable
  4  model could not be loaded
  130 interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import traceback
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

from middleware import __version__
from middleware.config import (
    Check,
    Config,
    at_least,
    identifier,
    load_config,
    model_spec,
    parse_setting,
)
from middleware.errors import BusError, ConfigError, ModelError, SessionError, TopicError
from middleware.logs import configure_logging

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_BROKER, EXIT_MODEL, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

EPILOG = """\
examples:
  mw-cli demo                                  # the whole system on this machine
  mw-cli verifier --model smollm2 --host broker.local
  mw-cli node --id pi-1 --drafter quant4:smollm2
  mw-cli tail session/123                      # every message of one session (any device)
  mw-cli tail device/pi-1/sessions             # every session of one device
  mw-cli tail device/pi-1 --json | jq .        # one JSON object per line
  mw-cli generate "What is MQTT?" --device pi-1
  mw-cli sessions                              # live table from the retained state
  mw-cli stats                                 # verifier and device figures
  mw-cli verifier --transport zmq --zmq-bind tcp://*:5555     # no broker: devices connect
  mw-cli bridge --zmq-endpoints tcp://v1:5555  # join MQTT devices and ZeroMQ verifiers

exit codes: 0 ok, 1 failure, 2 usage/config error, 3 broker unreachable,
            4 model error, 130 interrupted
"""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the flag (``mw-cli: --temperature: must be ...``),
    exit 2: what a systemd journal or a script's log shows, with no usage block around it."""

    def error(self, message: str) -> NoReturn:
        print(f"mw-cli: {message.removeprefix('argument ')}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def setting(section: str, key: str) -> Callable[[str], Any]:
    """A flag's argparse type: the value of ``[section] key``, checked by the same validator
    as the config file, so a bad flag is refused while parsing, before anything connects."""

    def parse(text: str) -> Any:
        try:
            return parse_setting(section, key, text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = key
    return parse


def checked(typ: type, check: Check) -> Callable[[str], Any]:
    """A flag's argparse type for flags that are not config keys (``--timeout``, ``--count``)."""

    def parse(text: str) -> Any:
        try:
            value = typ(text)
        except ValueError:
            kind = {int: "an integer", float: "a number"}.get(typ, typ.__name__)
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        problem = check(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = typ.__name__
    return parse


SECONDS = checked(float, lambda v: None if 0 < v < 1e9 else f"must be > 0 seconds, got {v:g}")
COUNT = checked(int, at_least(1))
PROMPT = checked(str, lambda v: None if v.strip() else "must not be empty")
# The tools give up connecting after min(--timeout, 10 s) (middleware/cli/tools.py).
CONNECT_HELP = "seconds to wait for the broker (default and at most 10)"


def _bus_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("bus")
    g.add_argument(
        "--config", help="TOML configuration file (default: $MW_CONFIG, /etc/mw/mw.toml)"
    )
    g.add_argument("--host", type=setting("bus", "host"), help="MQTT broker host")
    g.add_argument("--port", type=setting("bus", "port"), help="MQTT broker port")
    g.add_argument("--prefix", type=setting("bus", "prefix"), help="topic prefix (default mw/v1)")
    g.add_argument("--transport", choices=["mqtt", "zmq"], help="mqtt (broker) or zmq (no broker)")
    g.add_argument(
        "--zmq-endpoints",
        type=setting("bus", "zmq_endpoints"),
        help="zmq: verifier endpoints to connect to in turn, tcp://HOST:PORT[,...]",
    )
    g.add_argument(
        "--zmq-bind",
        type=setting("bus", "zmq_bind"),
        help="zmq: where a verifier binds (default tcp://*:5555)",
    )
    g.add_argument("--username", type=setting("bus", "username"))
    g.add_argument("--password", type=setting("bus", "password"))
    g.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    g.add_argument("--log-json", choices=["auto", "true", "false"])


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mw-cli",
        description="Distributed, lossless speculative decoding over MQTT.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mw-cli {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_: str, example: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _bus_flags(p)
        return p

    p = add(
        "demo",
        "Run broker, verifier and three devices on this machine and compare with the "
        "target model alone.",
        "mw-cli demo --prompts 6 --max-new-tokens 48",
    )
    p.add_argument("--prompts", type=COUNT, default=6, help="number of prompts (default 6)")
    p.add_argument("--max-new-tokens", type=setting("node", "max_new_tokens"), default=48)
    p.add_argument(
        "--broker",
        choices=["auto", "mosquitto", "zmq"],
        default="auto",
        help="auto: local Mosquitto if installed, else ZeroMQ (no broker)",
    )
    p.add_argument("--no-reference", action="store_true", help="skip the target-only comparison")
    p.add_argument(
        "--model", type=setting("verifier", "model"), help="target model spec (default smollm2)"
    )

    p = add(
        "verifier",
        "Run the verifier service (target model, batching, verdicts).",
        "mw-cli verifier --model smollm2 --metrics-port 9101",
    )
    p.add_argument("--id", dest="verifier_id", type=setting("verifier", "id"))
    p.add_argument("--model", type=setting("verifier", "model"))
    p.add_argument(
        "--device",
        dest="torch_device",
        type=setting("verifier", "device"),
        help="cpu, cuda, cuda:0 ...",
    )
    p.add_argument("--dtype", type=setting("verifier", "dtype"))
    p.add_argument("--batch-policy", choices=["adaptive", "fixed", "none", "planned"])
    p.add_argument("--batch-window-ms", type=setting("verifier", "batch_window_ms"))
    p.add_argument("--max-batch", type=setting("verifier", "max_batch"))
    p.add_argument("--metrics-port", type=setting("verifier", "metrics_port"))
    p.add_argument(
        "--shared",
        action="store_const",
        const=False,
        dest="exclusive",
        help="one of several verifiers on this prefix (scale-out): claim sessions through "
        "the shared open subscription and answer only those",
    )

    p = add(
        "node",
        "Run a device node: drafts locally, verifies through the verifier.",
        "mw-cli node --id pi-1 --drafter ngram --prompt 'What is MQTT?'",
    )
    p.add_argument("--id", dest="device_id", type=setting("node", "id"))
    p.add_argument(
        "--drafter",
        type=setting("node", "drafter"),
        help="ngram | llamacpp[@THREADS]:GGUF|smollm2 | hf:SPEC | quant4:SPEC | quant3:SPEC",
    )
    p.add_argument(
        "--tokenizer",
        type=setting("node", "tokenizer"),
        help="model spec whose tokenizer to use (default smollm2)",
    )
    p.add_argument("--mode", choices=["greedy", "coupled", "rejection"])
    p.add_argument("--seed", type=setting("node", "seed"))
    p.add_argument("--temperature", type=setting("node", "temperature"))
    p.add_argument("--top-k", type=setting("node", "top_k"))
    p.add_argument("--top-p", type=setting("node", "top_p"))
    p.add_argument("--max-new-tokens", type=setting("node", "max_new_tokens"))
    p.add_argument(
        "--prompt",
        type=PROMPT,
        action="append",
        default=[],
        help="generate for this prompt (repeatable)",
    )
    p.add_argument("--serve", action="store_true", help="keep serving the inbox after --prompt")
    p.add_argument(
        "--journal",
        type=setting("node", "journal"),
        help="SQLite journal path (resume sessions after a restart); '' off, auto: systemd's",
    )

    p = add(
        "bridge",
        "Relay the topic tree both ways between the MQTT broker and ZeroMQ verifiers.",
        "mw-cli bridge --host broker.local --zmq-endpoints tcp://v1:5555,tcp://v2:5555",
    )

    p = add(
        "tail",
        "Print messages of a session, a device, a verifier or everything.",
        "mw-cli tail session/123 --tokenizer smollm2",
    )
    p.add_argument(
        "spec",
        nargs="?",
        default="all",
        help="session/ID, session/DEVICE/ID[/LEAF], device/ID[/sessions], verifier/ID or all",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--raw", action="store_true", help="payloads as received")
    p.add_argument(
        "--type", action="append", default=[], help="only these message types (repeatable)"
    )
    p.add_argument(
        "--tokenizer",
        type=checked(str, model_spec),
        help="decode token ids with this model's tokenizer",
    )
    p.add_argument("--count", type=COUNT, help="exit after N messages")
    p.add_argument("--timeout", type=SECONDS, help="exit after S seconds (connecting included)")

    p = add("sessions", "Table of sessions from the retained state.", "mw-cli sessions --wait 1")
    p.add_argument("--wait", type=SECONDS, default=1.0, help="seconds to collect retained messages")
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=SECONDS, help=CONNECT_HELP)

    p = add("stats", "Verifier and device figures from their retained status.", "mw-cli stats")
    p.add_argument("--wait", type=SECONDS, default=1.0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=SECONDS, help=CONNECT_HELP)

    p = add(
        "generate",
        "Send a prompt to a device's inbox and stream the answer.",
        "mw-cli generate 'What is MQTT?' --device pi-1",
    )
    p.add_argument("prompt", type=PROMPT)
    p.add_argument("--device", required=True, type=checked(str, identifier), help="device id")
    p.add_argument("--session", type=checked(str, identifier), help="session id (default: random)")
    p.add_argument("--max-new-tokens", type=setting("node", "max_new_tokens"))
    p.add_argument(
        "--timeout",
        type=SECONDS,
        default=300.0,
        help="seconds to wait for the result (default 300); connecting: at most 10 of them",
    )

    p = add(
        "decommission",
        "Remove a device: clear its Home Assistant discovery configs and retained status.",
        "mw-cli decommission pi-1",
    )
    p.add_argument("device", type=checked(str, identifier), help="device id")
    p.add_argument("--timeout", type=SECONDS, help=CONNECT_HELP)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    a = vars(args)
    overrides: dict[str, dict[str, Any]] = {
        "bus": {
            "host": a.get("host"),
            "port": a.get("port"),
            "prefix": a.get("prefix"),
            "transport": a.get("transport"),
            "zmq_endpoints": a.get("zmq_endpoints"),
            "zmq_bind": a.get("zmq_bind"),
            "username": a.get("username"),
            "password": a.get("password"),
        },
        "log": {"level": a.get("log_level"), "json": a.get("log_json")},
        "verifier": {
            "id": a.get("verifier_id"),
            "model": a.get("model"),
            "device": a.get("torch_device"),
            "dtype": a.get("dtype"),
            "batch_policy": a.get("batch_policy"),
            "batch_window_ms": a.get("batch_window_ms"),
            "max_batch": a.get("max_batch"),
            "metrics_port": a.get("metrics_port"),
            "exclusive": a.get("exclusive"),
        },
        "node": {
            "id": a.get("device_id"),
            "drafter": a.get("drafter"),
            "tokenizer": a.get("tokenizer"),
            "mode": a.get("mode"),
            "seed": a.get("seed"),
            "temperature": a.get("temperature"),
            "top_k": a.get("top_k"),
            "top_p": a.get("top_p"),
            "max_new_tokens": a.get("max_new_tokens") if args.command == "node" else None,
            "journal": a.get("journal"),
        },
    }
    return load_config(a.get("config"), overrides=overrides)


def _command(name: str) -> Callable[[Config, argparse.Namespace], Coroutine[Any, Any, int]]:
    """The coroutine of one command, importing only its module.

    The demo (and the verifier inside services) import torch; a device or tools install
    has no torch, and importing it costs 2.9 s of `mw-cli sessions`' 4.4 s start-up.
    """
    if name == "demo":
        from middleware.cli import demo

        return demo.run
    if name in ("tail", "sessions", "stats", "generate", "decommission"):
        from middleware.cli import tools

        return getattr(tools, name)
    from middleware.cli import services

    return {
        "verifier": services.run_verifier,
        "node": services.run_node,
        "bridge": services.run_bridge,
    }[name]


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_leaf(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group.exceptions[0]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    try:
        cfg = config_from_args(args)
        json_logs = {"auto": None, "true": True, "false": False}.get(cfg.log.json)
        level = cfg.log.level
        if args.command == "demo" and not args.log_level:
            level = "warning"  # the demo shows its own progress; service logs would drown it
        configure_logging(json=json_logs, level=level)
        try:
            return asyncio.run(_command(args.command)(cfg, args))
        except BaseExceptionGroup as group:  # a TaskGroup failed: report its first real cause
            raise _first_leaf(group) from group
    except asyncio.CancelledError:  # SIGTERM (systemctl stop): a clean, deliberate stop
        services = sys.modules.get("middleware.cli.services")
        if services is None or services.stop_requested():
            return EXIT_OK
        print("mw-cli: fatal: cancelled without a stop request", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ConfigError, TopicError) as exc:
        print(f"mw-cli: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BusError as exc:
        print(f"mw-cli: broker unreachable: {exc}", file=sys.stderr)
        return EXIT_BROKER
    except ModelError as exc:
        print(f"mw-cli: model error: {exc}", file=sys.stderr)
        return EXIT_MODEL
    except SessionError as exc:
        print(f"mw-cli: session {exc.session_id}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except Exception as exc:  # a task crashed (a bug): non-zero, so systemd restarts us
        traceback.print_exception(exc, file=sys.stderr)
        print(f"mw-cli: fatal: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
