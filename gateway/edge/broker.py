"""`edge-gateway broker config`: the Mosquitto 2.0 configuration that keeps devices to
their own topics and away from the gateway's session and subscriptions.

Every device holds a valid certificate from the carrier's CA and some are compromised,
so the broker, not the device, decides who a client is and what it may touch. Two TLS
listeners, both requiring a client certificate:

- devices: the certificate's common name is the MQTT user name and the client id
  (use_identity_as_username, use_username_as_clientid), so no device can connect as the
  gateway and take over its persistent session; every topic a device names is placed
  under a mount point, so it cannot join the gateway's shared subscription nor reach
  anything outside the devices' namespace; and an ACL lets each device publish on its
  own topics only (the topic level the gateway reads the device id from is its common
  name) and read its own dead letters and its own receipts (profiles with [receipts]).
- gateways: a password as well (one user per gateway, in a password file only the
  gateways' listener reads), with an ACL to read the device topics and write the dead
  letters and receipts. A gateway chooses its own client ids there (one per intake process).

Pure rendering (plan in, file texts out) is kept apart from reading gateway
configurations and writing files, so tests check the text and the real broker alike.
"""

from __future__ import annotations

import argparse
import base64
import grp
import hashlib
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.common.errors import (
    EXIT_NOPERM,
    EXIT_USAGE,
    ConfigError,
    GatewayError,
    OutputFileError,
)
from gateway.edge.config import DEFAULT_PATH, GatewayConfig, load_gateway_config
from gateway.edge.profiles.spec import DEVICE_PLACEHOLDER

CONF_NAME = "edge-gateway.conf"
DEVICES_ACL = "devices.acl"
GATEWAYS_ACL = "gateways.acl"
PASSWORDS = "gateways.passwd"
DEFAULT_DEVICE_PORT = 8883
DEFAULT_MOUNT_POINT = "edge-devices/"
DEFAULT_CA = "/etc/mosquitto/certs/ca.crt"
DEFAULT_CERT = "/etc/mosquitto/certs/mosquitto.crt"
DEFAULT_KEY = "/etc/mosquitto/certs/mosquitto.key"
# Mosquitto 2.0's own password hash: PBKDF2-HMAC-SHA512, its default 101 rounds, 12 salt
# bytes ("$7$" in mosquitto_passwd's format).
PBKDF2_ROUNDS = 101
SALT_BYTES = 12


class BrokerConfigError(ConfigError):
    """The broker configuration cannot be written from these inputs."""


class PasswordUnreadable(GatewayError):
    exit_code = EXIT_NOPERM


class BrokerUsageError(GatewayError):
    exit_code = EXIT_USAGE


@dataclass(frozen=True, slots=True)
class Listener:
    port: int
    host: str | None = None  # None: every interface

    def line(self) -> str:
        return f"listener {self.port}" + (f" {self.host}" if self.host else "")

    def __str__(self) -> str:
        return f"{self.host or '*'}:{self.port}"


@dataclass(frozen=True, slots=True)
class DeviceTopic:
    """A topic filter devices publish on, with the level that holds the device id."""

    topic_filter: str
    device_level: int
    source: str  # where it comes from, for the ACL's comment


@dataclass(frozen=True, slots=True)
class ReceiptTopic:
    """A profile's receipt topic, `{device}` standing for the device id."""

    template: str
    source: str

    def device_pattern(self) -> str:
        return self.template.replace(DEVICE_PLACEHOLDER, "%u")

    def topic_filter(self) -> str:
        return self.template.replace(DEVICE_PLACEHOLDER, "+")


@dataclass(frozen=True, slots=True)
class GatewayLogin:
    username: str
    password_hash: str
    read: tuple[str, ...]  # topic filters below the mount point
    write: tuple[str, ...]
    source: str


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Paths as they are on the broker host."""

    device_ca: str
    gateway_ca: str
    cert_file: str
    key_file: str


@dataclass(frozen=True, slots=True)
class BrokerPlan:
    devices: Listener
    gateways: Listener
    tls: TlsFiles
    mount_point: str
    device_topics: tuple[DeviceTopic, ...]
    reject_prefixes: tuple[str, ...]
    logins: tuple[GatewayLogin, ...]
    files_dir: str  # where the ACL and password files are on the broker host
    # LAB ONLY: certificates that stand for many devices (a simulator).
    lab_simulators: tuple[str, ...] = ()
    receipt_topics: tuple[ReceiptTopic, ...] = ()


def password_hash(secret: str, salt: bytes | None = None) -> str:
    """`secret` as a Mosquitto 2.0 password file entry's hash."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", secret.encode("utf-8"), salt, PBKDF2_ROUNDS)
    b64 = base64.b64encode
    return f"$7${PBKDF2_ROUNDS}${b64(salt).decode()}${b64(digest).decode()}"


