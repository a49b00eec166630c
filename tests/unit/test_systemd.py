"""systemd integration: the unit files in deploy/systemd and middleware.systemd (sd_notify).

``systemd-analyze verify`` needs no running systemd, but it checks that
ExecStart's binary exists.  The units point at /opt/mw/.venv/bin/mw-cli, so
each unit is copied into a temp dir with only that path replaced by an
executable stub there; everything else is verified as shipped (also the
commented GPU variant, uncommented).  Any output of the verifier (unknown
keys, bad values are only warnings) fails the test.

The notify tests listen on a real unix datagram socket given as
``$NOTIFY_SOCKET``, the way systemd does.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from middleware import systemd

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
MW_CLI = "/opt/mw/.venv/bin/mw-cli"
UNIT_FILES = ["mw-verifier.service", "mw-node@.service", "mw-bridge.service"]


# --- unit files ------------------------------------------------------------------------
def directives(text: str) -> dict[str, list[str]]:
    """``Key`` -> values of every ``Key=value`` line (comments ignored, repeats kept)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z]+)=(.*)$", line.strip())
        if m:
            out.setdefault(m.group(1), []).append(m.group(2))
    return out


def _analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        reason = "systemd-analyze not installed (Debian/Ubuntu: apt-get install -y systemd)"
        if os.environ.get("CI") or os.environ.get("MW_REQUIRE_SYSTEMD"):
            pytest.fail(reason)  # unit verification is a release check: never skip it in CI
        pytest.skip(reason)
    return found


