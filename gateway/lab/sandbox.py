"""A throwaway local deployment on loopback: a SoftHSM2 token, Mosquitto,
reference ledger nodes and gateway processes, each in one temp directory.

Used by `edge-gateway demo`, `make bench` and the integration tests: the same
real components an edge box runs, on free 127.0.0.1 ports, all stopped by
close(). Processes are started from this Python, so the package under test is
the one that runs.

With tls=True (the default) every link is TLS with client certificates from a
throwaway `pki dev` CA, as production runs: Mosquitto runs the configuration
`edge-gateway broker config` writes (devices on one listener, bound to their own
topics by their certificate's CN, below a mount point; gateways on another, with a
password too), in its lab form: the simulator's certificate ("device") stands for
every device. Ledger nodes require the gateway's certificate (bound to each gateway
id they accept, with the operator as reader), and the gateway API requires one and
lets only the "admin" (operator) certificate submit and read transactions.
tls=False keeps the plain-text mode for tests that need it.
"""

from __future__ import annotations

import contextlib
import ctypes
import getpass
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from gateway.common import resources
from gateway.common.errors import GatewayError
from gateway.common.tomlconfig import TlsClient
from gateway.edge import broker as brokerconf
from gateway.edge.config import MqttConfig
from gateway.formats import checkpoint
from gateway.lab import pki as devpki
from gateway.ledger import witness

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

    from gateway.lab.simulate import SimulateOptions

SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
TEST_PIN = "314159"
TEST_SO_PIN = "271828"
# The domain of the sandbox's witness names (<domain>/ledger-witness/<node id>).
WITNESS_DOMAIN = "ledger.sandbox.invalid"


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


# Client roles -> dev PKI leaf. "none" is TLS without a client certificate.
ROLES = {"admin": "operator", "reader": "reader", "gateway": "gateway", "device": "device"}
ROLES_CN = {
    role: next(spec.common_name for spec in devpki.LEAVES if spec.name == leaf)
    for role, leaf in ROLES.items()
}


def loopback_mqtt_config(port: int, client_id: str, **changes: Any) -> MqttConfig:
    """An [mqtt] section for lab tools and tests that drive MqttIngest or a receipt
    publisher themselves: 127.0.0.1:`port`, the device topics, no login or TLS, unless
    `changes` (MqttConfig fields) say otherwise."""
    base = MqttConfig(
        host="127.0.0.1",
        port=port,
        client_id=client_id,
        topics=("devices/+/tx",),
        device_id_level=1,
        reject_topic_prefix="devices/rejected",
        keepalive_s=30,
        session_expiry_s=0,
        receive_maximum=1000,
        max_payload_bytes=65536,
        reconnect_min_s=1.0,
        reconnect_max_s=5.0,
        username=None,
        password_file=None,
        tls=None,
    )
    return replace(base, **changes)


@dataclass(frozen=True)
class ClientFiles:
    """What a TLS client of the sandbox needs: the CA and, for mutual TLS, its certificate."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None

    def tls_client(self) -> TlsClient:
        return TlsClient(self.ca_file, self.cert_file, self.key_file)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes(),
            private_key=self.key_file.read_bytes() if self.key_file else None,
            certificate_chain=self.cert_file.read_bytes() if self.cert_file else None,
        )

    def apply_paho(self, client: mqtt.Client) -> None:
        client.tls_set(
            ca_certs=str(self.ca_file),
            certfile=str(self.cert_file) if self.cert_file else None,
            keyfile=str(self.key_file) if self.key_file else None,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )

    def cli_args(self) -> list[str]:
        """--ca-file/--cert-file/--key-file for `edge-gateway status` and `proof`."""
        args = ["--ca-file", str(self.ca_file)]
        if self.cert_file and self.key_file:
            args += ["--cert-file", str(self.cert_file), "--key-file", str(self.key_file)]
        return args


def client_files(pki: devpki.DevPki | None, role: str) -> ClientFiles | None:
    """The files for `role` ("admin", "reader", "gateway", "device" or "none"); None in
    plain-text mode."""
    if pki is None:
        return None
    if role == "none":
        return ClientFiles(pki.ca.cert)
    if role not in ROLES:
        raise ValueError(f"role {role!r}: expected one of {', '.join(ROLES)} or none")
    leaf = pki[ROLES[role]]
    return ClientFiles(pki.ca.cert, leaf.cert, leaf.key)


def grpc_channel(address: str, files: ClientFiles | None) -> grpc.Channel:
    if files is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, files.channel_credentials())


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


@dataclass(frozen=True)
class BrokerLogin:
    """How a sandbox gateway reaches a sandbox broker: the gateways' listener, its user
    and password file, and the devices' mount point."""

    gateway_port: int
    username: str
    password_file: Path
    mount_point: str


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
    pki: devpki.DevPki | None = None
    # The node's witness cosignature vkey (its key file is beside its config).
    witness_vkey: str = ""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.proc.port}"

    def channel(self, role: str = "admin") -> grpc.Channel:
        return grpc_channel(self.address, client_files(self.pki, role))


