"""A real systemd as PID 1 of its own namespaces, so tests can run the shipped units for real.

SystemdBox boots /lib/systemd/systemd in new pid, mount, uts, ipc, net and cgroup namespaces
over a throwaway root: the host's / is the lower layer of an overlay whose upper layer is a
tmpfs, so nothing the guest writes reaches the host's disk. The guest's network is its own
loopback only. Tests drive it with systemctl and journalctl through nsenter; teardown powers
it off (SIGKILL of its PID 1 if that hangs) and leaves no process, cgroup or mount behind.

    with SystemdBox() as box:
        box.write("/etc/systemd/system/x.service", UNIT)
        box.systemctl("daemon-reload")
        box.systemctl("start", "x.service")
        assert box.show("x.service", "ActiveState") == {"ActiveState": "active"}
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import os
import secrets
import select
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TypeVar

T = TypeVar("T")

SYSTEMD = "/lib/systemd/systemd"
# Names of the box's temp directory and cgroup: prefix, owning test process's pid, random.
BOX_PREFIX = "edge-systemd-box-"
BOOT_TARGET = "box-boot.target"
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Every command run in the guest starts from this environment, never the test's own: the
# host's PATH (a virtualenv), PYTHON* and PYTEST* variables mean nothing inside.
GUEST_ENV = {
    "PATH": GUEST_PATH,
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "cat",
    "SYSTEMD_COLORS": "0",
}
# Daily timers (apt, man-db, fstrim...) are Persistent=: in a fresh guest they would all fire
# at boot, compete for the CPU and try the network. The others load kernel modules or mount
# kernel-wide filesystems (debugfs, tracefs, configfs, fusectl, hugetlbfs): the host's
# business, not the guest's.
DEFAULT_MASK = (
    "timers.target",
    "modprobe@.service",
    "systemd-modules-load.service",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount",
    "dev-hugepages.mount",
)
TAIL_LINES = 40
PR_SET_PDEATHSIG = 1
IFF_UP = 0x1

_BOOT_TARGET_UNIT = """\
[Unit]
Description=Minimal boot target of the test box
Requires=basic.target
After=basic.target
AllowIsolate=yes
"""

_JOURNALD_CONF = """\
[Journal]
Storage=volatile
"""

# Runs as PID 1 of the new namespaces. It builds the guest's root, reports "mounted" on the
# status pipe, waits for "boot" on the go pipe (the launcher writes the guest's files in
# between), then becomes systemd. Arguments: go fd, status fd, state dir, console tty,
# systemd, target.
_BOOTSTRAP = r"""
set -euo pipefail
trap 'echo "box bootstrap: line $LINENO: \"$BASH_COMMAND\" failed" >&2' ERR
go_fd=$1 st_fd=$2 state=$3 console=$4 systemd=$5 target=$6
m=$state/merged
mount -t overlay box-root -o "lowerdir=/,upperdir=$state/ovl/upper,workdir=$state/ovl/work" "$m"
mount -t proc -o nosuid,nodev,noexec proc "$m/proc"
# Kernel-wide tunables stay the host's: /proc/sys is read-only except the guest's own
# network namespace (/proc/sys/net), as in other container managers.
mount --bind "$m/proc/sys" "$m/proc/sys"
mount --bind "$m/proc/sys/net" "$m/proc/sys/net"
mount -o remount,bind,ro "$m/proc/sys"
if [ -e "$m/proc/sysrq-trigger" ]; then
    mount --bind "$m/proc/sysrq-trigger" "$m/proc/sysrq-trigger"
    mount -o remount,bind,ro "$m/proc/sysrq-trigger"
fi
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$m/sys"
# In the new cgroup namespace this shows only the directory the launcher moved us into.
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$m/sys/fs/cgroup"
mount -t tmpfs -o mode=755,nosuid,size=4m box-dev "$m/dev"
for n in null zero full random urandom tty; do
    touch "$m/dev/$n"
    mount --bind "/dev/$n" "$m/dev/$n"
