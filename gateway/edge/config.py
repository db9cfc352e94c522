"""Typed, frozen configuration built once from TOML and validated at start.

A wrong value stops the start with one line naming the key, the value and
what is allowed. The HSM PIN is never part of the TOML: it comes from a file
or a systemd credential (see PinSource).
"""

from __future__ import annotations

import datetime as dt
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from gateway.common import certcheck
from gateway.common.errors import HsmPinError
from gateway.common.identity import Identity
from gateway.common.tomlconfig import (
    REQUIRED,
    Reader,
    TlsClient,
    TlsServer,
    address,
    ident,
    load_toml,
    tls_client,
    tls_server,
)
from gateway.formats import checkpoint, cosignature, note

DEFAULT_PATH = Path("/etc/edge-gateway/gateway.toml")
DEFAULT_HSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
# gRPC budget of the API (see gateway.edge.api for the receive limits it sizes).
DEFAULT_API_MAX_CONCURRENT_RPCS = 32

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PinSource:
    """Where the user PIN lives: a file (mode 0600 or stricter) or a systemd credential."""

    pin_file: Path | None
    credential: str | None

    def read(self) -> str:
        path = self.resolve()
        try:
            st = path.stat()
        except FileNotFoundError:
            raise HsmPinError(
                f"hsm PIN file {path} does not exist: create it (mode 0600)"
            ) from None
        except PermissionError:
            raise HsmPinError(f"hsm PIN file {path} is not readable by this user") from None
        # systemd credentials are provided read-only to the service; a plain file
        # must not be readable by anyone else.
        if self.pin_file is not None and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            mode = stat.S_IMODE(st.st_mode)
            raise HsmPinError(
                f"hsm.pin_file {path} is readable by others (mode {mode:04o}): chmod 600 it"
            )
        try:
            pin = path.read_text(encoding="utf-8").strip()
        except (PermissionError, UnicodeDecodeError) as e:
            raise HsmPinError(f"hsm PIN file {path} cannot be read: {type(e).__name__}") from None
        if not pin:
            raise HsmPinError(f"hsm PIN file {path} is empty")
        return pin

    def resolve(self) -> Path:
        if self.credential is not None:
            cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
            if not cred_dir:
                raise HsmPinError(
                    f"hsm.pin_credential = {self.credential!r} but $CREDENTIALS_DIRECTORY is "
                    "not set: start the gateway from its systemd unit (LoadCredential=) or use "
                    "hsm.pin_file"
                )
            return Path(cred_dir) / self.credential
        assert self.pin_file is not None
        return self.pin_file


@dataclass(frozen=True, slots=True)
class HsmConfig:
    module: Path
    token_label: str
    key_label: str
    key_id: bytes  # CKA_ID
    pin: PinSource


@dataclass(frozen=True, slots=True)
class MqttConfig:
    host: str
    port: int
    client_id: str
    topics: tuple[str, ...]
    device_id_level: int
    reject_topic_prefix: str
    keepalive_s: int
    session_expiry_s: int
    receive_maximum: int
    max_payload_bytes: int
    reconnect_min_s: float
    reconnect_max_s: float
    username: str | None
    password_file: Path | None
    tls: TlsClient | None
    intake_processes: int = 1
    # The prefix the broker's device listener puts before every device topic (Mosquitto's
    # mount_point): subscriptions and dead letters go under it, received topics lose it.
    mount_point: str = ""


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    path: Path
    group_commit_max: int
    group_commit_wait_ms: float
    max_depth: int
    min_free_bytes: int
    max_pending_age_s: float
    retention_batches: int


@dataclass(frozen=True, slots=True)
class RejectsConfig:
    """[rejects]: what refused payloads may cost. Each device (the id a reject names, or
    `_invalid` / `_unknown`) has a budget: `burst` rejects recorded and dead-lettered one
    by one, refilled at `per_s` by the gateway's clock; past it a reject is counted and
    acknowledged only, and the device gets one summary dead letter per `summary_every_s`.
    Recorded rejects are pruned after `retention_s` or beyond `max_kept`, oldest first."""

    per_s: float = 0.1
    burst: int = 100
    summary_every_s: float = 60.0
    retention_s: float = 7 * 86400.0
    max_kept: int = 200_000


