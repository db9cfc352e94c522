"""Typed, frozen configuration built once from TOML and validated at start.

A wrong value stops the start with one line naming the key, the value and
what is allowed. The HSM PIN is never part of the TOML: it comes from a file
or a systemd credential (see PinSource).
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from gateway.errors import ConfigError, HsmPinError
from gateway.identity import ALLOWED, URI_PREFIX, Identity, parse_identity

DEFAULT_PATH = Path("/etc/edge-gateway/gateway.toml")
DEFAULT_HSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
# gRPC budgets (see gateway.api and gateway.ledger for the receive limits they size).
DEFAULT_API_MAX_CONCURRENT_RPCS = 32
DEFAULT_NODE_MAX_CONCURRENT_RPCS = 128
DEFAULT_NODE_MAX_BATCH_BYTES = 16 * 1024 * 1024

T = TypeVar("T")
_REQUIRED: Any = object()


@dataclass(frozen=True, slots=True)
class TlsClient:
    """Client side TLS: trust anchors and an optional client certificate (mutual TLS)."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True, slots=True)
class TlsServer:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None  # set: client certificates are required


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
    # call the administrative methods; see gateway.authz.
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


@dataclass(frozen=True, slots=True)
class LedgerNodeConfig:
    node_id: str
    listen: str
    db_path: Path
    gateway_keys: Mapping[str, Path]  # gateway_id -> PEM public key
    tls: TlsServer | None
    source: Path = field(default=Path("<memory>"))
    # Under mutual TLS: gateway_id -> the certificate identity that may act for it, and the
    # identities that may read every gateway's batches.
    gateway_clients: Mapping[str, Identity] = field(default_factory=dict)
    readers: tuple[Identity, ...] = ()
    max_concurrent_rpcs: int = DEFAULT_NODE_MAX_CONCURRENT_RPCS
    # The largest batch (its transactions' bytes) a gateway may send; sizes the receive limit.
    max_batch_bytes: int = DEFAULT_NODE_MAX_BATCH_BYTES


class _Reader:
    """Pulls typed values out of one TOML table and names the key on error."""

    def __init__(self, data: Mapping[str, Any], prefix: str, source: Path) -> None:
        self._data = data
        self._prefix = prefix
        self._source = source
        self._seen: set[str] = set()

    def _key(self, name: str) -> str:
        return f"{self._prefix}{name}"

    def fail(self, name: str, value: object, allowed: str) -> ConfigError:
        return ConfigError(f"config {self._source}: {self._key(name)} = {value!r}: {allowed}")

    def _get(self, name: str, default: object) -> object:
        self._seen.add(name)
        if name in self._data:
            return self._data[name]
        if default is _REQUIRED:
            raise ConfigError(
                f"config {self._source}: {self._key(name)} is missing: it is required"
            )
        return default

    def table(self, name: str, required: bool = False) -> _Reader:
        self._seen.add(name)
        value = self._data.get(name)
        if value is None:
            if required:
                raise ConfigError(f"config {self._source}: [{self._key(name)}] is missing")
            value = {}
        if not isinstance(value, dict):
            raise self.fail(name, value, "expected a table")
        return _Reader(value, f"{self._key(name)}.", self._source)

    def has(self, name: str) -> bool:
        return name in self._data

    def string(self, name: str, default: object = None, *, choices: tuple[str, ...] = ()) -> str:
        v = self._get(name, default)
        if not isinstance(v, str) or not v:
            raise self.fail(name, v, "expected a non-empty string")
        if choices and v not in choices:
            raise self.fail(name, v, f"expected one of {', '.join(choices)}")
        return v

    def opt_string(self, name: str) -> str | None:
        v = self._get(name, None)
        if v is None:
            return None
        if not isinstance(v, str) or not v:
            raise self.fail(name, v, "expected a non-empty string")
        return v

    def integer(self, name: str, default: object, lo: int, hi: int) -> int:
        v = self._get(name, default)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise self.fail(name, v, f"expected an integer from {lo} to {hi}")
        return v

    def number(self, name: str, default: object, lo: float, hi: float) -> float:
        v = self._get(name, default)
        if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
            raise self.fail(name, v, f"expected a number from {lo} to {hi}")
        return float(v)

    def boolean(self, name: str, default: object) -> bool:
        v = self._get(name, default)
        if not isinstance(v, bool):
            raise self.fail(name, v, "expected true or false")
        return v

    def path(self, name: str, default: object = _REQUIRED) -> Path:
        v = self._get(name, default)
        if not isinstance(v, str) or not v:
            raise self.fail(name, v, "expected a path")
        p = Path(v)
        if not p.is_absolute():
            p = (self._source.parent / p).resolve()
        return p

    def opt_path(self, name: str) -> Path | None:
        if self._data.get(name) is None:
            self._seen.add(name)
            return None
        return self.path(name)

    def identity(self, name: str, text: object, *, uri: bool | None = None) -> Identity:
        """One certificate identity (gateway.identity); `uri` True/False insists on a SAN
        URI or a subject DN."""
        if not isinstance(text, str):
            raise self.fail(name, text, ALLOWED)
        is_uri = text.strip().startswith(URI_PREFIX)
        if uri is True and not is_uri:
            raise self.fail(name, text, 'expected "uri:<SAN URI>", e.g. "uri:spiffe://..."')
        if uri is False and is_uri:
            raise self.fail(name, text, "expected the full subject DN; SAN URIs go in client_uri")
        try:
            return parse_identity(text.strip())
        except ValueError as e:
            raise self.fail(name, text, str(e)) from None

    def identities(self, name: str, tls: TlsServer | None, tls_key: str) -> tuple[Identity, ...]:
        """A list of certificate identities, which only mutual TLS can check; absent: ()."""
        v = self._get(name, None)
        if v is None:
            return ()
        if not isinstance(v, list):
            raise self.fail(name, v, f"expected a list of certificate identities; {ALLOWED}")
        out = tuple(self.identity(f"{name}[{i}]", text) for i, text in enumerate(v))
        if tls is None or tls.client_ca_file is None:
            raise _mutual_tls_only(self, name, v, tls_key)
        return out

    def strings(self, name: str, default: object) -> tuple[str, ...]:
        v = self._get(name, default)
        if not isinstance(v, list) or not v or not all(isinstance(s, str) and s for s in v):
            raise self.fail(name, v, "expected a non-empty list of strings")
        return tuple(v)

    def finish(self) -> None:
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            name = unknown[0]
            raise self.fail(name, self._data[name], "unknown key (check the spelling)")


