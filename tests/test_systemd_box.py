"""The systemd test box: a real systemd as PID 1 runs a hardened Type=notify unit through
readiness, credentials, restarts, the watchdog and stop; a local .deb installs offline; and
teardown leaves no process, cgroup or mount of the box behind.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import subprocess
import time
from pathlib import Path

import pytest

from tests.systemd_box import BoxBootError, BoxError, BoxTimeout, BoxUnavailable, SystemdBox

pytestmark = pytest.mark.integration

UNIT = "notify-probe.service"
TOKEN = b"edge-probe-token-0123456789\n"
READY_DELAY_S = 0.5
PREVENTED_EXIT = 42

PROBE_UNIT = f"""\
[Unit]
Description=Hardened Type=notify probe of the test box
StartLimitIntervalSec=0

[Service]
Type=notify
# systemd-notify is a child of the script, not the main process.
NotifyAccess=all
ExecStart=/usr/local/bin/notify-probe
WatchdogSec=2
WatchdogSignal=SIGTERM
Restart=on-failure
RestartSec=0.3
RestartPreventExitStatus={PREVENTED_EXIT}
TimeoutStartSec=10
LoadCredential=token:/etc/notify-probe/token
DynamicUser=yes
StateDirectory=notify-probe
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateNetwork=yes
NoNewPrivileges=yes
CapabilityBoundingSet=
MemoryDenyWriteExecute=yes
SystemCallFilter=@system-service
SystemCallArchitectures=native
RestrictNamespaces=yes
RestrictAddressFamilies=AF_UNIX
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
LockPersonality=yes
"""

PROBE_SCRIPT = f"""\
#!/bin/bash
set -u
trap 'echo "exiting with {PREVENTED_EXIT} as asked"; exit {PREVENTED_EXIT}' USR1
sha=$(sha256sum < "$CREDENTIALS_DIRECTORY/token" | cut -d' ' -f1)
echo "credential token sha256=$sha"
echo "greeting from the drop-in: ${{PROBE_GREETING:-none}}"
touch /etc/notify-probe-write 2>/dev/null && echo "/etc writable" || echo "/etc read-only"
size=$(wc -c < "$CREDENTIALS_DIRECTORY/token")
sleep {READY_DELAY_S}
systemd-notify --ready --status="serving with a $size-byte token"
while true; do
    systemd-notify WATCHDOG=1
    sleep 0.4
