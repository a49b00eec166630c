"""The production broker setup (deploy/mosquitto) enforced by a real Mosquitto.

The module renders ``mosquitto.prod.conf`` into a temp dir (paths and port
rewritten, nothing else), creates the CA and server certificate with
``make-test-ca.sh``, bootstraps the dynamic-security plugin's state file with
``provision-device.sh -r admin``, starts the broker and provisions every user
on the running broker with ``provision-device.sh`` (mosquitto_ctrl as the
admin: password, role, client certificate).  The edge broker's users are
written with ``provision-device.sh -f`` (password file and acl file).  Every
client of the central broker connects over TLS with the generated CA.

Absence checks use a sentinel instead of a wait: a forbidden message is
published before a permitted one from the same or an earlier-acknowledged
publisher, and the observer reads until the sentinel arrives.  Mosquitto
queues messages to one subscriber in the order it processed them, so a
forbidden message that got through would arrive before the sentinel.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from middleware.broker_bridge.bus import BusMessage, Subscription, Will
from middleware.broker_bridge.mqtt import MqttBus, MqttSettings, TlsSettings
from middleware.errors import BusError
from middleware.mosquitto import free_port, mosquitto_binary, wait_for_port
from middleware.nodes.drafters import make_drafter
from middleware.nodes.service import NodeConfig, NodeService
from middleware.nodes.service import offline_status_payload as device_will
from middleware.nodes.session import SessionConfig
from middleware.protocol import PromptRequest, Result, Topics, decode
from middleware.protocol.topics import SESSION_LEAVES
from middleware.verifier.engine import TargetEngine
from middleware.verifier.reference import reference_greedy
from middleware.verifier.service import VerifierConfig, VerifierService
from middleware.verifier.service import offline_status_payload as verifier_will
from tests.unit.tiny import EOS, TinyTokenizer, tiny_llama

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto"
T = Topics("mw/v1")  # the ACL is written for the default prefix
ROLES = {
    "pi-a": "device",
    "pi-b": "device",
    "pi-e": "device",
    "verifier-1": "verifier",
    "monitor": "monitor",
    "watch": "monitor",  # a second reader: the client id is the username, one connection each
    "ops": "operator",
    "site-1": "bridge",
    "relay-1": "relay",
}
EDGE_ROLES = {"pi-e": "device"}  # users of the edge broker (bridge-edge.conf, acl_file)
ADMIN = "admin"  # the dynamic-security admin (mosquitto_ctrl)
PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"  # as in mosquitto.prod.conf
WAIT = 10.0  # upper bound for a message that must arrive (never reached when all is well)


def password(user: str) -> str:
    return f"{user}-pw-0123"


def dynsec_plugin() -> str | None:
    """The plugin's path on this machine (the multiarch directory differs on a Pi)."""
    found = sorted(glob.glob("/usr/lib/*/mosquitto_dynamic_security.so"))
    found += glob.glob("/usr/lib/mosquitto_dynamic_security.so")
    return found[0] if found else None


def _require_tools() -> str:
    binary = mosquitto_binary()
    missing = [
        name
        for name, path in (
            ("mosquitto", binary),
            ("openssl", shutil.which("openssl")),
            ("mosquitto_passwd", shutil.which("mosquitto_passwd")),
            ("mosquitto_ctrl", shutil.which("mosquitto_ctrl")),
            ("mosquitto_rr", shutil.which("mosquitto_rr")),
            ("mosquitto_dynamic_security.so", dynsec_plugin()),
            ("bash", shutil.which("bash")),
        )
        if path is None
    ]
    if missing:
        reason = (
            f"secured-broker tests need {', '.join(missing)}"
            " (apt-get install mosquitto mosquitto-clients openssl)"
        )
        if os.environ.get("CI") or os.environ.get("MW_REQUIRE_BROKER"):
            pytest.fail(reason)
        pytest.skip(reason)
    assert binary is not None
    return binary