@dataclass(frozen=True, slots=True)
class BatchConfig:
    max_tx: int
    max_bytes: int
    max_age_s: float


@dataclass(frozen=True, slots=True)
class LedgerNodeRef:
    node_id: str
    address: str


@dataclass(frozen=True, slots=True)
class ForwarderConfig:
    nodes: tuple[LedgerNodeRef, ...]
    quorum: int
    call_timeout_s: float
    backoff_initial_s: float
    backoff_max_s: float
    keepalive_s: float
    tls: TlsClient | None


@dataclass(frozen=True, slots=True)
class ApiConfig:
    listen: str
    tls: TlsServer | None
    # Under mutual TLS: the certificate identities (SAN URI or whole subject DN) allowed to
    # call the administrative methods; see gateway.edge.authz.
    admin_subjects: tuple[Identity, ...] = ()
    # Calls in progress at once; past it grpc answers RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: int = DEFAULT_API_MAX_CONCURRENT_RPCS


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: str | None  # "127.0.0.1:9464"; None disables


@dataclass(frozen=True, slots=True)
class ProfilesConfig:
    """[profiles]: firmware profile files. Without the table every payload is json@1."""

    dir: Path
    keys_dir: Path  # relative auth.keys_file names in profiles resolve here
    pseudonym_key_file: Path | None
    fallback: str | None  # profile for topics no profile claims; None refuses them
    share_group: str | None  # subscribe to the profiles' filters as $share/<group>/...


# ---- [log]: the gateway's transparency log (issue 13) ------------------------------------


@dataclass(frozen=True, slots=True)
class LogConfig:
    """[log]: `origin` is the first line of every checkpoint and the name of the log's key;
    by default `edge-gateway.invalid/edge-gateway/<gateway id>` (set a domain you own)."""

    origin: str
    # Ledger node id -> its witness cosignature vkey: a node's cosignature counts only if
    # it verifies under its vkey. A node without one here is trusted on its word.
    witnesses: Mapping[str, str] = field(default_factory=dict)
    # A key rotation's overlap (`edge-gateway hsm rotate`): after the checkpoint that covers
    # the rotation entry, checkpoints carry the old and the new key's signatures for at
    # least this many checkpoints and this many seconds, then the new key's alone.
    rotation_overlap_checkpoints: int = 100
    rotation_overlap_s: int = 86400


DEFAULT_LOG_DOMAIN = "edge-gateway.invalid"


def _log(root: Reader, gateway_id: str, node_ids: list[str]) -> LogConfig:
    lg = root.table("log")
    try:
        default = checkpoint.gateway_origin(DEFAULT_LOG_DOMAIN, gateway_id)
    except note.NoteError:
        default = REQUIRED
    origin = lg.string("origin", default)
    if not note.valid_key_name(origin) or len(origin.encode()) > 256:
        raise lg.fail(
            "origin",
            origin,
            "expected a log origin of at most 256 bytes without spaces or '+', "
            'e.g. "ledger.carrier.example/edge-gateway/gw-01"',
        )
    given = lg._get("witnesses", {})
    if not isinstance(given, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in given.items()
    ):
        raise lg.fail("witnesses", given, 'expected a table of ledger node id = "vkey"')
    for node_id, vkey in given.items():
        if node_id not in node_ids:
            raise lg.fail(f"witnesses.{node_id}", vkey, "not a node of forwarder.nodes")
        try:
            cosignature.parse_cosigner_vkey(vkey)
        except note.NoteError as e:
            raise lg.fail(f"witnesses.{node_id}", vkey, e.detail) from None
    overlap_checkpoints = lg.integer("rotation_overlap_checkpoints", 100, 0, 10**9)
    overlap_s = lg.integer("rotation_overlap_s", 86400, 0, 10**9)
    lg.finish()
    return LogConfig(
        origin=origin,
        witnesses=dict(given),
        rotation_overlap_checkpoints=overlap_checkpoints,
        rotation_overlap_s=overlap_s,
    )