def _mutual_tls_only(r: _Reader, name: str, value: object, tls_key: str) -> ConfigError:
    return r.fail(
        name,
        value,
        f"only takes effect with mutual TLS: set {tls_key}.client_ca_file (the CA of client "
        f"certificates), or remove {name}",
    )


def _address(r: _Reader, name: str, default: object = _REQUIRED) -> str:
    v = r.string(name, default)
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise r.fail(name, v, "expected host:port, e.g. 127.0.0.1:7443 or [::1]:7443")
    return v


def _tls_client(r: _Reader, name: str, plaintext_key: str) -> TlsClient | None:
    plaintext = r.boolean(plaintext_key, False)
    if plaintext:
        if r.has(name):
            raise r.fail(plaintext_key, True, f"cannot be true while [{name}] is set")
        r.table(name)
        return None
    t = r.table(name)
    if not t.has("ca_file"):
        raise ConfigError(
            f"config {r._source}: {r._key(name)}.ca_file is missing: TLS is on by default; "
            f"set it, or set {r._key(plaintext_key)} = true for a plain-text link"
        )
    cfg = TlsClient(
        ca_file=t.path("ca_file"),
        cert_file=t.opt_path("cert_file"),
        key_file=t.opt_path("key_file"),
    )
    if (cfg.cert_file is None) != (cfg.key_file is None):
        raise t.fail("cert_file", str(cfg.cert_file), "cert_file and key_file go together")
    t.finish()
    return cfg


def _tls_server(r: _Reader, name: str, plaintext_key: str) -> TlsServer | None:
    plaintext = r.boolean(plaintext_key, False)
    if plaintext:
        if r.has(name):
            raise r.fail(plaintext_key, True, f"cannot be true while [{name}] is set")
        r.table(name)
        return None
    t = r.table(name)
    if not t.has("cert_file"):
        raise ConfigError(
            f"config {r._source}: {r._key(name)}.cert_file is missing: TLS is on by default; "
            f"set cert_file and key_file, or set {r._key(plaintext_key)} = true"
        )
    cfg = TlsServer(
        cert_file=t.path("cert_file"),
        key_file=t.path("key_file"),
        client_ca_file=t.opt_path("client_ca_file"),
    )
    t.finish()
    return cfg


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable by this user") from None
    except IsADirectoryError:
        raise ConfigError(
            f"config file {path} is a directory: give the path of the TOML file"
        ) from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def _ident(r: _Reader, name: str, default: object = _REQUIRED) -> str:
    v = r.string(name, default)
    if len(v) > 128 or not all(c.isalnum() or c in "-_." for c in v):
        raise r.fail(name, v, "expected 1-128 characters of letters, digits, '-', '_' or '.'")
    return v