def device_pattern(topic_filter: str, level: int) -> str:
    """The filter with the device's own id (%u, its certificate CN) at `level`."""
    levels = topic_filter.split("/")
    if level >= len(levels) or levels[level] != "+":
        raise BrokerConfigError(
            f"topic filter {topic_filter!r} has no '+' at level {level}, where the device id sits"
        )
    levels[level] = "%u"
    return "/".join(levels)


def unshared(topic_filter: str) -> str:
    """A filter without its "$share/<group>/" prefix."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter


# ---- rendering (pure) -------------------------------------------------------------


def render(plan: BrokerPlan) -> dict[str, str]:
    """The files of the configuration, by name: the broker's configuration snippet, the
    two ACL files and the gateways' password file."""
    return {
        CONF_NAME: _conf(plan),
        DEVICES_ACL: _devices_acl(plan),
        GATEWAYS_ACL: _gateways_acl(plan),
        PASSWORDS: "".join(f"{g.username}:{g.password_hash}\n" for g in plan.logins),
    }


def _conf(plan: BrokerPlan) -> str:
    d = plan.files_dir.rstrip("/")
    lab = bool(plan.lab_simulators)
    tls = plan.tls
    lines = [
        "# Mosquitto 2.0 configuration for the edge ledger gateway (edge-gateway broker config).",
        "# Include it from the broker's main configuration (Debian: /etc/mosquitto/conf.d/),",
        "# which must keep `persistence true` (Debian's does): the gateway's persistent",
        "# session, and the messages the broker acknowledged to devices for it, live there.",
        *(
            [
                "#",
                "# LAB ONLY: --lab-simulator " + " ".join(plan.lab_simulators) + " (see",
                f"# {DEVICES_ACL}); never use this file in production.",
            ]
            if lab
            else []
        ),
        "",
        "# Each listener has its own authentication and ACL.",
        "per_listener_settings true",
        "",
        "# The broker acknowledges a device's QoS 1 message, then holds it for the gateway's",
        "# persistent session: a queue limit would drop acknowledged data (the default",
        "# max_queued_messages, 1000, does), so none. Watch the queue as a gateway user:",
        "# $SYS/broker/store/messages/count and .../bytes; the gateway's own back-pressure",
        "# (spool.max_depth) keeps it short while the gateway runs.",
        "max_queued_messages 0",
        "max_queued_bytes 0",
        "# No window of the broker's own: the gateway bounds what it takes (its receive",
        "# maximum, its spool's limits); Mosquitto 2.0.11 does not hold one reliably anyway.",
        "max_inflight_messages 0",
        "# Save the in-memory store every second: what a broker crash loses is bounded by it.",
        "autosave_interval 1",
        "",
        f"# Devices: a client certificate from {tls.device_ca} is required; its common name",
        "# is the user name the ACL knows the device by, and it must be the device id (the",
        "# topic level the gateway reads the id from).",
        plan.devices.line(),
        f"cafile {tls.device_ca}",
        f"certfile {tls.cert_file}",
        f"keyfile {tls.key_file}",
        "require_certificate true",
        "use_identity_as_username true",
    ]
    if lab:
        lines += [
            "# LAB ONLY: client ids stay as clients send them, because the simulator's tools",
            "# open several connections with one certificate. This lets any certificate take",
            "# over another client's session, the gateway's included.",
        ]
    else:
        lines += [
            "# The client id is the common name too: a device cannot connect with another",
            "# client's id, the gateway's included, and take over its session.",
            "use_username_as_clientid true",
        ]
    lines += [
        "# Every topic a device names is placed under the mount point: it cannot join the",
        "# gateway's shared subscription ($share/...) nor reach a topic outside it.",
        f"mount_point {plan.mount_point}",
        "allow_anonymous false",
        f"acl_file {d}/{DEVICES_ACL}",
        "",
        f"# Gateways: a client certificate from {tls.gateway_ca} and a password from",
        f"# {PASSWORDS}; devices have neither password nor rights here.",
        plan.gateways.line(),
        f"cafile {tls.gateway_ca}",
        f"certfile {tls.cert_file}",
        f"keyfile {tls.key_file}",
        "require_certificate true",
        "allow_anonymous false",
        f"password_file {d}/{PASSWORDS}",
        f"acl_file {d}/{GATEWAYS_ACL}",
        "",
    ]
    return "\n".join(lines)


