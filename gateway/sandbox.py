"""A throwaway local deployment on loopback: a SoftHSM2 token, Mosquitto,
reference ledger nodes and gateway processes, each in one temp directory.

Used by `edge-gateway demo`, `make bench` and the integration tests: the same
real components an edge box runs, on free 127.0.0.1 ports, all stopped by
close(). Processes are started from this Python, so the package under test is
the one that runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from gateway.errors import GatewayError

SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
TEST_PIN = "314159"
TEST_SO_PIN = "271828"


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class SandboxError(GatewayError):
    """A component of the local deployment is missing or would not start."""


def require(binary: str, package: str) -> str:
    for candidate in (shutil.which(binary), f"/usr/sbin/{binary}", f"/usr/bin/{binary}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise SandboxError(
        f"{binary} not found: install the Debian package {package} "
        f"(apt-get install -y {package}), or run `make test`, which installs it"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(
    port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None, what: str = "service"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SandboxError(f"{what} exited with code {proc.returncode} before listening")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SandboxError(f"{what} did not listen on 127.0.0.1:{port} within {timeout} s")


@dataclass
class Proc:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        # Children die with the process that started them (a killed test run, an
        # interrupted demo) rather than outliving it on the box. PR_SET_PDEATHSIG
        # fires when the starting *thread* ends, so only the main thread sets it.
        on_main = threading.current_thread() is threading.main_thread()
        self.proc = subprocess.Popen(
            self.argv,
            preexec_fn=_die_with_parent if on_main else None,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,
        )
        log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no flush, no goodbye (a power cut, an OOM kill)."""
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@dataclass
class Hsm:
    conf: Path
    token_label: str
    pin_file: Path


@dataclass
class Ledger:
    node_id: str
    config: Path
    db: Path
    proc: Proc

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.proc.port}"


@dataclass
class GatewayProc:
    gateway_id: str
    config: Path
    public_key: Path
    api_port: int
    proc: Proc
    notify_socket: Path
    spool: Path

    @property
    def api_address(self) -> str:
        return f"127.0.0.1:{self.api_port}"