def parse_gateway_config(data: Mapping[str, Any], source: Path) -> GatewayConfig:
    root = _Reader(data, "", source)
    g = root.table("gateway", required=True)
    gateway_id = _ident(g, "id")
    log_level = g.string("log_level", "info", choices=("debug", "info", "warning", "error"))
    g.finish()

    h = root.table("hsm", required=True)
    module = h.path("module", DEFAULT_HSM_MODULE)
    token_label = h.string("token_label", _REQUIRED)
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
        tls=_tls_client(m, "tls", "plaintext"),
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
    raw_nodes = f._get("nodes", _REQUIRED)
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise f.fail("nodes", raw_nodes, "expected a non-empty list of {id, address} tables")
    nodes = []
    for i, n in enumerate(raw_nodes):
        if not isinstance(n, dict):
            raise f.fail(f"nodes[{i}]", n, "expected a table with id and address")
        nr = _Reader(n, f"forwarder.nodes[{i}].", source)
        nodes.append(LedgerNodeRef(node_id=_ident(nr, "id"), address=_address(nr, "address")))
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
        tls=_tls_client(f, "tls", "plaintext"),
    )
    f.finish()

    a = root.table("api")
    api_listen = _address(a, "listen", "127.0.0.1:7443")
    api_tls = _tls_server(a, "tls", "plaintext")
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
    metrics_address = _address(mt, "listen", "127.0.0.1:9464")
    metrics_listen = metrics_address if metrics_enabled else None
    mt.finish()
    profiles = _profiles(root) if root.has("profiles") else None
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
    )


def _mount_point(m: _Reader) -> str:
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


def _reject_prefix(m: _Reader) -> str:
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


def _profiles(root: _Reader) -> ProfilesConfig:
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


def load_gateway_config(path: Path) -> GatewayConfig:
    return parse_gateway_config(_load_toml(path), path)


def parse_ledger_config(data: Mapping[str, Any], source: Path) -> LedgerNodeConfig:
    root = _Reader(data, "", source)
    n = root.table("node", required=True)
    node_id = _ident(n, "id")
    listen = _address(n, "listen", "127.0.0.1:7001")
    db_path = n.path("db_path", _REQUIRED)
    tls = _tls_server(n, "tls", "plaintext")
    mutual = tls is not None and tls.client_ca_file is not None
    readers = n.identities("readers", tls, "node.tls")
    max_concurrent_rpcs = n.integer(
        "max_concurrent_rpcs", DEFAULT_NODE_MAX_CONCURRENT_RPCS, 1, 10_000
    )
    max_batch_bytes = n.integer(
        "max_batch_bytes", DEFAULT_NODE_MAX_BATCH_BYTES, 64 * 1024, 256 * 1024 * 1024
    )
    n.finish()
    gk = root.table("gateways", required=True)
    keys: dict[str, Path] = {}
    clients: dict[str, Identity] = {}
    for gid in list(gk._data):
        if not gid or not all(c.isalnum() or c in "-_." for c in gid):
            raise gk.fail(gid, gk._data[gid], "gateway ids are letters, digits, '-', '_', '.'")
        if isinstance(gk._data[gid], dict):
            g = gk.table(gid)
            keys[gid] = g.path("public_key")
            key_reader, key_name = g, "public_key"
            client = _gateway_client(g, mutual)
            if client is not None:
                clients[gid] = client
            g.finish()
        else:
            keys[gid] = gk.path(gid)
            key_reader, key_name = gk, gid
            if mutual:
                raise gk.fail(
                    gid,
                    gk._data[gid],
                    "with node.tls.client_ca_file set, bind the gateway to its client "
                    f'certificate: "{gid}" = {{ public_key = "...pem", client_subject = '
                    '"CN=...,O=..." }, or client_uri = "uri:..." in place of client_subject',
                )
        if not keys[gid].is_file():
            raise key_reader.fail(
                key_name, str(keys[gid]), "expected the gateway's public key PEM file"
            )
    gk.finish()
    root.finish()
    return LedgerNodeConfig(
        node_id=node_id,
        listen=listen,
        db_path=db_path,
        gateway_keys=keys,
        tls=tls,
        source=source,
        gateway_clients=clients,
        readers=readers,
        max_concurrent_rpcs=max_concurrent_rpcs,
        max_batch_bytes=max_batch_bytes,
    )


def _gateway_client(g: _Reader, mutual: bool) -> Identity | None:
    """The certificate identity a [gateways] table binds its gateway to (mutual TLS only)."""
    subject = g._get("client_subject", None)
    uri = g._get("client_uri", None)
    if subject is not None and uri is not None:
        raise g.fail("client_uri", uri, "set one of client_subject and client_uri, not both")
    if subject is None and uri is None:
        if mutual:
            raise ConfigError(
                f"config {g._source}: {g._key('client_subject')} is missing: with "
                "node.tls.client_ca_file set, each gateway is bound to its client certificate "
                'by client_subject = "CN=...,O=..." or client_uri = "uri:..."'
            )
        return None
    name, value = ("client_subject", subject) if subject is not None else ("client_uri", uri)
    if not mutual:
        raise _mutual_tls_only(g, name, value, "node.tls")
    return g.identity(name, value, uri=name == "client_uri")


def load_ledger_config(path: Path) -> LedgerNodeConfig:
    return parse_ledger_config(_load_toml(path), path)