@dataclass
class GatewayProc:
    gateway_id: str
    config: Path
    public_key: Path
    api_port: int
    proc: Proc
    notify_socket: Path
    spool: Path
    pki: devpki.DevPki | None = None

    @property
    def api_address(self) -> str:
        return f"127.0.0.1:{self.api_port}"

    def channel(self, role: str = "admin") -> grpc.Channel:
        """A channel to the API: "admin" may do everything, "reader" only GetStatus."""
        return grpc_channel(self.api_address, client_files(self.pki, role))

    def cli_args(self, role: str = "admin") -> list[str]:
        files = client_files(self.pki, role)
        return ["--plaintext"] if files is None else files.cli_args()


@dataclass
class Sandbox:
    root: Path
    python: str = sys.executable
    procs: list[Proc] = field(default_factory=list)
    tls: bool = True

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        self.env.pop("NOTIFY_SOCKET", None)
        self.env["PYTHONUNBUFFERED"] = "1"
        self.pki: devpki.DevPki | None = (
            devpki.make_dev_pki(self.root / "pki", force=True) if self.tls else None
        )
        # Brokers started from the generated configuration, by their devices' port.
        self.broker_logins: dict[int, BrokerLogin] = {}

    # ---- TLS clients ----------------------------------------------------------

    def client_files(self, role: str = "admin") -> ClientFiles | None:
        return client_files(self.pki, role)

    def grpc_channel(self, address: str, role: str = "admin") -> grpc.Channel:
        """A channel to a gateway API or ledger node of this sandbox, as `role`."""
        return grpc_channel(address, client_files(self.pki, role))

    def mqtt_tls(self, role: str = "device") -> ClientFiles | None:
        """What an MQTT client of this sandbox's brokers needs; None in plain-text mode."""
        return client_files(self.pki, role)

    def mqtt_client(self, client_id: str, role: str = "device", **kw: object) -> mqtt.Client:
        """A paho MQTT 3.1.1/5 client, TLS set up when the sandbox runs TLS."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, **kw)  # type: ignore[arg-type]
        files = self.mqtt_tls(role)
        if files is not None:
            files.apply_paho(c)
        return c

    def simulate_options(self, opts: SimulateOptions, role: str = "device") -> SimulateOptions:
        """`opts` with this sandbox's MQTT TLS files (unchanged in plain-text mode)."""
        files = self.mqtt_tls(role)
        if files is None:
            return opts
        return replace(
            opts, ca_file=files.ca_file, cert_file=files.cert_file, key_file=files.key_file
        )

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

    def mosquitto(
        self,
        port: int | None = None,
        name: str = "mosquitto",
        passwords: dict[str, str] | None = None,
    ) -> Proc:
        """Mosquitto on loopback. In TLS mode, the configuration `edge-gateway broker
        config` writes, in its lab form: devices (and the simulator's certificate, which
        stands for all of them) on `port`, the sandbox's gateways on a listener of their
        own (see broker_logins). With `passwords`, one listener where clients log in with
        a user name and password over server-authenticated TLS instead."""
        binary = require("mosquitto", "mosquitto")
        port = port or free_port()
        d = self.root / name
        d.mkdir(exist_ok=True)
        conf = d / "mosquitto.conf"
        user = "root" if os.geteuid() == 0 else getpass.getuser()
        if self.pki is not None and passwords is None:
            return self._generated_mosquitto(binary, port, name, d, user)
        auth: list[str] = []
        if self.pki is not None:
            auth += [
                f"cafile {self.pki.ca.cert}",
                f"certfile {self.pki['mosquitto'].cert}",
                f"keyfile {self.pki['mosquitto'].key}",
            ]
        if passwords is not None:
            pw = d / "passwords"
            pw.write_text("")
            pw.chmod(0o600)
            tool = require("mosquitto_passwd", "mosquitto")
            for u, secret in passwords.items():
                subprocess.run([tool, "-b", str(pw), u, secret], check=True, timeout=30)
            auth += ["allow_anonymous false", f"password_file {pw}"]
        else:  # plain text: bench and the tests that need it
            auth += ["allow_anonymous true"]
        conf.write_text(
            "\n".join(
                [
                    f"listener {port} 127.0.0.1",
                    *auth,
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

    def _generated_mosquitto(self, binary: str, port: int, name: str, d: Path, user: str) -> Proc:
        pki = self.pki
        assert pki is not None
        secret = self.root / "mqtt-gateway-password"
        if not secret.exists():
            secret.write_text(os.urandom(16).hex() + "\n")
            secret.chmod(0o600)
        login = BrokerLogin(
            gateway_port=free_port(),
            username="sandbox-gateway",
            password_file=secret,
            mount_point=brokerconf.DEFAULT_MOUNT_POINT,
        )
        # The sandbox's gateways use any topics and profiles a test gives them: their user
        # reads and writes the whole device namespace. Devices (certificates named after
        # them) get the shipped profiles' and json@1's topics, as `broker config` writes.
        topics = [brokerconf.DeviceTopic("devices/+/tx", 1, "json@1")]
        from gateway.edge.profiles.profileset import read_profiles

        for prof in read_profiles(resources.profiles_dir()):
            if prof.device_id_level is not None:
                topics += [
                    brokerconf.DeviceTopic(f, prof.device_id_level, f"profile {prof.id}")
                    for f in prof.filters
                ]
        conf_d = d / "conf.d"
        plan = brokerconf.BrokerPlan(
            devices=brokerconf.Listener(port, "127.0.0.1"),
            gateways=brokerconf.Listener(login.gateway_port, "127.0.0.1"),
            tls=brokerconf.TlsFiles(
                device_ca=str(pki.ca.cert),
                gateway_ca=str(pki.ca.cert),
                cert_file=str(pki["mosquitto"].cert),
                key_file=str(pki["mosquitto"].key),
            ),
            mount_point=login.mount_point,
            device_topics=tuple(topics),
            reject_prefixes=("devices/rejected",),
            logins=(
                brokerconf.GatewayLogin(
                    username=login.username,
                    password_hash=brokerconf.password_hash(secret.read_text().strip()),
                    read=("#",),
                    write=("#",),
                    source="the sandbox's gateways",
                ),
            ),
            files_dir=str(conf_d),
            lab_simulators=(ROLES_CN["device"],),
            # Profiles a test opts in to receipts use the default receipt topic.
            receipt_topics=(brokerconf.ReceiptTopic("receipts/{device}", "receipts"),),
        )
        brokerconf.write_files(brokerconf.render(plan), conf_d)
        self._write_main_conf(d, user)
        p = Proc(
            name=name,
            argv=[binary, "-c", str(d / "mosquitto.conf")],
            log_path=d / "mosquitto.log",
            env=self.env,
            port=port,
        )
        p.start()
        wait_port(port, 20, p.proc, "mosquitto")
        wait_port(login.gateway_port, 20, p.proc, "mosquitto (gateways' listener)")
        self.procs.append(p)
        self.broker_logins[port] = login
        return p

    @staticmethod
    def _write_main_conf(d: Path, user: str) -> None:
        """What the broker host's own configuration holds (Debian's mosquitto.conf), then
        the generated files in conf.d."""
        (d / "mosquitto.conf").write_text(
            "\n".join(
                [
                    f"user {user}",
                    "persistence true",
                    f"persistence_location {d}/",
                    "log_type error",
                    "log_type warning",
                    "log_type notice",
                    "log_type information",
                    f"include_dir {d / 'conf.d'}",
                    "",
                ]
            )
        )

    def configure_broker(
        self, broker: Proc, configs: list[Path], lab_simulators: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        """Replace a generated broker's configuration with what `edge-gateway broker config`
        writes for these gateway configurations (production form unless `lab_simulators`),
        and restart it. Returns the command's run."""
        pki = self.pki
        login = self.broker_logins[broker.port]
        assert pki is not None
        conf_d = self.root / broker.name / "conf.d"
        argv = [self.python, "-m", "gateway", "broker", "config", "--out", str(conf_d)]
        for c in configs:
            argv += ["--config", str(c)]
        argv += [
            "--device-listener",
            f"127.0.0.1:{broker.port}",
            "--gateway-listener",
            f"127.0.0.1:{login.gateway_port}",
            "--ca-file",
            str(pki.ca.cert),
            "--cert-file",
            str(pki["mosquitto"].cert),
            "--key-file",
            str(pki["mosquitto"].key),
        ]
        for cn in lab_simulators:
            argv += ["--lab-simulator", cn]
        done = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=60)
        if done.returncode != 0:
            raise SandboxError(f"broker config failed ({done.returncode}): {done.stderr.strip()}")
        broker.terminate(15)
        self.restart(broker)
        wait_port(login.gateway_port, 20, broker.proc, "mosquitto (gateways' listener)")
        return done

    def restart(self, p: Proc, timeout: float = 20) -> None:
        p.start()
        wait_port(p.port, timeout, p.proc, p.name)

    # ---- ledger nodes -------------------------------------------------------

    def ledger(
        self,
        node_id: str,
        gateway_keys: dict[str, Path],
        port: int | None = None,
        node_extra: str = "",
        clients: Mapping[str, str] | None = None,
    ) -> Ledger:
        """A reference ledger node accepting `gateway_keys`. In TLS mode each gateway id is
        bound to its entry in `clients` ("uri:..." or a subject DN), by default the sandbox's
        gateway certificate. `node_extra` goes into [node] (e.g. "max_concurrent_rpcs = 4\n")."""
        port = port or free_port()
        d = self.root / node_id
        d.mkdir(exist_ok=True)
        db = d / "ledger.db"
        cfg = d / "ledger-node.toml"
        if self.pki is None:
            tls = "plaintext = true\n"
            keys = "\n".join(f'"{g}" = "{k}"' for g, k in gateway_keys.items())
        else:
            # Mutual TLS: only clients with a certificate from the sandbox CA get in; each
            # gateway id is bound to the gateway certificate, and the operator may read.
            tls = (
                f'readers = ["{self.pki["operator"].subject}"]\n'
                f'\n[node.tls]\ncert_file = "{self.pki["ledger"].cert}"\n'
                f'key_file = "{self.pki["ledger"].key}"\n'
                f'client_ca_file = "{self.pki.ca.cert}"\n'
            )
            bound = {g: self.pki["gateway"].subject for g in gateway_keys} | dict(clients or {})
            keys = "\n".join(
                f'"{g}" = {{ public_key = "{k}", '
                f"{'client_uri' if bound[g].startswith('uri:') else 'client_subject'} = "
                f'"{bound[g]}" }}'
                for g, k in gateway_keys.items()
            )
        # The node witnesses its gateways' logs with a key of its own (kept across restarts).
        vkey = self.witness_vkey(node_id)
        key_file = d / "witness.key"
        cfg.write_text(
            f'[node]\nid = "{node_id}"\nlisten = "127.0.0.1:{port}"\n'
            f'db_path = "{db}"\n{node_extra}{tls}\n[gateways]\n{keys}\n'
            f'\n[witness]\nkey_file = "{key_file}"\n'
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
        return Ledger(
            node_id=node_id,
            config=cfg,
            db=db,
            proc=p,
            pki=self.pki,
            witness_vkey=vkey,
        )

    def witness_vkey(self, node_id: str) -> str:
        """Ledger node `node_id`'s witness cosignature vkey, its key made on first use (in
        the node's directory, where its [witness] key_file points): a gateway's
        configuration can list it before the node starts."""
        d = self.root / node_id
        d.mkdir(exist_ok=True)
        key_file = d / "witness.key"
        vkey_file = d / "witness.vkey"
        if not key_file.exists():
            vkey_file.write_text(
                witness.keygen(checkpoint.witness_name(WITNESS_DOMAIN, node_id), key_file) + "\n"
            )
        return vkey_file.read_text().strip()

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
        mqtt_password: tuple[str, Path] | None = None,
        intake_processes: int = 1,
    ) -> Path:
        """The gateway's TOML. In TLS mode: its client certificate to MQTT and the ledger
        nodes, and an API that requires client certificates with the operator as admin.
        `mqtt_password` (user, password file) logs in to MQTT by password instead of a
        certificate (a broker started with `passwords`). Each ledger node's witness vkey is
        in [log.witnesses] (last in the file), so every cosignature the gateway stores is
        checked."""
        d = self.root / gateway_id
        d.mkdir(exist_ok=True)
        nodes = ",\n".join(f'  {{ id = "{n}", address = "{a}" }}' for n, a in ledgers)
        mqtt_login = ""
        if mqtt_password is not None:
            mqtt_login = f'username = "{mqtt_password[0]}"\npassword_file = "{mqtt_password[1]}"\n'
        elif mqtt_port in self.broker_logins:
            # A broker from the generated configuration: the gateway connects to the
            # gateways' listener with its certificate and password; devices publish below
            # the devices' listener's mount point.
            login = self.broker_logins[mqtt_port]
            mqtt_port = login.gateway_port
            mqtt_login = (
                f'username = "{login.username}"\npassword_file = "{login.password_file}"\n'
                f'mount_point = "{login.mount_point}"\n'
            )
        pki = self.pki
        if pki is None:
            mqtt_tls = forwarder_tls = api_tls = "plaintext = true\n"
        else:
            gw = pki["gateway"]
            client_cert = f'cert_file = "{gw.cert}"\nkey_file = "{gw.key}"\n'
            mqtt_tls = f'\n[mqtt.tls]\nca_file = "{pki.ca.cert}"\n' + (
                "" if mqtt_password is not None else client_cert
            )
            forwarder_tls = f'\n[forwarder.tls]\nca_file = "{pki.ca.cert}"\n{client_cert}'
            api_tls = (
                f'admin_subjects = ["{pki["operator"].subject}"]\n\n[api.tls]\n'
                f'cert_file = "{pki["gateway-api"].cert}"\n'
                f'key_file = "{pki["gateway-api"].key}"\n'
                f'client_ca_file = "{pki.ca.cert}"\n'
            )
        witnesses = "".join(f'"{n}" = "{self.witness_vkey(n)}"\n' for n, _a in ledgers)
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
reconnect_min_s = 0.2
reconnect_max_s = 2
intake_processes = {intake_processes}
{mqtt_login}{mqtt_tls}
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
{forwarder_tls}
[api]
listen = "127.0.0.1:{free_port()}"
{api_tls}
[metrics]
listen = "127.0.0.1:{free_port()}"
{extra}
[log.witnesses]
{witnesses}""")
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

    def run_gateway_once(
        self, config: Path, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """`edge-gateway run` in the foreground, output captured: for starts that must
        fail (a bad token, PIN, spool or port) with one line and an exit code."""
        return subprocess.run(
            [self.python, "-m", "gateway", "run", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
        )

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
            pki=self.pki,
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