def _sh(*args: str | Path) -> str:
    done = subprocess.run(["bash", *map(str, args)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, (
        f"{args[0]} failed ({done.returncode}):\n{done.stderr}{done.stdout}"
    )
    return done.stdout


def render(template: Path, replacements: dict[str, str], extra: str = "") -> str:
    """``template`` with each key replaced; a key that no longer occurs is an error
    (the deploy file changed and this test would silently test something else)."""
    text = template.read_text()
    for old, new in replacements.items():
        assert old in text, f"{template.name} no longer contains {old!r}"
        text = text.replace(old, new)
    if os.geteuid() == 0:
        # As root Mosquitto would switch to the "mosquitto" user, which cannot
        # read the test's private temp dir; "root" keeps the current user.
        text += "\nuser root\n"
    return text + extra


@dataclass
class Broker:
    """A Mosquitto process started from a rendered config file."""

    conf: Path
    port: int
    binary: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.conf.with_suffix(".log")

    def start(self) -> Broker:
        with self.log.open("ab") as log:
            self.proc = proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if not wait_for_port("127.0.0.1", self.port, 10.0, alive=lambda: proc.poll() is None):
            self.stop()
            raise AssertionError(f"mosquitto did not start:\n{self.log.read_text()}")
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class Secure:
    """The secured central broker and the files the scripts made for it."""

    dir: Path
    broker: Broker

    @property
    def port(self) -> int:
        return self.broker.port

    def tls(self, user: str | None, ca: Path | None = None) -> TlsSettings:
        """TLS with ``user``'s client certificate (None: no client certificate)."""
        ca_file = str(ca or self.dir / "ca.crt")
        if user is None:
            return TlsSettings(ca_file=ca_file)
        client = self.dir / "clients" / user
        return TlsSettings(
            ca_file=ca_file,
            cert_file=str(client / f"{user}.crt"),
            key_file=str(client / f"{user}.key"),
        )

    def settings(self, user: str | None, **overrides: Any) -> MqttSettings:
        """Settings for ``user`` (its password and certificate); ``overrides`` win."""
        base: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.port,
            "username": user,
            "password": password(user) if user else None,
            "tls": self.tls(user or "pi-a"),
            "connect_timeout": 10.0,
            "request_timeout": 10.0,
        }
        base.update(overrides)
        return MqttSettings(**base)


def provision(d: Path, user: str, role: str, *extra: str | Path) -> str:
    """``provision-device.sh`` as an operator runs it (``-p`` only to know the password)."""
    return _sh(
        DEPLOY / "provision-device.sh", "-d", d, "-r", role, "-p", password(user), *extra, user
    )


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    binary = _require_tools()
    d = tmp_path_factory.mktemp("mw-secure")
    _sh(DEPLOY / "make-test-ca.sh", "-d", d)
    (d / "data").mkdir()
    # Bootstrap: the plugin's state file with the admin, before the broker's first start.
    provision(d, ADMIN, "admin", "-a", ADMIN, "-s", d / "data" / "dynamic-security.json")
    port = free_port()
    conf = d / "mosquitto.conf"
    conf.write_text(
        render(
            DEPLOY / "mosquitto.prod.conf",
            {
                f"\nplugin {PLUGIN}\n": f"\nplugin {dynsec_plugin()}\n",
                "/etc/mosquitto/mw/": f"{d}/",
                "/var/lib/mosquitto/": f"{d}/data/",
                "\nlistener 8883\n": f"\nlistener {port} 127.0.0.1\n",
            },
        )
    )
    broker = Broker(conf, port, binary).start()
    try:
        # Every user is added to the running broker, as in a live fleet.
        for user, role in ROLES.items():
            provision(d, user, role, "-B", f"127.0.0.1:{port}")
        # The edge broker keeps a password file and an acl file (bridge-edge.conf).
        shutil.copy(DEPLOY / "acl", d / "acl")
        for user, role in EDGE_ROLES.items():
            provision(d, user, role, "-f")
        yield Secure(d, broker)
    finally:
        broker.stop()


@contextlib.asynccontextmanager
async def connected(settings: MqttSettings) -> AsyncIterator[MqttBus]:
    async with MqttBus(settings) as bus:
        yield bus


async def until(sub: Subscription, payload: bytes) -> list[BusMessage]:
    """Messages received up to and including the one with ``payload``."""
    got: list[BusMessage] = []
    while not got or got[-1].payload != payload:
        got.append(await sub.get(WAIT))
    return got


async def publish_outcome(bus: MqttBus, topic: str, payload: bytes) -> str:
    """'allowed' (PUBACK success) or 'denied' (PUBACK 0x87 not authorized)."""
    try:
        await bus.publish(topic, payload, qos=1)
    except BusError as exc:
        if "not authorized" in str(exc).lower():
            return "denied"
        raise
    return "allowed"


# --- authentication and TLS ---------------------------------------------------------
async def _refused(settings: MqttSettings) -> BusError:
    bus = MqttBus(settings)
    try:
        with pytest.raises(BusError) as info:
            await bus.connect()
    finally:
        await bus.close()
    return info.value


async def test_anonymous_client_is_refused(secure: Secure) -> None:
    err = await _refused(secure.settings(None))  # valid client certificate, no credentials
    assert "not authorized" in str(err).lower()


async def test_wrong_password_is_refused(secure: Secure) -> None:
    err = await _refused(secure.settings("pi-a", password="not-the-password"))
    assert "not authorized" in str(err).lower() or "bad user name or password" in str(err).lower()


async def test_unknown_user_is_refused(secure: Secure) -> None:
    err = await _refused(secure.settings("pi-z", password=password("pi-a"), tls=secure.tls("pi-a")))
    assert "not authorized" in str(err).lower() or "bad user name or password" in str(err).lower()


async def test_tls_is_required(secure: Secure) -> None:
    """Plain MQTT on the TLS port never gets a CONNACK (right credentials, no TLS)."""
    await _refused(secure.settings("pi-a", tls=None, connect_timeout=1.0))


async def test_client_certificate_is_required(secure: Secure) -> None:
    await _refused(secure.settings("pi-a", tls=secure.tls(None), connect_timeout=1.0))


async def test_broker_certificate_must_chain_to_the_configured_ca(secure: Secure) -> None:
    other = secure.dir / "other-ca"
    await asyncio.to_thread(_sh, DEPLOY / "make-test-ca.sh", "-d", other)
    tls = TlsSettings(
        ca_file=str(other / "ca.crt"),
        cert_file=secure.tls("pi-a").cert_file,
        key_file=secure.tls("pi-a").key_file,
    )
    await _refused(secure.settings("pi-a", tls=tls, connect_timeout=1.0))


async def test_tls_connection_with_the_generated_ca(secure: Secure) -> None:
    async with (
        connected(secure.settings("monitor")) as mon,
        connected(secure.settings("pi-a")) as dev,
    ):
        async with mon.subscribe(T.device_status("pi-a")) as sub:
            await dev.publish(T.device_status("pi-a"), b"tls-hello", qos=1)
            msgs = await until(sub, b"tls-hello")
    assert dev.is_connected is False  # closed cleanly on leaving the block
    assert msgs[-1].topic == T.device_status("pi-a")


# --- provisioning on the running broker ------------------------------------------------
def saved_clients(secure: Secure) -> dict[str, list[str]]:
    """Username -> role names, as the plugin saved them in its state file."""
    state = json.loads((secure.dir / "data" / "dynamic-security.json").read_text())
    return {c["username"]: [r["rolename"] for r in c.get("roles", [])] for c in state["clients"]}


async def test_provisioning_is_live_saved_rebuilt_and_revocable(secure: Secure) -> None:
    """A device added to the running broker connects at once (no reload); the plugin saved
    it (it survives a broker restart); re-provisioning with another role leaves none of the
    old rights; revoking refuses its next CONNECT."""
    d, target = secure.dir, f"127.0.0.1:{secure.port}"
    await asyncio.to_thread(provision, d, "pi-n", "device", "-B", target)
    async with connected(secure.settings("pi-n")) as dev:
        assert await publish_outcome(dev, T.session("pi-n", "pi-n-1", "open"), b"n") == ALLOWED
    assert saved_clients(secure)["pi-n"] == ["mw-pi-n"]
    await asyncio.to_thread(secure.broker.stop)
    await asyncio.to_thread(secure.broker.start)
    async with connected(secure.settings("pi-n")) as dev:
        assert await publish_outcome(dev, T.session("pi-n", "pi-n-1", "open"), b"n") == ALLOWED
    await asyncio.to_thread(provision, d, "pi-n", "monitor", "-B", target)
    async with connected(secure.settings("pi-n")) as mon:
        assert await publish_outcome(mon, T.session("pi-n", "pi-n-1", "open"), b"n") == DENIED
        assert await subscribe_outcome(mon, "mw/v1/#") == ALLOWED
    await asyncio.to_thread(
        _sh, DEPLOY / "provision-device.sh", "-d", d, "-D", "-B", target, "pi-n"
    )
    err = await _refused(secure.settings("pi-n"))
    assert "not authorized" in str(err).lower() or "bad user name or password" in str(err).lower()
    assert "pi-n" not in saved_clients(secure)


class RawClient:
    """A plain paho client over TLS: it sees whatever the broker delivers, also on
    subscriptions kept in its persistent session that MqttBus would not route."""

    def __init__(self, secure: Secure, user: str) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.got: list[tuple[str, bytes]] = []
        self.subacks: list[list[int]] = []
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        c = self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=user, protocol=paho.MQTTv5
        )
        c.username_pw_set(user, password(user))
        tls = secure.tls(user)
        c.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file)
        c.on_connect = lambda *a: self.connected.set()
        c.on_message = lambda _c, _u, m: self.got.append((m.topic, m.payload))

        def on_subscribe(_c: Any, _u: Any, _mid: int, codes: list[Any], _p: Any) -> None:
            self.subacks.append([code.value for code in codes])
            self.subscribed.set()

        c.on_subscribe = on_subscribe
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 120
        c.connect("127.0.0.1", secure.port, clean_start=False, properties=props)
        c.loop_start()
        assert self.connected.wait(WAIT)

    def subscribe(self, filter_: str) -> int:
        self.subscribed.clear()
        self.client.subscribe(filter_, qos=1)
        assert self.subscribed.wait(WAIT)
        return self.subacks[-1][0]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def test_a_subscription_kept_from_earlier_rights_delivers_nothing(secure: Secure) -> None:
    """Default deny on delivery: a subscription granted under earlier rights and kept in a
    persistent session (a role change, a broker migrated from acl_file) is not refused
    again at reconnect, but the plugin checks each delivery against the current role."""
    d, target = secure.dir, f"127.0.0.1:{secure.port}"
    await asyncio.to_thread(provision, d, "pi-s", "monitor", "-B", target)
    raw = await asyncio.to_thread(RawClient, secure, "pi-s")
    try:
        assert await asyncio.to_thread(raw.subscribe, "mw/v1/#") < 0x80  # granted, QoS 1
    finally:
        await asyncio.to_thread(raw.close)
    await asyncio.to_thread(provision, d, "pi-s", "device", "-B", target)  # now a device
    raw = await asyncio.to_thread(RawClient, secure, "pi-s")  # same session, no SUBSCRIBE
    try:
        async with connected(secure.settings("pi-b")) as pi_b:
            await pi_b.publish(T.device_status("pi-b"), b"stale-b", qos=1)
        async with connected(secure.settings("verifier-1")) as ver:
            await ver.publish(T.session("pi-s", "pi-s-1", "verdict"), b"own-verdict", qos=1)
        for _ in range(int(WAIT / 0.05)):  # its own verdict is delivered: the session held
            if (T.session("pi-s", "pi-s-1", "verdict"), b"own-verdict") in raw.got:
                break
            await asyncio.sleep(0.05)
    finally:
        await asyncio.to_thread(raw.close)
        await asyncio.to_thread(
            _sh, DEPLOY / "provision-device.sh", "-d", d, "-D", "-B", target, "pi-s"
        )
    payloads = [p for _, p in raw.got]
    assert b"own-verdict" in payloads
    assert b"stale-b" not in payloads