@dataclass
class Sandbox:
    root: Path
    python: str = sys.executable
    procs: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        self.env.pop("NOTIFY_SOCKET", None)
        self.env["PYTHONUNBUFFERED"] = "1"

    # ---- SoftHSM2 -----------------------------------------------------------

    def hsm(self, label: str = "edge-gateway") -> Hsm:
        util = require("softhsm2-util", "softhsm2")
        if not SOFTHSM_MODULE.exists():
            raise SandboxError(f"{SOFTHSM_MODULE} missing: apt-get install -y softhsm2")
        tokens = self.root / "softhsm" / "tokens"
        tokens.mkdir(parents=True, exist_ok=True)
        conf = self.root / "softhsm" / "softhsm2.conf"
        conf.write_text(
            f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
            "log.level = ERROR\nslots.removable = false\n"
        )
        self.env["SOFTHSM2_CONF"] = str(conf)
        os.environ["SOFTHSM2_CONF"] = str(conf)
        # A throwaway token: its PINs are fixed test values, never a production secret.
        subprocess.run(
            [
                util,
                "--init-token",
                "--free",
                "--label",
                label,
                "--so-pin",
                TEST_SO_PIN,
                "--pin",
                TEST_PIN,
            ],
            check=True,
            env=self.env,
            stdout=subprocess.DEVNULL,
            timeout=60,
        )
        pin_file = self.root / f"{label}.pin"
        pin_file.write_text(TEST_PIN + "\n")
        pin_file.chmod(0o600)
        return Hsm(conf=conf, token_label=label, pin_file=pin_file)

    # ---- Mosquitto ----------------------------------------------------------

    def mosquitto(self, port: int | None = None, name: str = "mosquitto") -> Proc:
        binary = require("mosquitto", "mosquitto")
        port = port or free_port()
        d = self.root / name
        d.mkdir(exist_ok=True)
        conf = d / "mosquitto.conf"
        user = "root" if os.geteuid() == 0 else getpass.getuser()
        conf.write_text(
            "\n".join(
                [
                    f"listener {port} 127.0.0.1",
                    "allow_anonymous true",
                    f"user {user}",
                    "persistence true",
                    f"persistence_location {d}/",
                    "autosave_interval 1",
                    # Hold every QoS 1 message for an offline persistent session; the
                    # gateway's back-pressure relies on the broker keeping them.
                    "max_queued_messages 0",
                    "max_queued_bytes 0",
                    "max_inflight_messages 0",
                    "log_type error",
                    "log_type warning",
                    "log_type notice",
                    "",
                ]
            )
        )
        p = Proc(
            name=name,
            argv=[binary, "-c", str(conf)],
            log_path=d / "mosquitto.log",
            env=self.env,
            port=port,
        )
        p.start()
        wait_port(port, 20, p.proc, "mosquitto")
        self.procs.append(p)
        return p

    def restart(self, p: Proc, timeout: float = 20) -> None:
        p.start()
        wait_port(p.port, timeout, p.proc, p.name)

    # ---- ledger nodes -------------------------------------------------------

    def ledger(
        self, node_id: str, gateway_keys: dict[str, Path], port: int | None = None
    ) -> Ledger:
        port = port or free_port()
        d = self.root / node_id
        d.mkdir(exist_ok=True)
        db = d / "ledger.db"
        cfg = d / "ledger-node.toml"
        keys = "\n".join(f'"{g}" = "{k}"' for g, k in gateway_keys.items())
        cfg.write_text(
            f'[node]\nid = "{node_id}"\nlisten = "127.0.0.1:{port}"\n'
            f'db_path = "{db}"\nplaintext = true\n\n[gateways]\n{keys}\n'
        )
        p = Proc(
            name=node_id,
            argv=[self.python, "-m", "gateway", "ledger-node", "--config", str(cfg)],
            log_path=d / "ledger.log",
            env=self.env,
            port=port,
        )
        p.start()
        wait_port(port, 30, p.proc, f"ledger node {node_id}")
        self.procs.append(p)
        return Ledger(node_id=node_id, config=cfg, db=db, proc=p)

    # ---- gateway ------------------------------------------------------------

    def gateway_config(
        self,
        gateway_id: str,
        hsm: Hsm,
        mqtt_port: int,
        ledgers: list[tuple[str, str]],
        quorum: int = 2,
        batch: str = "max_tx = 500\nmax_age_s = 1.0",
        extra: str = "",
    ) -> Path:
        d = self.root / gateway_id
        d.mkdir(exist_ok=True)
        nodes = ",\n".join(f'  {{ id = "{n}", address = "{a}" }}' for n, a in ledgers)
        cfg = d / "gateway.toml"
        cfg.write_text(f"""[gateway]
id = "{gateway_id}"
log_level = "info"

[hsm]
module = "{SOFTHSM_MODULE}"
token_label = "{hsm.token_label}"
key_label = "batch-{gateway_id}"
key_id = "01"
pin_file = "{hsm.pin_file}"

[mqtt]
host = "127.0.0.1"
port = {mqtt_port}
client_id = "{gateway_id}"
topics = ["devices/+/tx"]
reject_topic_prefix = "devices/rejected"
plaintext = true
reconnect_min_s = 0.2
reconnect_max_s = 2

[spool]
path = "{d / "spool.db"}"

[batch]
{batch}

[forwarder]
nodes = [
{nodes}
]
quorum = {quorum}
call_timeout_s = 5
backoff_initial_s = 0.1
backoff_max_s = 2
plaintext = true

[api]
listen = "127.0.0.1:{free_port()}"
plaintext = true

[metrics]
listen = "127.0.0.1:{free_port()}"
{extra}
""")
        return cfg

    def hsm_init(self, config: Path, pem_out: Path) -> str:
        """`edge-gateway hsm init`; returns the printed key_id."""
        out = subprocess.run(
            [
                self.python,
                "-m",
                "gateway",
                "hsm",
                "init",
                "--config",
                str(config),
                "--pem-out",
                str(pem_out),
            ],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode != 0:
            raise SandboxError(f"hsm init failed ({out.returncode}): {out.stderr.strip()}")
        for line in out.stdout.splitlines():
            if line.startswith("key_id:"):
                return line.split()[1]
        raise SandboxError("hsm init printed no key_id")

    def gateway(
        self, gateway_id: str, config: Path, public_key: Path, ready_timeout: float = 60
    ) -> GatewayProc:
        import tomllib

        data = tomllib.loads(config.read_text())
        api_port = int(data["api"]["listen"].rpartition(":")[2])
        d = config.parent
        sock_path = d / "notify.sock"
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(sock_path))
        env = dict(self.env)
        env["NOTIFY_SOCKET"] = str(sock_path)
        p = Proc(
            name=gateway_id,
            argv=[self.python, "-m", "gateway", "run", "--config", str(config)],
            log_path=d / "gateway.log",
            env=env,
            port=api_port,
        )
        p.start()
        self.procs.append(p)
        g = GatewayProc(
            gateway_id=gateway_id,
            config=config,
            public_key=public_key,
            api_port=api_port,
            proc=p,
            notify_socket=sock_path,
            spool=Path(data["spool"]["path"]),
        )
        try:
            self._wait_ready(notify, p, ready_timeout)
        finally:
            notify.close()
        return g

    def start_gateway_again(self, g: GatewayProc, ready_timeout: float = 60) -> None:
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with contextlib.suppress(FileNotFoundError):
            g.notify_socket.unlink()
        notify.bind(str(g.notify_socket))
        g.proc.start()
        try:
            self._wait_ready(notify, g.proc, ready_timeout)
        finally:
            notify.close()

    @staticmethod
    def _wait_ready(notify: socket.socket, p: Proc, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        notify.settimeout(0.2)
        while time.monotonic() < deadline:
            if not p.alive():
                raise SandboxError(
                    f"{p.name} exited with code "
                    f"{p.proc.returncode if p.proc else '?'} before READY=1:\n"
                    + p.log_text()[-2000:]
                )
            try:
                msg = notify.recv(4096).decode()
            except TimeoutError:
                continue
            if "READY=1" in msg.split("\n"):
                return
        raise SandboxError(f"{p.name} sent no READY=1 within {timeout} s:\n" + p.log_text()[-2000:])

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.alive():
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    p.terminate(timeout=15)
        self.procs.clear()


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address)