# ---- end of [log] ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    gateway_id: str
    hsm: HsmConfig
    mqtt: MqttConfig
    spool: SpoolConfig
    batch: BatchConfig
    forwarder: ForwarderConfig
    api: ApiConfig
    metrics: MetricsConfig
    log_level: str
    source: Path = field(default=Path("<memory>"))
    profiles: ProfilesConfig | None = None
    rejects: RejectsConfig = field(default_factory=RejectsConfig)
    log: LogConfig | None = None  # [log]; parse_gateway_config always sets it

    @property
    def log_origin(self) -> str:
        """The origin of this gateway's log ([log] origin, or its default)."""
        if self.log is not None:
            return self.log.origin
        return checkpoint.gateway_origin(DEFAULT_LOG_DOMAIN, self.gateway_id)


def parse_gateway_config(data: Mapping[str, Any], source: Path) -> GatewayConfig:
    root = Reader(data, "", source)
    g = root.table("gateway", required=True)
    gateway_id = ident(g, "id")
    log_level = g.string("log_level", "info", choices=("debug", "info", "warning", "error"))
    g.finish()

    h = root.table("hsm", required=True)
    module = h.path("module", DEFAULT_HSM_MODULE)
    token_label = h.string("token_label", REQUIRED)
    key_label = h.string("key_label", "edge-gateway-batch")
    key_id_hex = h.string("key_id", "01")
    try:
        key_id = bytes.fromhex(key_id_hex)
    except ValueError:
        raise h.fail("key_id", key_id_hex, 'expected hex bytes (CKA_ID), e.g. "01"') from None
    if "pin" in data.get("hsm", {}):
        raise h.fail(
            "pin", "<redacted>", "the PIN never goes in the config: use pin_file or pin_credential"
        )
    pin_file = h.opt_path("pin_file")
    credential = h.opt_string("pin_credential")
    if (pin_file is None) == (credential is None):
        raise h.fail(
            "pin_file",
            str(pin_file) if pin_file else None,
            "set exactly one of hsm.pin_file and hsm.pin_credential",
        )
    h.finish()

    m = root.table("mqtt", required=True)
    mqtt_host = m.string("host", "127.0.0.1")
    mqtt_port = m.integer("port", 8883, 1, 65535)
    client_id = m.string("client_id", f"edge-gateway-{gateway_id}")
    topics = m.strings("topics", ["devices/+/tx"])
    device_id_level = m.integer("device_id_level", 1, 0, 32)
    for t in topics:
        levels = t.split("/")
        if t.startswith("$share/"):
            levels = levels[2:]
        if device_id_level >= len(levels) or levels[device_id_level] not in ("+",):
            raise m.fail(
                "topics",
                list(topics),
                f"topic filter {t!r} must have '+' at level {device_id_level} "
                "(mqtt.device_id_level) where the device id sits",
            )
    mqtt = MqttConfig(
        host=mqtt_host,
        port=mqtt_port,
        client_id=client_id,
        topics=topics,
        device_id_level=device_id_level,
        reject_topic_prefix=_reject_prefix(m),
        keepalive_s=m.integer("keepalive_s", 30, 5, 3600),
        session_expiry_s=m.integer("session_expiry_s", 86400, 60, 0xFFFFFFFF),
        receive_maximum=m.integer("receive_maximum", 1000, 1, 65535),
        max_payload_bytes=m.integer("max_payload_bytes", 65536, 64, 16 * 1024 * 1024),
        reconnect_min_s=m.number("reconnect_min_s", 0.5, 0.01, 60),
        reconnect_max_s=m.number("reconnect_max_s", 30, 0.1, 3600),
        username=m.opt_string("username"),
        password_file=m.opt_path("password_file"),
        tls=tls_client(m, "tls", "plaintext"),
        intake_processes=m.integer("intake_processes", 1, 1, 8),
        mount_point=_mount_point(m),
    )
    m.finish()

    s = root.table("spool", required=True)
    spool = SpoolConfig(
        path=s.path("path", "/var/lib/edge-gateway/spool.db"),
        group_commit_max=s.integer("group_commit_max", 2000, 1, 100_000),
        group_commit_wait_ms=s.number("group_commit_wait_ms", 2.0, 0, 1000),
        max_depth=s.integer("max_depth", 5_000_000, 1, 10**10),
        min_free_bytes=s.integer("min_free_bytes", 512 * 1024 * 1024, 0, 2**62),
        # Unbatched work this old means batching or signing is stuck: stop taking more.
        max_pending_age_s=s.number("max_pending_age_s", 600.0, 1, 30 * 86400),
        retention_batches=s.integer("retention_batches", 100_000, 0, 2**62),
    )
    s.finish()

    r = root.table("rejects")
    rejects = RejectsConfig(
        per_s=r.number("per_s", 0.1, 0, 1e6),
        burst=r.integer("burst", 100, 1, 10**9),
        summary_every_s=r.number("summary_every_s", 60.0, 0.1, 86400),
        retention_s=r.number("retention_s", 7 * 86400.0, 1, 10 * 365 * 86400),
        max_kept=r.integer("max_kept", 200_000, 1, 10**10),
    )
    r.finish()

    b = root.table("batch")
    batch = BatchConfig(
        # Hyperledger Fabric's orderer defaults: MaxMessageCount 500,
        # PreferredMaxBytes 2 MB, BatchTimeout 2 s.
        max_tx=b.integer("max_tx", 500, 1, 1_000_000),
        max_bytes=b.integer("max_bytes", 2 * 1024 * 1024, 1024, 256 * 1024 * 1024),
        max_age_s=b.number("max_age_s", 2.0, 0.01, 3600),
    )
    b.finish()

    f = root.table("forwarder", required=True)
    raw_nodes = f._get("nodes", REQUIRED)
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise f.fail("nodes", raw_nodes, "expected a non-empty list of {id, address} tables")
    nodes = []
    for i, n in enumerate(raw_nodes):
        if not isinstance(n, dict):
            raise f.fail(f"nodes[{i}]", n, "expected a table with id and address")
        nr = Reader(n, f"forwarder.nodes[{i}].", source)
        nodes.append(LedgerNodeRef(node_id=ident(nr, "id"), address=address(nr, "address")))
        nr.finish()
    ids = [n.node_id for n in nodes]
    if len(set(ids)) != len(ids):
        raise f.fail("nodes", ids, "node ids must be unique")
    quorum = f.integer("quorum", (len(nodes) // 2) + 1, 1, len(nodes))
    forwarder = ForwarderConfig(
        nodes=tuple(nodes),
        quorum=quorum,
        call_timeout_s=f.number("call_timeout_s", 10.0, 0.1, 600),
        backoff_initial_s=f.number("backoff_initial_s", 0.2, 0.01, 60),
        backoff_max_s=f.number("backoff_max_s", 30.0, 0.1, 3600),
        keepalive_s=f.number("keepalive_s", 30.0, 1, 3600),
        tls=tls_client(f, "tls", "plaintext"),
    )
    f.finish()

    a = root.table("api")
    api_listen = address(a, "listen", "127.0.0.1:7443")
    api_tls = tls_server(a, "tls", "plaintext")
    api = ApiConfig(
        listen=api_listen,
        tls=api_tls,
        admin_subjects=a.identities("admin_subjects", api_tls, "api.tls"),
        max_concurrent_rpcs=a.integer(
            "max_concurrent_rpcs", DEFAULT_API_MAX_CONCURRENT_RPCS, 1, 10_000
        ),
    )
    a.finish()

    mt = root.table("metrics")
    # listen is read (and checked) even when disabled: it is a known key, not a misspelling.
    metrics_enabled = mt.boolean("enabled", True)
    metrics_address = address(mt, "listen", "127.0.0.1:9464")
    metrics_listen = metrics_address if metrics_enabled else None
    mt.finish()
    profiles = _profiles(root) if root.has("profiles") else None
    log_cfg = _log(root, gateway_id, [n.node_id for n in forwarder.nodes])  # [log] (issue 13)
    root.finish()
    return GatewayConfig(
        gateway_id=gateway_id,
        hsm=HsmConfig(
            module=module,
            token_label=token_label,
            key_label=key_label,
            key_id=key_id,
            pin=PinSource(pin_file=pin_file, credential=credential),
        ),
        mqtt=mqtt,
        spool=spool,
        batch=batch,
        forwarder=forwarder,
        api=api,
        metrics=MetricsConfig(listen=metrics_listen),
        log_level=log_level,
        source=source,
        profiles=profiles,
        rejects=rejects,
        log=log_cfg,
    )


def _mount_point(m: Reader) -> str:
    """mqtt.mount_point: empty, or a topic name ending in '/' (the broker prefixes it)."""
    mount = m.opt_string("mount_point") or ""
    if mount and (
        mount.startswith(("$", "/"))
        or not mount.endswith("/")
        or "//" in mount
        or any(c in mount for c in "+#\0")
    ):
        raise m.fail(
            "mount_point",
            mount,
            "expected the broker's device listener mount_point: topic levels ending in '/', "
            "without '+', '#', NUL or a leading '$' or '/', e.g. \"edge-devices/\"",
        )
    return mount


def _reject_prefix(m: Reader) -> str:
    """mqtt.reject_topic_prefix: the gateway publishes under it, so it must be a topic name
    (no wildcard, no NUL, not a $ topic) with room for a device id below it."""
    prefix = m.string("reject_topic_prefix", "devices/rejected")
    if (
        not prefix
        or prefix.startswith("$")
        or any(c in prefix for c in "+#\0")
        or prefix.endswith("/")
        or len(prefix.encode("utf-8")) > 1024
    ):
        raise m.fail(
            "reject_topic_prefix",
            prefix,
            "expected a topic name of at most 1024 bytes without '+', '#', NUL, a leading '$' "
            "or a trailing '/', e.g. \"devices/rejected\"",
        )
    return prefix


def _profiles(root: Reader) -> ProfilesConfig:
    pr = root.table("profiles")
    fallback = pr.string("fallback", "json@1")
    share_group = pr.opt_string("share_group")
    if share_group is not None and any(c in share_group for c in "/+#"):
        raise pr.fail("share_group", share_group, "a share name has no '/', '+' or '#'")
    cfg = ProfilesConfig(
        dir=pr.path("dir", "/etc/edge-gateway/profiles"),
        keys_dir=pr.path("keys_dir", "/etc/edge-gateway/keys"),
        pseudonym_key_file=pr.opt_path("pseudonym_key_file"),
        fallback=None if fallback == "none" else fallback,
        share_group=share_group,
    )
    pr.finish()
    return cfg


def check_certificates(
    cfg: GatewayConfig, now: dt.datetime | None = None, warn_days: int = 30
) -> list[str]:
    """Raise CertificateError for the first unusable TLS file of [mqtt], [forwarder], [api];
    return one line for each certificate that expires within `warn_days`."""
    return certcheck.check(
        cfg.source,
        clients=(("mqtt.tls", cfg.mqtt.tls), ("forwarder.tls", cfg.forwarder.tls)),
        servers=(("api.tls", cfg.api.tls),),
        now=now,
        warn_days=warn_days,
    )


def load_gateway_config(path: Path) -> GatewayConfig:
    return parse_gateway_config(load_toml(path), path)