def verify(unit_text: str, name: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` on ``unit_text`` saved as ``name``, ExecStart on a stub."""
    stub = tmp / "bin" / "mw-cli"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    assert MW_CLI in unit_text
    path = tmp / name
    path.write_text(unit_text.replace(MW_CLI, str(stub)))
    return subprocess.run(
        [_analyze(), "verify", str(path)], capture_output=True, text=True, timeout=60, check=False
    )


def instance_name(unit: str) -> str:
    return unit.replace("@.", "@pi-1.")  # a template is verified as one of its instances


@pytest.mark.parametrize("unit", UNIT_FILES)
def test_unit_file_passes_systemd_analyze_verify(unit: str, tmp_path: Path) -> None:
    done = verify((UNITS / unit).read_text(), instance_name(unit), tmp_path)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


@pytest.mark.parametrize("unit", ["mw-verifier.service", "mw-node@.service"])
def test_gpu_variant_passes_systemd_analyze_verify(unit: str, tmp_path: Path) -> None:
    """The commented GPU block, switched on as its comment says."""
    text = (UNITS / unit).read_text()
    gpu = re.findall(
        r"^#((?:PrivateDevices|DevicePolicy|DeviceAllow|SupplementaryGroups)=.*)$", text, flags=re.M
    )
    assert "PrivateDevices=no" in gpu and any(g.startswith("DeviceAllow=") for g in gpu)
    text = text.replace("\nPrivateDevices=yes\n", "\n" + "\n".join(gpu) + "\n")
    done = verify(text, instance_name(unit), tmp_path)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_verify_reports_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key and a bad value are reported."""
    text = (UNITS / "mw-verifier.service").read_text()
    text = text.replace("ProtectSystem=strict", "ProtectSystem=strictest\nProtectSistem=strict")
    done = verify(text, "mw-verifier.service", tmp_path)
    assert "ProtectSistem" in done.stderr and "strictest" in done.stderr


@pytest.mark.parametrize("unit", UNIT_FILES)
def test_unit_runs_as_a_notify_service_with_watchdog_and_sandbox(unit: str) -> None:
    d = directives((UNITS / unit).read_text())
    single = {k: v[-1] for k, v in d.items()}
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30s",
        "Restart": "on-failure",
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
    }
    assert {k: single.get(k) for k in expected} == expected
    assert single["ExecStart"].startswith(MW_CLI + " ")
    assert single["StateDirectory"].startswith("mw/")
    assert "EnvironmentFile" in d and "RestartSec" in d


def test_node_template_takes_the_device_id_from_the_instance() -> None:
    d = directives((UNITS / "mw-node@.service").read_text())
    assert d["ExecStart"] == [f"{MW_CLI} node --id %i"]
    assert d["EnvironmentFile"] == ["/etc/mw/node-%i.env"]
    assert d["StateDirectory"] == ["mw/node-%i"]  # instances must not share a dynamic-user dir


# --- sd_notify ---------------------------------------------------------------------------
@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound where $NOTIFY_SOCKET will point (a path)."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(10.0)  # a bound for a message that must arrive
        yield sock, str(path)


def received(sock: socket.socket) -> list[str]:
    """Every datagram already queued on ``sock`` (non-blocking)."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(10.0)


def test_notify_is_a_no_op_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    assert systemd.notify_ready() is False


def test_notify_sends_to_a_path_socket(notify_socket, monkeypatch: pytest.MonkeyPatch) -> None:
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert systemd.notify_ready("serving 0 sessions") is True
    assert systemd.notify_stopping() is True
    assert systemd.notify_status("draining") is True
    assert [sock.recv(4096).decode() for _ in range(3)] == [
        "READY=1\nSTATUS=serving 0 sessions",
        "STOPPING=1",
        "STATUS=draining",
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux-only")
def test_notify_sends_to_an_abstract_socket() -> None:
    name = f"mw-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10.0)
        assert systemd.notify("READY=1", env={"NOTIFY_SOCKET": "@" + name}) is True
        assert sock.recv(4096) == b"READY=1"


def test_notify_failure_is_reported_not_raised(tmp_path: Path) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")}
    assert systemd.notify("READY=1", env=env) is False
    assert systemd.notify("READY=1", env={"NOTIFY_SOCKET": "vsock:2:1234"}) is False


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], want: float | None) -> None:
    assert systemd.watchdog_interval(env) == want


async def test_watchdog_loop_returns_without_a_watchdog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    await asyncio.wait_for(systemd.watchdog_loop(), 5)  # returns at once instead of looping


async def test_unhealthy_service_gets_no_pings(
    notify_socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    calls = 0

    def healthy() -> bool:
        nonlocal calls
        calls += 1
        return calls == 1  # healthy once, then stuck

    task = asyncio.create_task(systemd.watchdog_loop(0.02, healthy))
    while calls < 4:  # three unhealthy rounds
        await asyncio.sleep(0.01)
    task.cancel()
    systemd.notify("STATUS=end")
    assert received(sock) == ["WATCHDOG=1", "STATUS=end"]


# A real process, as systemd starts it: $NOTIFY_SOCKET, $WATCHDOG_USEC and
# $WATCHDOG_PID (set to the pid by `exec` from a shell, like systemd does).
PROBE = """
import asyncio, time
from middleware.systemd import notify, notify_ready, notify_stopping, watchdog_loop

async def main() -> None:
    notify_ready()
    async with asyncio.TaskGroup() as tg:
        wd = tg.create_task(watchdog_loop(), name="sd-watchdog")
        await asyncio.sleep(0.35)        # healthy: pings every 0.1 s
        notify("STATUS=stalling")
        time.sleep(1.0)                  # blocks the event loop: 10 ping periods
        notify("STATUS=recovered")
        await asyncio.sleep(0.25)
        notify_stopping()
        wd.cancel()

asyncio.run(main())
"""


def test_a_stalled_event_loop_stops_the_watchdog_pings(notify_socket) -> None:
    sock, path = notify_socket
    env = {
        **os.environ,
        "NOTIFY_SOCKET": path,
        "WATCHDOG_USEC": "200000",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    argv = ["sh", "-c", 'WATCHDOG_PID=$$ exec "$0" -c "$1"', sys.executable, PROBE]
    done = subprocess.run(
        argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    msgs = received(sock)
    assert msgs[0] == "READY=1" and msgs[-1] == "STOPPING=1", msgs
    stall, recover = msgs.index("STATUS=stalling"), msgs.index("STATUS=recovered")
    before, during, after = msgs[1:stall], msgs[stall + 1 : recover], msgs[recover + 1 : -1]
    assert before and set(before) == {"WATCHDOG=1"}  # pinging while the loop runs
    assert during == []  # a thread would have kept pinging through the stall
    assert after and set(after) == {"WATCHDOG=1"}  # and it resumes when the loop does