done
# A pty whose other side the launcher copies to console.log: systemd writes its status
# lines only to a terminal.
touch "$m/dev/console"
mount --bind "$console" "$m/dev/console"
mkdir "$m/dev/pts" "$m/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$m/dev/pts"
ln -s pts/ptmx "$m/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev box-shm "$m/dev/shm"
ln -s /proc/self/fd "$m/dev/fd"
ln -s /proc/self/fd/0 "$m/dev/stdin"
ln -s /proc/self/fd/1 "$m/dev/stdout"
ln -s /proc/self/fd/2 "$m/dev/stderr"
mount -t tmpfs -o mode=755,nosuid,nodev box-run "$m/run"
mount -t tmpfs -o mode=1777,nosuid,nodev box-tmp "$m/tmp"
mkdir -p "$m/.box-oldroot"
cd "$m"
pivot_root . .box-oldroot
cd /
umount -l /.box-oldroot
rmdir /.box-oldroot
# With container= set systemd leaves / private; LoadCredential= then shows an empty
# credentials directory inside the service.
mount --make-rshared /
echo mounted >&"$st_fd"
go=
read -r -u "$go_fd" go || true
if [ "$go" != boot ]; then
    echo "box bootstrap: the launcher went away before boot" >&2
    exit 1
fi
exec {go_fd}<&- {st_fd}>&-
exec "$systemd" --unit="$target" --show-status=yes
"""

# Writes stdin to $1 atomically (temp file + rename) in the guest's view of the filesystem, so
# symlinked parents (/lib -> usr/lib) and the guest's own mounts (/run, /tmp) are honoured.
_WRITE = r"""
set -eu
p=$1 mode=$2 owner=$3
mkdir -p -- "$(dirname -- "$p")"
t=$(mktemp -- "$p.box-XXXXXX")
cat > "$t"
chmod "$mode" "$t"
if [ -n "$owner" ]; then chown -- "$owner" "$t"; fi
mv -fT -- "$t" "$p"
"""

_UNTAR = r"""
set -eu
mkdir -p -- "$1"
tar -x -f - -C "$1"
if [ -n "$2" ]; then chown -R -- "$2" "$1"; fi
"""


class BoxError(Exception):
    """The box could not do what was asked; the message says what happened and what to do."""


class BoxUnavailable(BoxError):
    """Something the box needs is missing on this machine."""


class BoxBootError(BoxError):
    """The guest did not reach a running system; the message carries its console and logs."""


class BoxTimeout(BoxError):
    """A bounded wait ran out."""


class BoxCommandError(BoxError):
    """A command in the guest exited non-zero."""

    def __init__(self, argv: list[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"in the box, {_show(argv)} exited {returncode}\n"
            f"--- stdout (tail) ---\n{_tail_text(stdout)}\n"
            f"--- stderr (tail) ---\n{_tail_text(stderr)}"
        )


def _show(argv: list[str]) -> str:
    text = " ".join(argv)
    return text if len(text) <= 300 else text[:300] + "..."


def _tail_text(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def _tail_file(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        return _tail_text(path.read_text(errors="replace"), lines)
    except OSError as exc:
        return f"({path} unreadable: {exc})"


def _need_binary(name: str, package: str) -> str:
    path = shutil.which(name, path=GUEST_PATH)
    if path is None:
        raise BoxUnavailable(
            f"{name} not found: install the Debian package {package} (apt-get install {package})"
        )
    return path


def find_cgroup2() -> Path:
    """The host's cgroup2 mount point: /sys/fs/cgroup/unified on hybrid hosts."""
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[2:3] == ["cgroup2"]]
    for point in points:
        if (Path(point) / "cgroup.procs").exists():
            return Path(point)
    raise BoxUnavailable(
        "no cgroup2 hierarchy is mounted: mount one with "
        "`mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none /sys/fs/cgroup/unified`"
    )


def check_prerequisites(systemd: str = SYSTEMD) -> Path:
    """Raise BoxUnavailable naming what is missing and how to get it; return the cgroup2 root."""
    if os.geteuid() != 0:
        raise BoxUnavailable(
            "the systemd box needs root (it mounts an overlay and creates namespaces and a "
            "cgroup): run the tests as root"
        )
    for name, package in (
        ("unshare", "util-linux"),
        ("nsenter", "util-linux"),
        ("pivot_root", "util-linux"),
        ("mount", "mount"),
        ("umount", "mount"),
        ("bash", "bash"),
        ("tar", "tar"),
    ):
        _need_binary(name, package)
    if not os.access(systemd, os.X_OK):
        raise BoxUnavailable(
            f"{systemd} not found: install the Debian package systemd (apt-get install systemd)"
        )
    with open("/proc/filesystems") as filesystems:
        kinds = {line.split()[-1] for line in filesystems if line.strip()}
    if "overlay" not in kinds:
        raise BoxUnavailable("the kernel has no overlayfs: load it with `modprobe overlay`")
    if "cgroup2" not in kinds:
        raise BoxUnavailable("the kernel has no cgroup2 support: use a kernel built with it")
    return find_cgroup2()