def _devices_acl(plan: BrokerPlan) -> str:
    m = plan.mount_point
    lines = [
        "# Devices (edge-gateway broker config). The user name is the certificate's common",
        "# name (%u), which must be the device id: each device publishes on its own topics",
        "# only, and reads only its own dead letters and receipts. Topics are below the listener's",
        f"# mount point {m!r}; devices name them without it.",
    ]
    seen: set[str] = set()
    for t in plan.device_topics:
        pattern = f"pattern write {m}{device_pattern(t.topic_filter, t.device_level)}"
        if pattern not in seen:
            seen.add(pattern)
            lines += [f"# {t.topic_filter} ({t.source})", pattern]
    for prefix in dict.fromkeys(plan.reject_prefixes):
        lines += [f"# dead letters: {prefix}/<device>", f"pattern read {m}{prefix}/%u"]
    for r in dict.fromkeys(plan.receipt_topics):
        pattern = f"pattern read {m}{r.device_pattern()}"
        if pattern not in seen:
            seen.add(pattern)
            lines += [f"# receipts: {r.template} ({r.source})", pattern]
    for cn in plan.lab_simulators:
        lines += [
            "",
            f"# LAB ONLY (--lab-simulator {cn}): this certificate stands for every device: it",
            "# may publish as any of them and read every device topic and dead letter.",
            f"user {cn}",
            f"topic readwrite {m}#",
        ]
    return "\n".join(lines) + "\n"


def _gateways_acl(plan: BrokerPlan) -> str:
    m = plan.mount_point
    lines = [
        "# Gateways (edge-gateway broker config): each reads the device topics and writes",
        f"# dead letters, below the device listener's mount point {m!r}.",
    ]
    for g in plan.logins:
        lines += ["", f"# {g.source}", f"user {g.username}"]
        lines += [f"topic read {m}{f}" for f in dict.fromkeys(g.read)]
        lines += [f"topic write {m}{f}" for f in dict.fromkeys(g.write)]
        lines.append("topic read $SYS/broker/#")
    return "\n".join(lines) + "\n"


# ---- plan from gateway configurations ------------------------------------------------