def provision_failure(*args: str | Path) -> str:
    """``provision-device.sh ARGS`` that must fail: its stderr."""
    done = subprocess.run(
        ["bash", str(DEPLOY / "provision-device.sh"), *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0, f"provision-device.sh {args} succeeded:\n{done.stdout}"
    return done.stderr


async def test_provisioning_refuses_a_broker_it_cannot_administer(secure: Secure) -> None:
    """mosquitto_ctrl exits 0 on a refused login or an error answer; the script must not
    report success then (here: a wrong admin password)."""
    d, target = secure.dir, f"127.0.0.1:{secure.port}"
    fake = d / "fake-admin"
    shutil.copytree(d / "clients" / ADMIN, fake / "clients" / ADMIN)
    (fake / "clients" / ADMIN / "password").write_text("wrong-password-1\n")
    shutil.copy(d / "ca.crt", fake / "ca.crt")
    shutil.copy(d / "ca.key", fake / "ca.key")
    err = await asyncio.to_thread(
        provision_failure, "-d", fake, "-p", password("pi-x"), "-B", target, "pi-x"
    )
    assert "not authorized" in err.lower()
    assert "pi-x" not in saved_clients(secure)
    # Provisioning the admin's name as a client would lock the admin out: refused.
    err = await asyncio.to_thread(
        provision_failure, "-d", d, "-p", password(ADMIN), "-B", target, ADMIN
    )
    assert "dynamic-security admin" in err
    assert saved_clients(secure)[ADMIN] == ["admin"]


# --- authorization: who may publish what -----------------------------------------------
ALLOWED, DENIED = "allowed", "denied"
CONTROL = "$CONTROL/dynamic-security/v1"  # the plugin's command topic (mosquitto_ctrl)
PUBLISH_RIGHTS: list[tuple[str, str, str]] = [
    # a device: its sessions' device-side leaves and its own status ...
    ("pi-a", T.session("pi-a", "pi-a-1", "open"), ALLOWED),
    ("pi-a", T.session("pi-a", "pi-a-1", "draft"), ALLOWED),
    ("pi-a", T.session("pi-a", "pi-a-1", "text"), ALLOWED),
    ("pi-a", T.session("pi-a", "pi-a-1", "result"), ALLOWED),
    ("pi-a", T.device_status("pi-a"), ALLOWED),
    # ... never verdicts or state, not even for its own sessions ...
    ("pi-a", T.session("pi-a", "pi-a-1", "verdict"), DENIED),
    ("pi-a", T.session("pi-a", "pi-a-1", "state"), DENIED),
    ("pi-a", T.session("pi-b", "pi-b-1", "verdict"), DENIED),
    # ... nothing of another device, no inbox (not even its own), no verifier status.
    ("pi-a", T.device_inbox("pi-b"), DENIED),
    ("pi-a", T.device_status("pi-b"), DENIED),
    ("pi-a", T.device_inbox("pi-a"), DENIED),
    ("pi-a", T.verifier_status("verifier-1"), DENIED),
    ("pi-a", T.verifier_status("pi-a"), DENIED),
    # ... and no session leaf of another device's sessions (the device level of the topic).
    ("pi-a", T.session("pi-b", "pi-b-1", "text"), DENIED),
    ("pi-a", T.session("pi-b", "pi-b-1", "open"), DENIED),
    ("pi-a", T.session("pi-b", "pi-b-1", "draft"), DENIED),
    ("pi-a", T.session("pi-b", "pi-b-1", "result"), DENIED),
    # a verifier: verdict, state and its own status only
    ("verifier-1", T.session("pi-a", "pi-a-1", "verdict"), ALLOWED),
    ("verifier-1", T.session("pi-a", "pi-a-1", "state"), ALLOWED),
    ("verifier-1", T.verifier_status("verifier-1"), ALLOWED),
    ("verifier-1", T.verifier_status("verifier-2"), DENIED),
    ("verifier-1", T.session("pi-a", "pi-a-1", "open"), DENIED),
    ("verifier-1", T.session("pi-a", "pi-a-1", "draft"), DENIED),
    ("verifier-1", T.session("pi-a", "pi-a-1", "result"), DENIED),
    ("verifier-1", T.device_inbox("pi-a"), DENIED),
    ("verifier-1", T.device_status("verifier-1"), DENIED),  # no device rights under its name
    # the monitor is read-only, also under its own name
    ("monitor", T.device_status("monitor"), DENIED),
    ("monitor", T.session("pi-a", "pi-a-1", "text"), DENIED),
    ("monitor", T.device_inbox("pi-a"), DENIED),
    ("monitor", T.verifier_status("monitor"), DENIED),
    # the operator sends prompts and nothing else
    ("ops", T.device_inbox("pi-a"), ALLOWED),
    ("ops", T.session("pi-a", "pi-a-1", "verdict"), DENIED),
    ("ops", T.device_status("ops"), DENIED),
    # the MQTT<->ZeroMQ bridge relays the whole tree both ways, nothing outside it.  (Under
    # acl_file it was denied its own device subtree, only to cancel the device `pattern`
    # lines every user got; the plugin has no such lines, and usernames are unique.)
    ("relay-1", T.session("pi-a", "pi-a-1", "draft"), ALLOWED),
    ("relay-1", T.session("pi-a", "pi-a-1", "verdict"), ALLOWED),
    ("relay-1", T.device_inbox("pi-a"), ALLOWED),
    ("relay-1", "mw/v2/device/pi-a/status", DENIED),
    # only the admin sends commands to the dynamic-security plugin
    ("pi-a", CONTROL, DENIED),
    ("ops", CONTROL, DENIED),
    ("relay-1", CONTROL, DENIED),
]


async def test_publish_rights_per_role(secure: Secure) -> None:
    users = sorted({u for u, _, _ in PUBLISH_RIGHTS})
    async with contextlib.AsyncExitStack() as stack:
        mon = await stack.enter_async_context(connected(secure.settings("watch")))
        watch = await stack.enter_async_context(mon.subscribe("mw/v1/#"))
        buses = {u: await stack.enter_async_context(connected(secure.settings(u))) for u in users}
        outcomes = {
            (u, t): await publish_outcome(buses[u], t, f"probe {u} {t}".encode())
            for u, t, _ in PUBLISH_RIGHTS
        }
        assert outcomes == {(u, t): want for u, t, want in PUBLISH_RIGHTS}
        # Denied publishes were dropped by the broker, not just answered with 0x87:
        # the monitor (read access to everything) saw exactly the allowed ones.
        await buses["pi-a"].publish(T.device_status("pi-a"), b"sentinel-publish", qos=1)
        seen = [
            m.payload
            for m in await until(watch, b"sentinel-publish")
            if m.payload.startswith(b"probe ")
        ]
    assert sorted(seen) == sorted(
        f"probe {u} {t}".encode() for u, t, want in PUBLISH_RIGHTS if want == ALLOWED
    )


async def test_a_device_cannot_read_another_devices_inbox(secure: Secure) -> None:
    async with (
        connected(secure.settings("ops")) as ops,
        connected(secure.settings("pi-a")) as pi_a,
        connected(secure.settings("pi-b")) as pi_b,
    ):
        async with pi_b.subscribe(T.device_inbox("pi-b")) as b_inbox:
            # One filter over every inbox: refused at SUBSCRIBE (the plugin; acl_file
            # granted it and filtered each delivery by the reader's ACL).
            with pytest.raises(BusError, match="refused subscription"):
                await pi_a.subscribe("mw/v1/device/+/inbox")
            async with pi_a.subscribe(T.device_inbox("pi-a")) as a_inbox:
                await ops.publish(T.device_inbox("pi-b"), b"for pi-b only", qos=1)
                await ops.publish(T.device_inbox("pi-a"), b"sentinel-inbox", qos=1)
                got_a = await until(a_inbox, b"sentinel-inbox")
                got_b = await until(b_inbox, b"for pi-b only")  # it was delivered to its owner
    assert [m.topic for m in got_a] == [T.device_inbox("pi-a")]
    assert got_b[-1].topic == T.device_inbox("pi-b")


async def test_a_device_reads_nothing_of_another_device(secure: Secure) -> None:
    """Reads outside the device role (other devices' status, drafts, opens, verdicts, state)
    never arrive: ``mw/v1/#`` is refused, and the filters it may hold carry none of them."""
    async with (
        connected(secure.settings("pi-a")) as pi_a,
        connected(secure.settings("pi-b")) as pi_b,
    ):
        with pytest.raises(BusError, match="refused subscription"):
            await pi_a.subscribe("mw/v1/#")
        async with pi_a.subscribe() as mine:
            for f in (
                T.device_sessions("pi-a", "verdict"),
                T.device_sessions("pi-a", "state"),
                T.device_inbox("pi-a"),
                T.all_verifier_status(),
            ):
                await mine.add(f)
            await pi_b.publish(T.device_status("pi-b"), b"pi-b status", qos=1)
            await pi_b.publish(T.session("pi-b", "pi-b-7", "draft"), b"pi-b draft", qos=1)
            await pi_b.publish(T.session("pi-b", "pi-b-7", "open"), b"pi-b open", qos=1)
            async with connected(secure.settings("verifier-1")) as ver:
                await ver.publish(T.session("pi-b", "pi-b-7", "verdict"), b"pi-b verdict", qos=1)
                await ver.publish(T.session("pi-b", "pi-b-7", "state"), b"pi-b state", qos=1)
                # ... while its own session's verdicts do arrive (and end the wait)
                await ver.publish(T.session("pi-a", "pi-a-7", "verdict"), b"sentinel-read", qos=1)
            got = await until(mine, b"sentinel-read")
    assert [m.payload for m in got if m.payload.startswith(b"pi-b")] == []
    assert got[-1].topic == T.session("pi-a", "pi-a-7", "verdict")


# --- authorization: who may subscribe to what (refused at SUBSCRIBE) ---------------------
SUBSCRIBE_RIGHTS: list[tuple[str, str, str]] = [
    # a device: its own sessions' verdict/state, its inbox, every verifier's status ...
    ("pi-a", T.device_sessions("pi-a", "verdict"), ALLOWED),
    ("pi-a", T.session("pi-a", "pi-a-1", "state"), ALLOWED),
    ("pi-a", T.device_inbox("pi-a"), ALLOWED),
    ("pi-a", T.all_verifier_status(), ALLOWED),
    ("pi-a", T.verifier_status("verifier-1"), ALLOWED),
    # ... not what it writes itself, no wider filter, no share group, nothing of the broker
    ("pi-a", T.session("pi-a", "pi-a-1", "open"), DENIED),
    ("pi-a", T.device_sessions("pi-a", "#"), DENIED),
    ("pi-a", T.device_status("pi-a"), DENIED),
    ("pi-a", T.all_sessions("verdict"), DENIED),
    ("pi-a", "mw/v1/#", DENIED),
    ("pi-a", "#", DENIED),
    ("pi-a", T.shared_open(), DENIED),
    ("pi-a", "$share/mw-verifiers/mw/v1/session/pi-a/+/verdict", DENIED),
    ("pi-a", "$SYS/#", DENIED),
    ("pi-a", "$CONTROL/dynamic-security/#", DENIED),
    # a verifier: opens (plain or in any share group) and drafts of every session
    ("verifier-1", T.shared_open(), ALLOWED),
    ("verifier-1", T.shared_open("mw-verifiers-big"), ALLOWED),
    ("verifier-1", T.all_sessions("open"), ALLOWED),
    ("verifier-1", T.all_sessions("draft"), ALLOWED),
    ("verifier-1", T.session("pi-a", "pi-a-1", "draft"), ALLOWED),
    ("verifier-1", "$share/mw-verifiers/mw/v1/session/+/+/draft", DENIED),
    ("verifier-1", T.all_sessions("verdict"), DENIED),
    ("verifier-1", T.device_inbox("pi-a"), DENIED),
    ("verifier-1", "mw/v1/#", DENIED),
    # readers see the whole tree but never join a share group
    ("monitor", "mw/v1/#", ALLOWED),
    ("monitor", "$SYS/#", ALLOWED),
    ("monitor", "homeassistant/#", ALLOWED),
    ("monitor", T.shared_open(), DENIED),
    ("monitor", "#", DENIED),
    ("ops", "mw/v1/#", ALLOWED),
    ("ops", T.shared_open(), DENIED),
    # an edge broker's uplink: what comes back to its devices
    ("site-1", T.all_sessions("verdict"), ALLOWED),
    ("site-1", "mw/v1/device/+/inbox", ALLOWED),
    ("site-1", T.all_sessions("open"), DENIED),
    ("site-1", T.shared_open(), DENIED),
    ("relay-1", "mw/v1/#", ALLOWED),
    ("relay-1", T.shared_open(), DENIED),
]


async def subscribe_outcome(bus: MqttBus, filter_: str) -> str:
    """'allowed' (SUBACK with a QoS) or 'denied' (SUBACK 0x87 not authorized)."""
    try:
        async with bus.subscribe(filter_):
            pass
    except BusError as exc:
        if "refused subscription" in str(exc):
            return "denied"
        raise
    return "allowed"


async def test_subscribe_rights_per_role(secure: Secure) -> None:
    users = sorted({u for u, _, _ in SUBSCRIBE_RIGHTS})
    async with contextlib.AsyncExitStack() as stack:
        buses = {u: await stack.enter_async_context(connected(secure.settings(u))) for u in users}
        outcomes = {(u, f): await subscribe_outcome(buses[u], f) for u, f, _ in SUBSCRIBE_RIGHTS}
    assert outcomes == {(u, f): want for u, f, want in SUBSCRIBE_RIGHTS}


@pytest.mark.parametrize("leaf", [*SESSION_LEAVES, "#"])
async def test_a_device_cannot_subscribe_to_another_devices_session_topics(
    secure: Secure, leaf: str
) -> None:
    """Issue 14: refused at SUBSCRIBE, one session or all of them; the owner may read
    its own verdicts and state."""
    one = f"mw/v1/session/pi-b/pi-b-1/{leaf}"
    every = T.device_sessions("pi-b", leaf)  # type: ignore[arg-type]
    async with connected(secure.settings("pi-a")) as pi_a:
        outcomes = [await subscribe_outcome(pi_a, f) for f in (one, every)]
    assert outcomes == [DENIED, DENIED]
    if leaf in ("verdict", "state"):
        async with connected(secure.settings("pi-b")) as pi_b:
            assert [await subscribe_outcome(pi_b, f) for f in (one, every)] == [ALLOWED, ALLOWED]


async def test_a_last_will_cannot_speak_for_another_device(secure: Secure) -> None:
    """Mosquitto accepts any will topic at CONNECT but checks it when it publishes the will."""
    async with (
        connected(secure.settings("monitor")) as mon,
        mon.subscribe("mw/v1/device/+/status") as watch,
    ):
        got: list[BusMessage] = []
        for topic, will in (
            (T.device_status("pi-b"), b"forged-will"),
            (T.device_status("pi-a"), b"own-will"),
        ):
            bus = MqttBus(
                secure.settings(
                    "pi-a", client_id="pi-a-will", will=Will(topic, will, qos=1, retain=False)
                )
            )
            await bus.connect()
            bus.crash()  # gone without DISCONNECT: the broker publishes the will if allowed
            # The same client id again: the broker has ended the old connection
            # (and decided about its will) before it accepts this one.
            async with connected(secure.settings("pi-a", client_id="pi-a-will")) as again:
                await again.publish(T.device_status("pi-a"), b"sentinel-" + will, qos=1)
            got += await until(watch, b"sentinel-" + will)
    # The allowed will arrives before its sentinel: the ordering the check relies on holds.
    assert [m.payload for m in got if m.payload in (b"forged-will", b"own-will")] == [b"own-will"]


# --- the system under the secured configuration -----------------------------------------
async def test_generation_end_to_end_over_the_secured_broker(secure: Secure) -> None:
    """Verifier and an n-gram device as their own users over TLS; output equals target-only."""
    target = tiny_llama(seed=0)
    prompts = {"pi-a-s1": [1, 5, 9, 13], "pi-a-s2": [1, 7, 7, 7, 3, 22, 40]}
    max_new = 16
    vbus = MqttBus(
        secure.settings(
            "verifier-1",
            client_id="mw-verifier-verifier-1",
            will=Will(
                T.verifier_status("verifier-1"), verifier_will("verifier-1"), qos=1, retain=True
            ),
        )
    )
    dbus = MqttBus(
        secure.settings(
            "pi-a",
            client_id="mw-node-pi-a",
            clean_start=False,
            session_expiry=60,
            will=Will(T.device_status("pi-a"), device_will("pi-a"), qos=1, retain=True, delay=1.0),
        )
    )
    async with vbus, dbus, connected(secure.settings("ops")) as ops:
        verifier = VerifierService(
            vbus,
            TargetEngine(target),
            tokenizer_fingerprint="tiny",
            config=VerifierConfig(verifier_id="verifier-1"),
        )
        node = NodeService(
            dbus,
            tokenizer=TinyTokenizer(),
            tokenizer_fp="tiny",
            drafter_factory=lambda: make_drafter("ngram"),
            drafter_name="ngram",
            config=NodeConfig(
                device_id="pi-a", session=SessionConfig(max_new_tokens=max_new, stop_ids=(EOS,))
            ),
        )
        async with (
            asyncio.TaskGroup() as tg,
            ops.subscribe(T.session("pi-a", "pi-a-inbox", "result")) as res,
        ):
            services = [
                tg.create_task(verifier.run(), name="verifier"),
                tg.create_task(node.run(), name="node"),
            ]
            await asyncio.wait_for(verifier.ready.wait(), WAIT)
            await asyncio.wait_for(node.ready.wait(), WAIT)
            outcomes = await asyncio.wait_for(
                asyncio.gather(
                    *(node.generate_ids(ids, session_id=sid) for sid, ids in prompts.items())
                ),
                120,
            )
            # The operator's path: a prompt into the device's inbox, the result back.
            await ops.publish(
                T.device_inbox("pi-a"),
                PromptRequest(
                    "w5 w9 w13", session_id="pi-a-inbox", max_new_tokens=max_new, chat=False
                ).encode(),
            )
            result = decode((await res.get(120)).payload, expect=Result)
            for s in services:
                s.cancel()
    for (sid, ids), out in zip(prompts.items(), outcomes, strict=True):
        assert out.session_id == sid
        assert list(out.tokens) == reference_greedy(target, ids, max_new, (EOS,))
    inbox_ids = TinyTokenizer().encode("w5 w9 w13")
    want = reference_greedy(target, inbox_ids, max_new, (EOS,))
    assert (result.session_id, result.device_id) == ("pi-a-inbox", "pi-a")
    assert result.n_tokens == len(want)
    assert result.text == TinyTokenizer().decode(want)
    assert verifier.metrics.rejected.total() == 0


# --- bridge-edge.conf against the secured broker -----------------------------------------
async def test_edge_broker_bridges_sessions_to_the_secured_broker(secure: Secure) -> None:
    """bridge-edge.conf, rendered: a device on the edge reaches the central verifier side,
    and cannot take opens from the central share group by joining a group on the edge."""
    edge_port = free_port()
    d = secure.dir
    (d / "edge-data").mkdir(exist_ok=True)
    conf = d / "edge.conf"
    conf.write_text(
        render(
            DEPLOY / "bridge-edge.conf",
            {
                "/etc/mosquitto/mw/bridge/ca.crt": f"{d}/ca.crt",
                "/etc/mosquitto/mw/bridge/site-1.crt": f"{d}/clients/site-1/site-1.crt",
                "/etc/mosquitto/mw/bridge/site-1.key": f"{d}/clients/site-1/site-1.key",
                "/etc/mosquitto/mw/": f"{d}/",
                "/var/lib/mosquitto/": f"{d}/edge-data/",
                "\nlistener 1883\n": f"\nlistener {edge_port} 127.0.0.1\n",
                "address central.example.net:8883": f"address 127.0.0.1:{secure.port}",
                "remote_password CHANGE-ME": f"remote_password {password('site-1')}",
            },
        )
    )
    edge = await asyncio.to_thread(Broker(conf, edge_port, secure.broker.binary).start)
    try:
        on_edge = {"port": edge_port, "tls": None}
        async with (
            connected(secure.settings("verifier-1")) as ver,
            connected(secure.settings("monitor")) as mon,
            connected(secure.settings("pi-e", **on_edge)) as dev,
        ):
            # central -> edge: retained state reaches the device once the bridge is up
            await ver.publish(
                T.session("pi-e", "pi-e-1", "state"), b"state-from-central", qos=1, retain=True
            )
            async with dev.subscribe(T.session("pi-e", "pi-e-1", "state")) as state:
                down = await until(state, b"state-from-central")
            # edge -> central: the device's open reaches the verifiers' side
            async with mon.subscribe(T.session("pi-e", "pi-e-1", "open")) as opens:
                await dev.publish(T.session("pi-e", "pi-e-1", "open"), b"open-from-edge", qos=1)
                got = await until(opens, b"open-from-edge")
            await ver.publish(
                T.session("pi-e", "pi-e-1", "state"), b"", qos=1, retain=True
            )  # clear it
            # The edge keeps acl_file, which grants a device's SUBSCRIBE to a share group
            # there; that group is the edge's own, and the bridge's plain subscription
            # still carries every open to the central verifiers' group.
            opens_sent = [f"edge-open-{i}".encode() for i in range(4)]
            async with ver.subscribe(T.shared_open()) as group:
                try:
                    edge_member = await dev.subscribe(T.shared_open())
                except BusError as exc:  # should the edge ever refuse it: fine as well
                    assert "refused subscription" in str(exc)
                    edge_member = None
                for i, payload in enumerate(opens_sent):
                    await dev.publish(T.session("pi-e", f"pi-e-g{i}", "open"), payload, qos=1)
                in_group = await until(group, opens_sent[-1])
                if edge_member is not None:
                    await edge_member.close()
    finally:
        await asyncio.to_thread(edge.stop)
    assert down[-1].topic == T.session("pi-e", "pi-e-1", "state")
    assert got[-1].topic == T.session("pi-e", "pi-e-1", "open")
    assert [m.payload for m in in_group] == opens_sent


# --- holes of issue 14 closed by the production config ------------------------------------
async def test_no_one_can_take_over_the_verifiers_client_id(secure: Secure) -> None:
    """use_username_as_clientid: a device connecting as ``mw-verifier-{vid}`` gets its
    own username as client id, so the verifier stays connected and its will never fires
    (with the client id free to choose, the takeover published the will)."""
    will = verifier_will("verifier-1")
    async with (
        connected(secure.settings("monitor")) as mon,
        mon.subscribe(T.verifier_status("verifier-1")) as watch,
        connected(
            secure.settings(
                "verifier-1",
                client_id="mw-verifier-verifier-1",
                will=Will(T.verifier_status("verifier-1"), will, qos=1, retain=False),
            )
        ) as ver,
    ):
        async with connected(secure.settings("pi-a", client_id="mw-verifier-verifier-1")):
            pass
        await ver.publish(T.verifier_status("verifier-1"), b"sentinel-takeover", qos=1)
        got = await until(watch, b"sentinel-takeover")
        assert ver.is_connected
    assert [m.payload for m in got if m.payload == will] == []


async def test_no_one_can_take_over_a_devices_persistent_session(secure: Secure) -> None:
    """Another user connecting with the device's client id and clean_start=0 (expiry 0)
    does not touch the device's persistent session: it is still there on reconnect."""
    own = secure.settings("pi-a", client_id="mw-node-pi-a", clean_start=False, session_expiry=60)
    async with connected(own):
        pass
    thief = secure.settings("pi-b", client_id="mw-node-pi-a", clean_start=False, session_expiry=0)
    async with connected(thief) as t:
        stolen = t.session_present
    async with connected(own) as again:
        kept = again.session_present
    assert (stolen, kept) == (False, True)


async def test_a_device_reads_verifier_status(secure: Secure) -> None:
    """Devices fail over on a verifier's will: they must read ``verifier/+/status``."""
    async with (
        connected(secure.settings("pi-a")) as dev,
        dev.subscribe("mw/v1/verifier/+/status") as sub,
        connected(secure.settings("verifier-1")) as ver,
    ):
        await ver.publish(T.verifier_status("verifier-1"), b"verifier-status", qos=1)
        got = (await until(sub, b"verifier-status"))[-1]  # after any retained status
    assert (got.topic, got.payload) == (T.verifier_status("verifier-1"), b"verifier-status")


async def test_home_assistant_discovery_rights(secure: Secure) -> None:
    """A device and a verifier publish their own discovery configs (retained), not another's;
    Home Assistant, connected as a monitor, reads them; an operator may clear them
    (``mw-cli decommission``)."""
    from middleware.protocol.homeassistant import device_configs

    own = device_configs(T, "pi-a")[0][0]
    other = device_configs(T, "pi-b")[0][0]
    async with (
        connected(secure.settings("pi-a")) as dev,
        connected(secure.settings("watch")) as ha,
        ha.subscribe("homeassistant/#") as sub,
        connected(secure.settings("ops")) as ops,
    ):
        assert await publish_outcome(dev, own, b"ha-own") == "allowed"
        assert await publish_outcome(dev, other, b"ha-other") == "denied"
        assert await publish_outcome(ops, own, b"ha-ops") == "allowed"
        got = await until(sub, b"ha-ops")
        await ops.publish(own, b"", qos=1, retain=True)  # leave nothing retained
    assert [m.payload for m in got if m.topic == other] == []
    assert [m.payload for m in got if m.topic == own][-2:] == [b"ha-own", b"ha-ops"]


@pytest.mark.parametrize("user", ["pi-a", "monitor", "ops", "site-1", "relay-1"])
async def test_only_verifiers_join_the_verifier_share_group(secure: Secure, user: str) -> None:
    """A member of the share group takes its turn of opens; Mosquitto drops a turn its
    member may not read, so a device in the group swallowed opens (12.5 s -> 133.5 s for
    three prompts under acl_file).  The plugin refuses the subscription to every role
    but the verifier's, whatever the group."""
    async with connected(secure.settings(user)) as bus:
        outcomes = [await subscribe_outcome(bus, T.shared_open(g)) for g in ("mw-verifiers", "x")]
    assert outcomes == [DENIED, DENIED]
    async with connected(secure.settings("verifier-1")) as ver:
        assert await subscribe_outcome(ver, T.shared_open()) == ALLOWED


async def test_every_open_reaches_the_verifier_group_when_a_device_tries_to_join(
    secure: Secure,
) -> None:
    """The hole itself: with a device in the group, about every second open was handed to
    it and dropped.  Its SUBSCRIBE is refused, so the verifier gets all of them, in order."""
    opens = [f"open-{i}".encode() for i in range(6)]
    async with (
        connected(secure.settings("verifier-1")) as ver,
        ver.subscribe(T.shared_open()) as group,
        connected(secure.settings("pi-a")) as pi_a,
        connected(secure.settings("pi-b")) as pi_b,
    ):
        try:
            intruder = await pi_a.subscribe(T.shared_open())  # a member until the block ends
        except BusError as exc:
            assert "refused subscription" in str(exc)
            intruder = None
        for i, payload in enumerate(opens):
            await pi_b.publish(T.session("pi-b", f"pi-b-g{i}", "open"), payload, qos=1)
        got = await until(group, opens[-1])
    assert intruder is None
    assert [m.payload for m in got] == opens


async def test_an_oversize_publish_is_refused_by_the_broker(secure: Secure) -> None:
    """max_packet_size: a publish over the limit (sent past MqttBus's own check) ends the
    sender's connection and reaches no one."""
    import paho.mqtt.client as paho

    limit = 1114112
    async with (
        connected(secure.settings("monitor")) as mon,
        mon.subscribe(T.session("pi-a", "pi-a-big", "result")) as sub,
    ):
        bus = MqttBus(secure.settings("pi-a"))
        await bus.connect()
        try:
            client = bus._client  # paho itself: MqttBus would refuse the size before sending
            assert isinstance(client, paho.Client)
            info = client.publish(T.session("pi-a", "pi-a-big", "result"), b"x" * limit, qos=0)
            assert info.rc == paho.MQTT_ERR_SUCCESS  # paho sends it; only the broker refuses
        finally:
            bus.crash()
        async with connected(secure.settings("pi-a")) as dev:
            await dev.publish(T.session("pi-a", "pi-a-big", "result"), b"sentinel-big", qos=1)
        got = await until(sub, b"sentinel-big")
    # The reconnect under the same client id (= username) ends the old connection first.
    assert [len(m.payload) for m in got] == [len(b"sentinel-big")]