def reap_stale_boxes(cgroup_root: Path) -> None:
    """Remove the temp directory, upper-layer mount and cgroup of boxes whose test process
    died without a teardown (its guest died with it: see _launcher_setup)."""
    for parent in (cgroup_root, Path(tempfile.gettempdir())):
        for path in parent.glob(BOX_PREFIX + "*"):
            owner = path.name[len(BOX_PREFIX) :].split("-")[0]
            if not owner.isdigit() or _alive(int(owner)):
                continue
            if parent == cgroup_root:
                for directory, _dirs, _files in os.walk(path, topdown=False):
                    with contextlib.suppress(OSError):
                        os.rmdir(directory)
                continue
            upper = path / "ovl"
            if os.path.ismount(upper):
                subprocess.run(["umount", str(upper)], capture_output=True, timeout=30, check=False)
            if not os.path.ismount(upper):
                shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SystemdBox:
    """systemd as PID 1 of a throwaway guest; a context manager (boot on enter, teardown on exit).

    Files written before boot are in place when systemd starts. Every command runs inside
    the guest (its mounts, pids, network) as root with a clean environment.
    """

    def __init__(
        self,
        *,
        hostname: str = "edge-box",
        mask: tuple[str, ...] = DEFAULT_MASK,
        boot_timeout: float = 30.0,
        stop_timeout: float = 15.0,
        allow_degraded: bool = False,
        logs_dir: Path | None = None,
        systemd: str = SYSTEMD,
    ) -> None:
        self._cgroup_root = check_prerequisites(systemd)
        reap_stale_boxes(self._cgroup_root)
        self._systemd = systemd
        self._hostname = hostname
        self._mask = mask
        self._boot_timeout = boot_timeout
        self._stop_timeout = stop_timeout
        self._allow_degraded = allow_degraded
        self._logs_dir = logs_dir
        self._pending: list[Callable[[], None]] = []
        self._state_dir: Path | None = None
        self._upper_mounted = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._go_fd: int | None = None
        self._console: _Console | None = None
        self._pid1: int | None = None
        self._booted = False
        self._closed = False
        self._cgroup_made = False
        #: Host pid of the guest's PID 1, its pid namespace ("pid:[...]") and cgroup directory;
        #: kept after teardown so a test can check that nothing of the box is left.
        self.pid1: int | None = None
        self.pid_namespace: str | None = None
        self.cgroup: Path | None = None
        self.boot_seconds: float | None = None
        self.teardown_seconds: float | None = None

    # ----- lifecycle -----

    def __enter__(self) -> SystemdBox:
        self.boot()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except BoxError as teardown:
            exc.add_note(f"systemd box teardown also failed: {teardown}")

    @property
    def state_dir(self) -> Path:
        """The host directory holding console.log and boot.log (removed at teardown)."""
        if self._state_dir is None:
            raise BoxError("the box has no state directory: it is not booted")
        return self._state_dir

    @property
    def console_log(self) -> Path:
        return self.state_dir / "console.log"

    @property
    def boot_log(self) -> Path:
        return self.state_dir / "boot.log"

    def boot(self) -> None:
        """Boot the guest and wait (bounded) until `systemctl is-system-running` says running."""
        if self._closed:
            raise BoxError("this box was torn down: create a new SystemdBox")
        if self._proc is not None:
            raise BoxError("the box is already booted")
        started = time.monotonic()
        deadline = started + self._boot_timeout
        try:
            self._launch(deadline)
            self._prepare_guest()
            self._release()
            self._wait_running(deadline)
            self._ensure_loopback()
        except BoxError as exc:
            report = f"{exc}\n{self._diagnostics()}"
            self._close_quietly()
            raise BoxBootError(f"the systemd box did not boot: {report}") from exc
        except BaseException:
            self._close_quietly()
            raise
        self._booted = True
        self.boot_seconds = time.monotonic() - started

    def close(self) -> None:
        """Power the guest off and remove everything; idempotent, also after a failed boot."""
        self._closed = True
        started = time.monotonic()
        errors: list[str] = []
        self._pending.clear()
        if self._go_fd is not None:
            os.close(self._go_fd)  # a bootstrap still waiting for "boot" exits on EOF
            self._go_fd = None
        if self._proc is not None:
            self._stop_guest(errors)
        if self._console is not None and self._proc is None:
            self._console.close()
            self._console = None
        if self._cgroup_made:
            self._remove_cgroup(errors)
        if self._state_dir is not None:
            self._remove_state_dir(errors)
        if self.teardown_seconds is None or errors:
            self.teardown_seconds = time.monotonic() - started
        if errors:
            raise BoxError("teardown incomplete: " + "; ".join(errors))

    def leftover_processes(self) -> list[int]:
        """Host pids of processes still in the guest's pid namespace (empty after teardown)."""
        if self.pid_namespace is None:
            return []
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/ns/pid") == self.pid_namespace:
                    found.append(int(entry))
        return found

    # ----- files -----

    def write(
        self, path: str, data: bytes | str, mode: int = 0o644, owner: str | None = None
    ) -> None:
        """Write a file in the guest (parents created), now or, before boot, when it starts."""
        _check_guest_path(path)
        payload = data.encode() if isinstance(data, str) else data
        self._apply(lambda: self._write_now(path, payload, mode, owner))

    def copy_in(
        self,
        host_path: str | Path,
        guest_path: str,
        mode: int | None = None,
        owner: str | None = None,
    ) -> None:
        """Copy a host file or directory tree into the guest (root-owned unless owner is given)."""
        _check_guest_path(guest_path)
        source = Path(host_path)
        if source.is_dir():
            archive = _tar_tree(source)
            self._apply(lambda: self._untar_now(archive, guest_path, owner))
            return
        file_mode = mode if mode is not None else source.stat().st_mode & 0o7777
        self.write(guest_path, source.read_bytes(), file_mode, owner)

    def read(self, path: str) -> bytes:
        """A guest file's content."""
        argv = ["cat", "--", path]
        code, out, err = self._exec(argv, None, 60.0, None, None, None)
        if code != 0:
            raise BoxCommandError(argv, code, "", err.decode(errors="replace"))
        return out

    def read_text(self, path: str) -> str:
        return self.read(path).decode()

    def exists(self, path: str) -> bool:
        return self.run("test", "-e", path, check=False).returncode == 0

    def install_deb(
        self, host_deb: str | Path, timeout: float = 300.0
    ) -> subprocess.CompletedProcess[str]:
        """`apt-get install -y` a local .deb in the guest, offline: its dependencies must
        already be installed on the host, whose / is the guest's lower layer."""
        guest = f"/tmp/box-debs/{Path(host_deb).name}"
        self.copy_in(host_deb, guest, mode=0o644)
        env = {"DEBIAN_FRONTEND": "noninteractive"}
        package = self.run("dpkg-deb", "--field", guest, "Package").stdout.strip()
        # The guest has no network: name what apt would fetch instead of waiting for its
        # downloads to fail.
        plan = self.run("apt-get", "install", "--simulate", guest, env=env, check=False)
        fetch = sorted(
            {
                line.split()[1]
                for line in plan.stdout.splitlines()
                if line.startswith("Inst ") and line.split()[1] != package
            }
        )
        if plan.returncode != 0 or fetch:
            raise BoxError(
                f"apt-get cannot install {package} in the box, which has no network: install "
                f"{' '.join(fetch) or 'its dependencies'} on the host first\n"
                f"{_tail_text(plan.stdout)}\n{_tail_text(plan.stderr)}"
            )
        argv = ["apt-get", "install", "-y", "--no-install-recommends", guest]
        return self.run(*argv, env=env, timeout=timeout)

    def drop_in(self, unit: str, text: str, name: str = "50-test") -> None:
        """Write /etc/systemd/system/UNIT.d/NAME.conf (e.g. Environment= or a changed
        ExecStart=); after boot systemd reloads so the next start uses it."""
        self.write(f"/etc/systemd/system/{unit}.d/{name}.conf", text)
        if self._booted:
            self.systemctl("daemon-reload")

    # ----- commands -----

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = 60.0,
        input: str | bytes | None = None,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the guest; one argument is a bash command line, several an argv.

        Output is collected through memory files, so a daemon left running in the background
        does not hold the call open. On timeout the command's process group is killed.
        """
        if not argv:
            raise ValueError("run() needs a command")
        command = ["bash", "-c", argv[0]] if len(argv) == 1 else list(argv)
        data = input.encode() if isinstance(input, str) else input
        code, out, err = self._exec(command, data, timeout, user, env, cwd)
        stdout = out.decode(errors="replace")
        stderr = err.decode(errors="replace")
        if check and code != 0:
            raise BoxCommandError(list(argv), code, stdout, stderr)
        return subprocess.CompletedProcess(list(argv), code, stdout, stderr)

    def sh(
        self,
        script: str,
        *,
        check: bool = True,
        timeout: float = 60.0,
        input: str | bytes | None = None,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a bash script in the guest with `set -euo pipefail`."""
        return self.run(
            "bash",
            "-euo",
            "pipefail",
            "-c",
            script,
            check=check,
            timeout=timeout,
            input=input,
            user=user,
            env=env,
            cwd=cwd,
        )

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", *args, check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """`systemctl show` of a unit as a dict; all properties when none are named."""
        args = ["show", unit, "--no-pager"]
        if props:
            args.append("--property=" + ",".join(props))
        out = self.systemctl(*args).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def main_pid(self, unit: str) -> int:
        """The unit's main pid as the guest sees it (0 when it has none)."""
        return int(self.show(unit, "MainPID")["MainPID"])

    def journal(self, unit: str, *args: str, timeout: float = 30.0) -> str:
        """The unit's journal as message text (journalctl -u UNIT -o cat), after a sync."""
        script = 'journalctl --sync >/dev/null 2>&1 || true; exec journalctl "$@"'
        argv = ["bash", "-c", script, "journal", "-u", unit, "-o", "cat", "--no-pager", *args]
        return self.run(*argv, timeout=timeout).stdout

    def wait_for(
        self,
        predicate: Callable[[], T],
        timeout: float,
        interval: float = 0.1,
        what: str | None = None,
    ) -> T:
        """Poll until predicate() is truthy and return its value; BoxTimeout after timeout s."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                name = what or getattr(predicate, "__name__", "condition")
                raise BoxTimeout(f"waited {timeout:g} s in the box for: {name}")
            time.sleep(interval)

    # ----- internals -----

    def _apply(self, action: Callable[[], None]) -> None:
        if self._closed:
            raise BoxError("this box was torn down: create a new SystemdBox")
        if self._pid1 is None:
            self._pending.append(action)
        else:
            action()

    def _write_now(self, path: str, data: bytes, mode: int, owner: str | None) -> None:
        self.run("sh", "-c", _WRITE, "box-write", path, f"{mode:o}", owner or "", input=data)

    def _untar_now(self, archive: bytes, path: str, owner: str | None) -> None:
        self.run("sh", "-c", _UNTAR, "box-untar", path, owner or "", input=archive)

    def _exec(
        self,
        command: list[str],
        data: bytes | None,
        timeout: float,
        user: str | None,
        env: Mapping[str, str] | None,
        cwd: str | None,
    ) -> tuple[int, bytes, bytes]:
        if self._pid1 is None:
            raise BoxError("the box is not booted: use `with SystemdBox() as box:` or boot()")
        # Never enter another process's namespaces through a pid that was reused.
        try:
            same = os.readlink(f"/proc/{self._pid1}/ns/pid") == self.pid_namespace
        except OSError:
            same = False
        if not same:
            raise BoxError("the guest's PID 1 is gone (see console.log and the journal)")
        if cwd is not None:
            command = ["sh", "-c", 'cd -- "$0" && exec "$@"', cwd, *command]
        if user is not None:
            command = ["runuser", "-u", user, "--", *command]
        argv = ["nsenter", "-t", str(self._pid1), "-a", "--", *command]
        out_fd = os.memfd_create("box-stdout")
        err_fd = os.memfd_create("box-stderr")
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
                stdout=out_fd,
                stderr=err_fd,
                env={**GUEST_ENV, **(env or {})},
                start_new_session=True,
            )
            try:
                proc.communicate(data, timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_command(proc)
                out, err = _drain(out_fd), _drain(err_fd)
                raise BoxTimeout(
                    f"in the box, {_show(command)} did not finish within {timeout:g} s\n"
                    f"--- stdout (tail) ---\n{_tail_text(out.decode(errors='replace'))}\n"
                    f"--- stderr (tail) ---\n{_tail_text(err.decode(errors='replace'))}"
                ) from None
            return proc.returncode, _drain(out_fd), _drain(err_fd)
        finally:
            os.close(out_fd)
            os.close(err_fd)

    def _launch(self, deadline: float) -> None:
        name = f"{BOX_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        state = Path(tempfile.gettempdir()) / name
        state.mkdir(mode=0o700)
        self._state_dir = state
        upper = state / "ovl"
        upper.mkdir()
        (state / "merged").mkdir()
        # The overlay's upper layer lives in memory: nothing the guest writes reaches the disk.
        _host(["mount", "-t", "tmpfs", "-o", "mode=755", "box-upper", str(upper)])
        self._upper_mounted = True
        (upper / "upper").mkdir()
        (upper / "work").mkdir()
        self._console = _Console(state / "console.log")
        cgroup = self._cgroup_root / name
        cgroup.mkdir()
        self.cgroup = cgroup
        self._cgroup_made = True

        go_r, go_w = os.pipe()
        st_r, st_w = os.pipe()
        self._go_fd = go_w
        namespaces = "--pid --fork --kill-child --mount --uts --ipc --net --cgroup"
        argv = ["unshare", *namespaces.split(), "--propagation", "private"]
        argv += ["bash", "-c", _BOOTSTRAP, "box-bootstrap", str(go_r), str(st_w)]
        argv += [str(state), self._console.tty, self._systemd, BOOT_TARGET]
        env = {"PATH": GUEST_PATH, "LANG": "C.UTF-8", "TERM": "dumb", "container": "edge-box"}
        try:
            with open(state / "boot.log", "wb") as log:
                self._proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    pass_fds=(go_r, st_w),
                    start_new_session=True,
                    preexec_fn=_launcher_setup(str(cgroup / "cgroup.procs")),
                )
        finally:
            os.close(go_r)
            os.close(st_w)
        try:
            line = _read_line(st_r, deadline)
        finally:
            os.close(st_r)
        if line != "mounted":
            raise BoxError("the guest's root could not be set up (see boot.log below)")
        pid1 = _only_child(self._proc.pid)
        self._pid1 = pid1
        self.pid1 = pid1
        self.pid_namespace = os.readlink(f"/proc/{pid1}/ns/pid")
        if self.pid_namespace == os.readlink("/proc/self/ns/pid"):
            raise BoxError("the guest did not get its own pid namespace")

    def _prepare_guest(self) -> None:
        self._write_now(
            f"/etc/systemd/system/{BOOT_TARGET}", _BOOT_TARGET_UNIT.encode(), 0o644, None
        )
        self._write_now("/etc/hostname", f"{self._hostname}\n".encode(), 0o644, None)
        # Its own machine id, so its journal and anything keyed on the id are not the host's.
        self._write_now("/etc/machine-id", f"{uuid.uuid4().hex}\n".encode(), 0o444, None)
        # The harness mounts everything the guest needs; the host's fstab is not the guest's.
        self._write_now("/etc/fstab", b"", 0o644, None)
        self._write_now(
            "/etc/systemd/journald.conf.d/box.conf", _JOURNALD_CONF.encode(), 0o644, None
        )
        if self._mask:
            mask = 'for u; do ln -sfn /dev/null "/etc/systemd/system/$u"; done'
            self.run("sh", "-c", mask, "box-mask", *self._mask)
        pending, self._pending = self._pending, []
        for action in pending:
            action()

    def _release(self) -> None:
        if self._go_fd is None:
            return
        try:
            os.write(self._go_fd, b"boot\n")
        finally:
            os.close(self._go_fd)
            self._go_fd = None

    def _wait_running(self, deadline: float) -> None:
        assert self._proc is not None and self._pid1 is not None
        bus = Path(f"/proc/{self._pid1}/root/run/systemd/private")
        while True:
            if self._proc.poll() is not None:
                raise BoxError(f"PID 1 of the guest exited during boot ({self._proc.returncode})")
            if _comm(self._pid1) == "systemd" and bus.is_socket():
                break
            if time.monotonic() >= deadline:
                raise BoxTimeout(f"systemd did not open its bus within {self._boot_timeout:g} s")
            time.sleep(0.02)
        remaining = max(1.0, deadline - time.monotonic())
        try:
            state = self.systemctl(
                "is-system-running", "--wait", check=False, timeout=remaining
            ).stdout.strip()
        except BoxTimeout as exc:
            raise BoxTimeout(
                f"the guest did not finish booting within {self._boot_timeout:g} s"
            ) from exc
        if state == "running" or (state == "degraded" and self._allow_degraded):
            return
        raise BoxError(f"the guest's system state is {state!r}, expected 'running'")

    def _ensure_loopback(self) -> None:
        # Tests talk to 127.0.0.1 inside the guest; systemd brings lo up, make sure it did.
        if not self._loopback_up():
            self.run("ip", "link", "set", "lo", "up")
        if not self._loopback_up():
            raise BoxError(
                "the guest's loopback interface lo is down and `ip link set lo up` failed"
            )

    def _loopback_up(self) -> bool:
        return bool(int(self.read_text("/sys/class/net/lo/flags").strip(), 16) & IFF_UP)

    def _diagnostics(self) -> str:
        parts = []
        if self._pid1 is not None and self._proc is not None and self._proc.poll() is None:
            for label, argv in (
                ("failed units", ["systemctl", "--failed", "--no-legend", "--no-pager"]),
                (
                    "journal warnings",
                    ["journalctl", "-b", "-p", "warning", "-n", "30", "--no-pager"],
                ),
            ):
                try:
                    _code, out, err = self._exec(argv, None, 5.0, None, None, None)
                    text = (out + err).decode(errors="replace")
                except BoxError as exc:
                    text = str(exc)
                parts.append(f"--- {label} ---\n{_tail_text(text)}")
        if self._state_dir is not None:
            parts.append(f"--- console.log (tail) ---\n{_tail_file(self.console_log)}")
            parts.append(f"--- boot.log (tail) ---\n{_tail_file(self.boot_log)}")
        return "\n".join(parts)

    def _close_quietly(self) -> None:
        with contextlib.suppress(BoxError):
            self.close()

    def _stop_guest(self, errors: list[str]) -> None:
        proc = self._proc
        assert proc is not None
        alive = proc.poll() is None
        systemd_up = alive and self._pid1 is not None and _comm(self._pid1) == "systemd"
        if systemd_up and self._logs_dir is not None:
            self._save_journal(self._logs_dir)
        if alive and self._booted:
            with contextlib.suppress(BoxError):
                self.systemctl("poweroff", "--no-block", check=False, timeout=5.0)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=self._stop_timeout)
        # A guest that did not boot, or does not power off in time, is killed: SIGKILL of its
        # PID 1 ends every process of its pid namespace.
        if proc.poll() is None:
            if self._pid1 is not None:
                self._kill_pid1()
            else:
                proc.kill()  # unshare itself; --kill-child takes the bootstrap with it
            try:
                proc.wait(timeout=10.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                try:
                    proc.wait(timeout=10.0)
                except subprocess.TimeoutExpired:
                    errors.append(f"unshare (pid {proc.pid}) did not exit after SIGKILL")
                    return
        deadline = time.monotonic() + 5.0
        while (left := self.leftover_processes()) and time.monotonic() < deadline:
            time.sleep(0.05)
        if left:
            errors.append(f"processes of the guest still running: {left}")
            return
        self._proc = None
        self._pid1 = None

    def _kill_pid1(self) -> None:
        # Only the guest's PID 1, and only if that pid still is it: killing it takes the whole
        # pid namespace with it.
        pid1 = self._pid1
        if pid1 is None:
            return
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid1}/ns/pid") == self.pid_namespace:
                os.kill(pid1, signal.SIGKILL)

    def _save_journal(self, logs_dir: Path) -> None:
        logs_dir.mkdir(parents=True, exist_ok=True)
        try:
            text = self.run(
                "journalctl", "-b", "--no-pager", "-o", "short-monotonic", check=False, timeout=10.0
            ).stdout
        except BoxError as exc:
            text = f"(journal unavailable: {exc})"
        (logs_dir / "journal.txt").write_text(text)

    def _remove_cgroup(self, errors: list[str]) -> None:
        assert self.cgroup is not None
        deadline = time.monotonic() + 5.0
        # Depth first; a directory can stay busy for a moment while its last tasks are reaped.
        for directory, _dirs, _files in os.walk(self.cgroup, topdown=False):
            while True:
                try:
                    os.rmdir(directory)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                        errors.append(f"cgroup {directory} not removed: {exc}")
                        return
                    time.sleep(0.05)
        self._cgroup_made = False

    def _remove_state_dir(self, errors: list[str]) -> None:
        state = self._state_dir
        assert state is not None
        if self._logs_dir is not None:
            self._logs_dir.mkdir(parents=True, exist_ok=True)
            for name in ("console.log", "boot.log"):
                with contextlib.suppress(OSError):
                    shutil.copyfile(state / name, self._logs_dir / name)
        if self._upper_mounted:
            upper = str(state / "ovl")
            result = subprocess.run(["umount", upper], capture_output=True, text=True, timeout=30)
            if result.returncode != 0 and os.path.ismount(upper):
                errors.append(f"umount {upper}: {result.stderr.strip()}")
                return
            self._upper_mounted = False
        shutil.rmtree(state, ignore_errors=True)
        self._state_dir = None


class _Console:
    """A pty for the guest's /dev/console, copied to a file by a thread until close()."""

    def __init__(self, path: Path) -> None:
        self._master, self._slave = os.openpty()
        # Our side keeps the terminal open so reads never see EIO between guest writers.
        self.tty = os.ttyname(self._slave)
        self._stop = threading.Event()
        path.touch()
        self._thread = threading.Thread(
            target=self._copy, args=(path,), name="systemd-box-console", daemon=True
        )
        self._thread.start()

    def _copy(self, path: Path) -> None:
        with open(path, "ab", buffering=0) as out:
            while not self._stop.is_set():
                ready, _, _ = select.select([self._master], [], [], 0.1)
                if not ready:
                    continue
                try:
                    chunk = os.read(self._master, 1 << 16)
                except OSError:
                    return
                if not chunk:
                    return
                out.write(chunk.replace(b"\r\n", b"\n"))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        os.close(self._master)
        os.close(self._slave)


