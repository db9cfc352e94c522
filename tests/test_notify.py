"""sd_notify datagrams, checked on real AF_UNIX datagram sockets (path and abstract)."""

from __future__ import annotations

import logging
import os
import re
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.common.notify import Notifier


@pytest.fixture
def notify_dir(tmp_path: Path) -> Iterator[Path]:
    # sun_path holds 108 bytes; with a long $TMPDIR or test name tmp_path may not fit.
    if len(os.fsencode(tmp_path / "notify.sock")) < 100:
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(prefix="ntf-") as d:
        yield Path(d)


@pytest.fixture
def listener(notify_dir: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(notify_dir / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    try:
        yield sock, path
    finally:
        sock.close()


@pytest.fixture
def abstract_listener() -> Iterator[tuple[socket.socket, str]]:
    name = f"edge-gateway-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2.0)
    try:
        yield sock, "@" + name
    finally:
        sock.close()


def recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def assert_nothing_queued(sock: socket.socket) -> None:
    sock.settimeout(0.05)
    with pytest.raises(TimeoutError):
        sock.recv(4096)


def test_ready_is_one_datagram(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    Notifier(path).ready()
    assert recv(sock) == "READY=1"


def test_ready_with_status_is_one_datagram_of_two_lines(
    listener: tuple[socket.socket, str],
) -> None:
    sock, path = listener
    Notifier(path).ready("serving: 3 ledger nodes")
    assert recv(sock) == "READY=1\nSTATUS=serving: 3 ledger nodes"
    assert_nothing_queued(sock)


def test_status_alone(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    Notifier(path).status("spool depth 12")
    assert recv(sock) == "STATUS=spool depth 12"


def test_status_cannot_inject_assignments(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    Notifier(path).status("draining\nREADY=1")
    assert recv(sock) == "STATUS=draining READY=1"


def test_watchdog_ping(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    Notifier(path, watchdog_usec=30_000_000).watchdog()
    assert recv(sock) == "WATCHDOG=1"


def test_watchdog_without_watchdog_sends_nothing(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    Notifier(path).watchdog()
    assert_nothing_queued(sock)


def test_reloading_carries_monotonic_usec(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier(path).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    m = re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=(\d+)", recv(sock))
    assert m is not None
    assert before <= int(m.group(1)) <= after


def test_reload_cycle_ends_with_ready(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier(path)
    n.reloading("reloading config")
    n.ready("serving")
    first = recv(sock).split("\n")
    assert first[0] == "RELOADING=1"
    assert first[1].startswith("MONOTONIC_USEC=")
    assert first[2] == "STATUS=reloading config"
    assert recv(sock) == "READY=1\nSTATUS=serving"


def test_stopping(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier(path)
    n.stopping()
    n.stopping("draining: signing open batch")
    assert recv(sock) == "STOPPING=1"
    assert recv(sock) == "STOPPING=1\nSTATUS=draining: signing open batch"


def test_abstract_socket_from_environ(abstract_listener: tuple[socket.socket, str]) -> None:
    sock, name = abstract_listener
    n = Notifier.from_environ({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "1000000"})
    assert n.enabled
    n.ready("up")
    n.watchdog()
    n.reloading()
    n.stopping()
    assert recv(sock) == "READY=1\nSTATUS=up"
    assert recv(sock) == "WATCHDOG=1"
    assert recv(sock).startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert recv(sock) == "STOPPING=1"


def test_path_socket_from_environ(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    Notifier.from_environ({"NOTIFY_SOCKET": path}).ready()
    assert recv(sock) == "READY=1"


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    n = Notifier.from_environ({"WATCHDOG_USEC": "30000000"})
    assert n.watchdog_interval_s() == 15.0


def test_watchdog_interval_for_own_pid() -> None:
    env = {"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_environ(env).watchdog_interval_s() == 1.5


def test_watchdog_pid_mismatch_disables_watchdog(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    n = Notifier.from_environ(env)
    assert n.watchdog_interval_s() is None
    n.watchdog()
    assert_nothing_queued(sock)


@pytest.mark.parametrize("usec", ["", "0", "-5", "thirty", "1.5"])
def test_unusable_watchdog_usec_disables_watchdog(usec: str) -> None:
    assert Notifier.from_environ({"WATCHDOG_USEC": usec}).watchdog_interval_s() is None


def test_no_watchdog_usec_means_no_interval() -> None:
    assert Notifier.from_environ({}).watchdog_interval_s() is None


def test_unparsable_watchdog_pid_disables_watchdog() -> None:
    env = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "self"}
    assert Notifier.from_environ(env).watchdog_interval_s() is None


def test_no_socket_is_a_silent_no_op(caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier.from_environ({})
    assert not n.enabled
    with caplog.at_level(logging.DEBUG, logger="gateway.common.notify"):
        n.ready("x")
        n.status("x")
        n.reloading()
        n.stopping()
    assert caplog.records == []


def test_non_unix_notify_socket_is_disabled() -> None:
    assert not Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


def test_missing_socket_does_not_raise_and_warns_once(
    notify_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = Notifier(str(notify_dir / "gone.sock"), watchdog_usec=1_000_000)
    with caplog.at_level(logging.WARNING, logger="gateway.common.notify"):
        n.ready()
        n.watchdog()
        n.status("still here")
        n.stopping()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "gone.sock" in warnings[0].getMessage()


def test_socket_going_away_mid_run_does_not_raise(
    notify_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = notify_dir / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    n = Notifier(str(path))
    n.ready()
    assert recv(sock) == "READY=1"
    sock.close()
    path.unlink()
    with caplog.at_level(logging.WARNING, logger="gateway.common.notify"):
        n.status("a")
        n.status("b")
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_warns_again_after_recovery(notify_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = notify_dir / "notify.sock"
    n = Notifier(str(path))
    with caplog.at_level(logging.WARNING, logger="gateway.common.notify"):
        n.status("down")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        sock.settimeout(2.0)
        n.status("up")
        assert recv(sock) == "STATUS=up"
        sock.close()
        path.unlink()
        n.status("down again")
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2