done
"""


def restarts(box: SystemdBox) -> int:
    return int(box.show(UNIT, "NRestarts")["NRestarts"])


def active_again_after(box: SystemdBox, count: int, old_pid: int) -> bool:
    state = box.show(UNIT, "ActiveState", "NRestarts", "MainPID")
    return (
        state["ActiveState"] == "active"
        and int(state["NRestarts"]) >= count
        and int(state["MainPID"]) not in (0, old_pid)
    )


def test_notify_unit_lifecycle_in_a_real_systemd_and_teardown_leaves_nothing(
    tmp_path: Path,
) -> None:
    box = SystemdBox(logs_dir=tmp_path / "box-logs")
    # Written before boot: in place when systemd starts.
    box.write(f"/etc/systemd/system/{UNIT}", PROBE_UNIT)
    box.write("/usr/local/bin/notify-probe", PROBE_SCRIPT, mode=0o755)
    box.write("/etc/notify-probe/token", TOKEN, mode=0o600)
    box.drop_in(UNIT, "[Service]\nEnvironment=PROBE_GREETING=hello\n")
    started = time.monotonic()
    with box:
        assert box.boot_seconds is not None
        state_dir = box.state_dir

        t0 = time.monotonic()
        box.systemctl("start", UNIT)
        start_took = time.monotonic() - t0
        state = box.show(UNIT, "ActiveState", "SubState", "StatusText", "NRestarts")
        assert state["ActiveState"] == "active", state
        assert state["SubState"] == "running", state
        assert start_took >= READY_DELAY_S * 0.9, "systemctl start returned before READY=1"
        assert state["StatusText"] == f"serving with a {len(TOKEN)}-byte token"

        journal = box.journal(UNIT)
        assert f"credential token sha256={hashlib.sha256(TOKEN).hexdigest()}" in journal
        assert "/etc read-only" in journal
        assert "greeting from the drop-in: hello" in journal

        pid = box.main_pid(UNIT)
        box.run("kill", "-KILL", str(pid))
        box.wait_for(lambda: active_again_after(box, 1, pid), 10, what="restart after SIGKILL")

        pid = box.main_pid(UNIT)
        box.run("kill", "-STOP", str(pid))
        box.wait_for(lambda: active_again_after(box, 2, pid), 10, what="watchdog restart")
        assert "Watchdog timeout" in box.journal(UNIT)

        count = restarts(box)
        box.run("kill", "-USR1", str(box.main_pid(UNIT)))
        box.wait_for(
            lambda: box.show(UNIT, "ActiveState")["ActiveState"] == "failed",
            10,
            what=f"exit {PREVENTED_EXIT} to leave the unit failed",
        )
        time.sleep(1.0)  # a restart would come after RestartSec=0.3
        state = box.show(UNIT, "ActiveState", "Result", "ExecMainStatus", "NRestarts")
        assert state["ActiveState"] == "failed", state
        assert state["Result"] == "exit-code", state
        assert state["ExecMainStatus"] == str(PREVENTED_EXIT), state
        assert int(state["NRestarts"]) == count, state
        assert f"exiting with {PREVENTED_EXIT} as asked" in box.journal(UNIT)

        box.systemctl("start", UNIT)
        box.systemctl("stop", UNIT)
        assert box.show(UNIT, "ActiveState")["ActiveState"] == "inactive"
        guest_ns = box.pid_namespace
        assert guest_ns is not None and box.pid1 is not None

    assert box.teardown_seconds is not None
    print(
        f"\nsystemd box: boot {box.boot_seconds:.2f} s, start-to-ready {start_took:.2f} s, "
        f"teardown {box.teardown_seconds:.2f} s, whole test {time.monotonic() - started:.2f} s"
    )
    assert box.leftover_processes() == []
    assert not any(_in_namespace(pid, guest_ns) for pid in os.listdir("/proc") if pid.isdigit())
    assert box.cgroup is not None and not box.cgroup.exists()
    assert not state_dir.exists()
    assert (tmp_path / "box-logs" / "journal.txt").read_text().count("notify-probe") > 0
    box.close()  # idempotent


def _in_namespace(pid: str, namespace: str) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid") == namespace
    except OSError:
        return False


def test_commands_run_inside_the_guest_with_its_loopback_only(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "conf.d").mkdir(parents=True)
    (tree / "conf.d" / "secret").write_text("s3\n")
    (tree / "conf.d" / "secret").chmod(0o600)
    with SystemdBox() as box:
        box.copy_in(tree, "/etc/edge-box-tree")
        assert box.read_text("/etc/edge-box-tree/conf.d/secret") == "s3\n"
        assert box.run("stat -c %a:%U /etc/edge-box-tree/conf.d/secret").stdout == "600:root\n"

        links = box.run("ip", "-o", "link", "show").stdout.splitlines()
        assert [line.split(":")[1].strip() for line in links] == ["lo"]

        echo = (
            "import socket\n"
            "srv = socket.create_server(('127.0.0.1', 0))\n"
            "cli = socket.create_connection(srv.getsockname(), timeout=5)\n"
            "conn, _ = srv.accept()\n"
            "cli.sendall(b'ping')\n"
            "print(conn.recv(4).decode())\n"
        )
        assert box.run("python3", "-", input=echo).stdout.strip() == "ping"

        box.write("/run/edge-box-test/greeting", "hello\n", mode=0o640, owner="root:adm")
        assert box.read_text("/run/edge-box-test/greeting") == "hello\n"
        assert box.run("stat -c %a:%U:%G /run/edge-box-test/greeting").stdout.strip() == (
            "640:root:adm"
        )
        assert box.exists("/run/edge-box-test") and not box.exists("/run/nothing-here")

        out = box.sh('echo "$GREETING from $(pwd)"', env={"GREETING": "hi"}, cwd="/etc").stdout
        assert out == "hi from /etc\n"
        assert box.run("id", "-un", user="nobody").stdout.strip() == "nobody"

        # A daemon left in the background does not hold the call open.
        t0 = time.monotonic()
        box.run("sleep 30 >/dev/null 2>&1 &")
        assert time.monotonic() - t0 < 5

        t0 = time.monotonic()
        with pytest.raises(BoxTimeout):
            box.run("sleep", "20", timeout=0.5)
        assert time.monotonic() - t0 < 5
        # Killed with its process group: only the background sleep started above remains.
        assert len(box.run("pgrep", "-x", "sleep").stdout.split()) == 1

        assert box.run("exit 3", check=False).returncode == 3


def test_local_deb_installs_offline_and_its_user_exists_only_in_the_guest(
    tmp_path: Path,
) -> None:
    deb = build_probe_deb(tmp_path / "ok")
    unmet = build_probe_deb(tmp_path / "unmet", "2.0", "systemd, edge-box-absent-dependency")
    with SystemdBox() as box:
        result = box.install_deb(deb)
        print(f"\napt-get install of a local .deb, offline:\n{result.stdout}{result.stderr}")
        assert box.run("dpkg-query", "-W", "-f=${Status}", "edge-box-probe").stdout == (
            "install ok installed"
        )
        assert box.run("getent", "passwd", "edgeprobe").stdout.startswith("edgeprobe:")
        assert box.run("id", "-un", user="edgeprobe").stdout.strip() == "edgeprobe"
        # No network in the guest: a missing dependency fails at once and says so.
        with pytest.raises(BoxError, match="no network: install its dependencies on the host"):
            box.install_deb(unmet, timeout=60)
    with pytest.raises(KeyError):
        pwd.getpwnam("edgeprobe")
    query = subprocess.run(
        ["dpkg-query", "-W", "edge-box-probe"], capture_output=True, timeout=30, check=False
    )
    assert query.returncode != 0, "the package leaked onto the host"


def build_probe_deb(where: Path, version: str = "1.0", depends: str = "systemd") -> Path:
    root = where / "edge-box-probe"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "usr/lib/sysusers.d").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(
        "Package: edge-box-probe\n"
        f"Version: {version}\n"
        "Architecture: all\n"
        "Maintainer: Edge ledger gateway tests <tests@localhost>\n"
        f"Depends: {depends}\n"
        "Description: probe package for the systemd test box\n"
    )
    postinst = root / "DEBIAN/postinst"
    postinst.write_text(
        "#!/bin/sh\nset -e\n"
        'if [ "$1" = configure ]; then systemd-sysusers edge-box-probe.conf; fi\n'
    )
    postinst.chmod(0o755)
    (root / "usr/lib/sysusers.d/edge-box-probe.conf").write_text(
        'u edgeprobe - "Edge box probe" /var/lib/edgeprobe\n'
    )
    deb = where / f"edge-box-probe_{version}_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return deb


def test_missing_systemd_fails_and_says_how_to_install_it() -> None:
    with pytest.raises(BoxUnavailable, match="install the Debian package systemd"):
        SystemdBox(systemd="/nonexistent/systemd")


def test_failed_boot_raises_with_failed_units_and_console_tail_and_cleans_up() -> None:
    box = SystemdBox(boot_timeout=20)
    box.write(
        "/etc/systemd/system/boot-fails.service",
        "[Service]\nType=oneshot\nExecStart=/bin/false\n",
    )
    box.write(
        "/etc/systemd/system/box-boot.target.d/fail.conf",
        "[Unit]\nWants=boot-fails.service\n",
    )
    with pytest.raises(BoxBootError) as failure, box:
        pass
    message = str(failure.value)
    assert "'degraded'" in message
    assert "boot-fails.service" in message
    assert "console.log (tail)" in message and "boot.log (tail)" in message
    assert box.leftover_processes() == []
    assert box.cgroup is not None and not box.cgroup.exists()


def test_teardown_kills_a_guest_that_does_not_power_off() -> None:
    box = SystemdBox(stop_timeout=1.0)
    box.write(
        "/etc/systemd/system/slow-stop.service",
        "[Service]\nExecStart=/bin/sleep infinity\nExecStop=/bin/sleep 600\n"
        "TimeoutStopSec=infinity\n",
    )
    with box:
        box.systemctl("start", "slow-stop.service")
    assert box.teardown_seconds is not None and box.teardown_seconds < 10
    assert box.leftover_processes() == []
    assert box.cgroup is not None and not box.cgroup.exists()