def _check_guest_path(path: str) -> None:
    if not path.startswith("/"):
        raise ValueError(f"guest paths are absolute: {path!r}")


def _tar_tree(source: Path) -> bytes:
    def root_owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(source, arcname=".", filter=root_owned)
    return buf.getvalue()


def _drain(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _host(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise BoxError(f"{_show(argv)} failed: {result.stderr.strip()}")


def _launcher_setup(cgroup_procs: str) -> Callable[[], None]:
    libc = ctypes.CDLL(None, use_errno=True)

    def setup() -> None:
        # Runs in the child before exec: if the test process dies, unshare dies, and its
        # --kill-child takes the guest's PID 1 (and so every guest process) with it.
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        # Joined before unshare --cgroup, so this directory is the guest's cgroup root.
        with open(cgroup_procs, "w") as procs:
            procs.write("0")

    return setup


def _read_line(fd: int, deadline: float) -> str:
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BoxTimeout("the guest's root was not ready in time")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 64)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def _kill_command(proc: subprocess.Popen[bytes]) -> None:
    """Kill a timed-out guest command: every process of its group but nsenter first, so
    nsenter reaps the command it forked into the guest (an orphan whose parent is outside
    the guest's pid namespace would stay a zombie there), then nsenter if it lingers."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == proc.pid:
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == proc.pid:
                os.kill(int(entry), signal.SIGKILL)
        except (OSError, IndexError, ValueError):
            continue
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _only_child(pid: int) -> int:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    if len(children) != 1:
        raise BoxError(f"unshare (pid {pid}) has children {children}, expected exactly one")
    return int(children[0])


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