def _read_password(cfg: GatewayConfig) -> str:
    path = cfg.mqtt.password_file
    assert path is not None
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise BrokerConfigError(
            f"config {cfg.source}: mqtt.password_file {path} does not exist: "
            "`edge-gateway setup` creates it"
        ) from None
    except PermissionError:
        raise PasswordUnreadable(
            f"mqtt.password_file {path} is not readable by this user: run as root"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise BrokerConfigError(
            f"config {cfg.source}: mqtt.password_file {path} cannot be read: {e}"
        ) from None
    if not secret:
        raise BrokerConfigError(f"config {cfg.source}: mqtt.password_file {path} is empty")
    return secret


def _profile_topics(cfg: GatewayConfig) -> list[DeviceTopic]:
    if cfg.profiles is None:
        return []
    from gateway.edge.profiles.profileset import read_profiles

    out = []
    for p in read_profiles(cfg.profiles.dir):
        if p.device_id_level is None:
            continue
        for f in p.filters:
            out.append(DeviceTopic(f, p.device_id_level, f"profile {p.id}"))
    return out


def _receipt_topics(cfg: GatewayConfig) -> list[ReceiptTopic]:
    if cfg.profiles is None:
        return []
    from gateway.edge.profiles.profileset import read_profiles

    return [
        ReceiptTopic(p.receipts.topic, f"profile {p.id}")
        for p in read_profiles(cfg.profiles.dir)
        if p.receipts is not None
    ]


def login_for(cfg: GatewayConfig, secret: str) -> GatewayLogin:
    """The gateway's user on the gateways' listener: reads its subscriptions' topics and
    its profiles', writes its dead letters and its profiles' receipts."""
    assert cfg.mqtt.username is not None
    read = [unshared(t) for t in cfg.mqtt.topics]
    read += [t.topic_filter for t in _profile_topics(cfg)]
    write = [f"{cfg.mqtt.reject_topic_prefix}/#"]
    write += [r.topic_filter() for r in _receipt_topics(cfg)]
    return GatewayLogin(
        username=cfg.mqtt.username,
        password_hash=password_hash(secret),
        read=tuple(read),
        write=tuple(write),
        source=f"gateway {cfg.gateway_id} ({cfg.source})",
    )


def _check(cfg: GatewayConfig) -> None:
    where = f"config {cfg.source}"
    m = cfg.mqtt
    if m.tls is None or m.tls.cert_file is None:
        raise BrokerConfigError(
            f"{where}: [mqtt.tls] has no cert_file: both listeners require a client "
            "certificate; set cert_file and key_file"
        )
    if m.username is None or m.password_file is None:
        raise BrokerConfigError(
            f"{where}: mqtt.username and mqtt.password_file are not both set: the gateways' "
            "listener admits a gateway by its password as well as its certificate; set them "
            "(`edge-gateway config init` writes them, `edge-gateway setup` creates the file)"
        )
    if any(c in m.username for c in ":\n") or m.username != m.username.strip():
        raise BrokerConfigError(
            f"{where}: mqtt.username = {m.username!r}: a broker user name has no ':', newline "
            "or surrounding spaces"
        )
    if not m.mount_point:
        raise BrokerConfigError(
            f"{where}: mqtt.mount_point is not set: the devices' listener puts their topics "
            f'under a mount point the gateway must know; set it, e.g. mount_point = "'
            f'{DEFAULT_MOUNT_POINT}"'
        )


def plan_from_configs(
    configs: Sequence[GatewayConfig],
    devices: Listener,
    gateways: Listener | None,
    tls: TlsFiles,
    files_dir: str,
    lab_simulators: Sequence[str] = (),
) -> BrokerPlan:
    """The plan for the gateways in `configs`, sharing one broker."""
    if not configs:
        raise BrokerConfigError("broker config: give at least one --config")
    for cfg in configs:
        _check(cfg)
    mounts = {cfg.mqtt.mount_point for cfg in configs}
    if len(mounts) != 1:
        raise BrokerConfigError(
            "broker config: the gateways' mqtt.mount_point differ "
            f"({', '.join(sorted(mounts))}): one broker has one device listener"
        )
    gateways = gateways or Listener(configs[0].mqtt.port)
    for cfg in configs:
        if cfg.mqtt.port != gateways.port:
            raise BrokerConfigError(
                f"config {cfg.source}: mqtt.port {cfg.mqtt.port} is not the gateways' listener "
                f"port {gateways.port}: the gateway must connect to the gateways' listener"
            )
    if devices.port == gateways.port:
        raise BrokerConfigError(
            f"broker config: the devices' listener and the gateways' listener are both port "
            f"{devices.port}: devices must not reach the gateways' listener; give "
            "--device-listener another port (or set mqtt.port to another port)"
        )
    users = [cfg.mqtt.username for cfg in configs]
    if len(set(users)) != len(users):
        raise BrokerConfigError(
            "broker config: two gateways have the same mqtt.username "
            f"({', '.join(map(str, users))})"
        )
    for cn in lab_simulators:
        if not cn or any(c in cn for c in "+#/\n") or cn != cn.strip():
            raise BrokerConfigError(
                f"broker config --lab-simulator {cn!r}: a certificate common name without "
                "'+', '#', '/', newline or surrounding spaces"
            )
    topics: list[DeviceTopic] = []
    logins: list[GatewayLogin] = []
    receipts: list[ReceiptTopic] = []
    for cfg in configs:
        receipts += _receipt_topics(cfg)
        topics += [
            DeviceTopic(unshared(t), cfg.mqtt.device_id_level, f"mqtt.topics of {cfg.gateway_id}")
            for t in cfg.mqtt.topics
        ]
        topics += _profile_topics(cfg)
        logins.append(login_for(cfg, _read_password(cfg)))
    return BrokerPlan(
        devices=devices,
        gateways=gateways,
        tls=tls,
        mount_point=configs[0].mqtt.mount_point,
        device_topics=tuple(topics),
        reject_prefixes=tuple(cfg.mqtt.reject_topic_prefix for cfg in configs),
        logins=tuple(logins),
        files_dir=files_dir,
        lab_simulators=tuple(lab_simulators),
        receipt_topics=tuple(receipts),
    )


# ---- files and the command ------------------------------------------------------------


def write_files(files: dict[str, str], out: Path, group: str | None = None) -> list[Path]:
    """Write the rendered files into `out` (0640; with `group`, root:<group>, root only)."""
    gid = None
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise OutputFileError(f"broker config --group {group}: no such group") from None
        if os.geteuid() != 0:
            raise OutputFileError(f"broker config --group {group}: changing owners needs root")
    written = []
    try:
        out.mkdir(mode=0o750, parents=True, exist_ok=True)
        for name, text in files.items():
            path = out / name
            tmp = out / f".{name}.tmp"
            tmp.unlink(missing_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            if gid is not None:
                os.chown(tmp, 0, gid)
            os.replace(tmp, path)
            written.append(path)
        if gid is not None:
            os.chown(out, 0, gid)
    except OSError as e:
        raise OutputFileError(
            f"broker config --out {out}: cannot write: {e.strerror or e}"
        ) from None
    return written


def _listener(text: str, what: str) -> Listener:
    host, sep, port = text.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536 or (sep and not host):
        raise BrokerUsageError(f"broker config {what} {text!r}: expected [HOST:]PORT")
    return Listener(int(port), host.strip("[]") or None)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="broker_cmd", required=True)
    c = sub.add_parser(
        "config",
        help="write the Mosquitto configuration (listeners, ACLs, gateway passwords)",
    )
    c.add_argument(
        "--config",
        type=Path,
        action="append",
        help=f"a gateway's configuration (default {DEFAULT_PATH}); repeat for gateways "
        "sharing the broker",
    )
    c.add_argument("--out", type=Path, required=True, help="directory to write the files into")
    c.add_argument(
        "--files-dir",
        help="where the ACL and password files will be on the broker host (default: --out)",
    )
    c.add_argument(
        "--device-listener",
        default=str(DEFAULT_DEVICE_PORT),
        metavar="[HOST:]PORT",
        help=f"the devices' listener (default {DEFAULT_DEVICE_PORT}, every interface)",
    )
    c.add_argument(
        "--gateway-listener",
        metavar="[HOST:]PORT",
        help="the gateways' listener (default: mqtt.port of the configuration, every interface)",
    )
    c.add_argument("--ca-file", default=DEFAULT_CA, help="CA of the device certificates")
    c.add_argument("--gateway-ca-file", help="CA of the gateways' certificates (default --ca-file)")
    c.add_argument("--cert-file", default=DEFAULT_CERT, help="the broker's certificate")
    c.add_argument("--key-file", default=DEFAULT_KEY, help="the broker's key")
    c.add_argument("--group", help="group owning the files (root:GROUP, e.g. mosquitto)")
    c.add_argument(
        "--lab-simulator",
        action="append",
        default=[],
        metavar="CN",
        help="LAB ONLY: this certificate may publish as every device (never in production)",
    )
    c.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    paths: list[Path] = args.config or [DEFAULT_PATH]
    configs = [load_gateway_config(p) for p in paths]
    out: Path = args.out
    plan = plan_from_configs(
        configs,
        devices=_listener(args.device_listener, "--device-listener"),
        gateways=(
            _listener(args.gateway_listener, "--gateway-listener")
            if args.gateway_listener
            else None
        ),
        tls=TlsFiles(
            device_ca=args.ca_file,
            gateway_ca=args.gateway_ca_file or args.ca_file,
            cert_file=args.cert_file,
            key_file=args.key_file,
        ),
        files_dir=args.files_dir or str(out.absolute()),
        lab_simulators=args.lab_simulator,
    )
    for path in write_files(render(plan), out, args.group):
        print(f"wrote {path}")
    patterns = {device_pattern(t.topic_filter, t.device_level) for t in plan.device_topics}
    print(
        f"devices:  listener {plan.devices}, certificate CN = device id = client id, "
        f"mount point {plan.mount_point!r}, {len(patterns)} topic pattern(s)"
    )
    print(
        f"gateways: listener {plan.gateways}, certificate and password: "
        + ", ".join(g.username for g in plan.logins)
    )
    if plan.lab_simulators:
        print(
            "LAB ONLY: " + ", ".join(plan.lab_simulators) + " may publish as every device, "
            "and client ids are not bound to certificates: never use this in production"
        )
    print(
        f"next: include {CONF_NAME} from the broker's configuration (Debian: "
        f"/etc/mosquitto/conf.d/), the other files in {plan.files_dir}, readable by the "
        "broker's user; restart it (a reload rereads only the ACL and password files)"
    )
    return 0
