"""First-run provisioning of an edge box, as commands instead of prose.

`edge-gateway setup` does, once and idempotently, what the service needs before
its first start: the firmware profile directory, the device keys directory, the
pseudonymisation key, the HSM PIN, the SoftHSM token and the signing key, each
file with the owner and mode the service expects. `config init` writes
gateway.toml from the shipped example, `config check` checks a configuration
without starting anything, `device add` provisions one device's key.

Run as root, these commands do what touches the HSM as the service user (a
forked child that drops to its uid, gid and groups), so token files stay owned
by the user the service runs as; root only reads the PIN and writes the files
under /etc that the service may read but not change.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import pickle
import pwd
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from gateway.common import resources
from gateway.common.errors import (
    EXIT_CANTCREAT,
    EXIT_USAGE,
    ConfigError,
    GatewayError,
    HsmError,
)
from gateway.edge.config import (
    DEFAULT_PATH,
    GatewayConfig,
    PinSource,
    check_certificates,
    load_gateway_config,
    parse_gateway_config,
)

T = TypeVar("T")
SERVICE_USER = "edge-gateway"
SOFTHSM_UTIL = "softhsm2-util"
# Expiry closer than this is reported by `config check` (and logged at start).
WARN_EXPIRY_DAYS = 30


class ProvisionError(GatewayError):
    """A provisioning step cannot be done; the message says what to fix."""

    exit_code = EXIT_CANTCREAT


class UsageError(GatewayError):
    exit_code = EXIT_USAGE


# ---- accounts and privilege drop ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Account:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


def account(name: str) -> Account:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise ProvisionError(
            f"user {name!r} does not exist: install the edge-gateway package (it creates the "
            "user) or create it (useradd --system --user-group --groups softhsm "
            f"--shell /usr/sbin/nologin {name})"
        ) from None
    return Account(
        name=name,
        uid=pw.pw_uid,
        gid=pw.pw_gid,
        groups=tuple(os.getgrouplist(name, pw.pw_gid)),
        home=pw.pw_dir,
    )


def service_account(name: str | None) -> Account | None:
    """The account HSM work runs as: `name` when given; the service user when this is
    root and that user exists; otherwise None (this process's own user)."""
    if name:
        return account(name)
    if os.geteuid() == 0:
        try:
            return account(SERVICE_USER)
        except ProvisionError:
            return None
    return None


def run_as(acct: Account | None, fn: Callable[[], T]) -> T:
    """Call `fn` as `acct` in a forked child (this process keeps its privileges).

    The child's result, or its GatewayError as exit code and message, comes back
    through a pipe; a bug in the child is reported with its traceback."""
    if acct is None or os.geteuid() == acct.uid:
        return fn()
    if os.geteuid() != 0:
        raise ProvisionError(f"acting as user {acct.name!r} needs root: run this with sudo")
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        outcome: tuple[object, ...]
        try:
            os.setgroups(list(acct.groups))
            os.setgid(acct.gid)
            os.setuid(acct.uid)
            os.environ["HOME"] = acct.home
            os.environ["USER"] = os.environ["LOGNAME"] = acct.name
            outcome = ("ok", fn())
        except GatewayError as e:
            outcome = ("error", e.exit_code, str(e))
        except BaseException:
            outcome = ("bug", traceback.format_exc())
        data = pickle.dumps(outcome)
        with os.fdopen(w, "wb") as f:
            f.write(data)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        raise ProvisionError(
            f"the step run as {acct.name!r} ended without an answer (wait status {status})"
        )
    answer: tuple[Any, ...] = pickle.loads(data)  # our own child's answer
    if answer[0] == "ok":
        result: T = answer[1]
        return result
    if answer[0] == "error":
        err = GatewayError(str(answer[2]))
        err.exit_code = int(answer[1])
        raise err
    raise RuntimeError(f"step run as {acct.name!r} failed:\n{answer[1]}")


# ---- files --------------------------------------------------------------------


def _chown(path: Path, uid: int, gid: int) -> None:
    if os.geteuid() == 0:
        os.chown(path, uid, gid)


def write_file(
    path: Path, data: bytes, *, mode: int, uid: int = -1, gid: int = -1, replace: bool = False
) -> bool:
    """Write `data` atomically with `mode` and owner; False (untouched) when it exists and
    `replace` is not set. The file never exists with a wider mode than `mode`."""
    if path.exists() and not replace:
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            os.fchmod(fd, mode)
            if os.geteuid() == 0 and (uid != -1 or gid != -1):
                os.fchown(fd, uid, gid)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise ProvisionError(f"{path}: cannot write it: {e.strerror}") from None
    return True


def make_dir(path: Path, *, mode: int, uid: int = -1, gid: int = -1) -> bool:
    created = not path.is_dir()
    try:
        path.mkdir(mode=mode, parents=True, exist_ok=True)
        if created:
            os.chmod(path, mode)
            if os.geteuid() == 0:
                os.chown(path, uid, gid)
    except OSError as e:
        raise ProvisionError(f"{path}: cannot create the directory: {e.strerror}") from None
    return created


def _say(verb: str, what: str, path: Path | str, note: str = "") -> None:
    print(f"{verb:<8} {what}: {path}{f' ({note})' if note else ''}")


# ---- PIN ------------------------------------------------------------------------


def pin_path(cfg: GatewayConfig) -> Path:
    """Where the PIN is kept on disk: hsm.pin_file, or the credential's source file.

    The unit's LoadCredential= reads the credential from the config's directory
    (LoadCredential=hsm-pin:/etc/edge-gateway/hsm-pin), so outside the service the
    commands read it there."""
    src = cfg.hsm.pin
    if src.pin_file is not None:
        return src.pin_file
    assert src.credential is not None
    if os.environ.get("CREDENTIALS_DIRECTORY"):
        return Path(os.environ["CREDENTIALS_DIRECTORY"]) / src.credential
    return cfg.source.parent / src.credential


def read_pin(cfg: GatewayConfig) -> str:
    """The user PIN, read by this process (root, for a credential's root-only file)."""
    return PinSource(pin_file=pin_path(cfg), credential=None).read()


# ---- SoftHSM token and key ------------------------------------------------------


def _is_softhsm(module: Path) -> bool:
    return "softhsm" in module.name.lower()


def _token_present(cfg: GatewayConfig) -> bool:
    from gateway.edge import signer

    lib = signer._load_lib(cfg.hsm.module)
    try:
        signer._get_token(lib, cfg.hsm.token_label, cfg.hsm.module)
    except HsmError:
        return False
    return True


def _init_softhsm_token(cfg: GatewayConfig, so_pin: str, pin: str) -> None:
    """softhsm2-util --init-token with the PINs typed at its prompt through a pseudo
    terminal: never on its command line (which any local user can read in /proc),
    and it reads PINs from a terminal only."""
    util = shutil.which(SOFTHSM_UTIL) or "/usr/bin/softhsm2-util"
    if not os.access(util, os.X_OK):
        raise HsmError(f"{SOFTHSM_UTIL} not found: apt-get install softhsm2")
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(
            [util, "--init-token", "--free", "--label", cfg.hsm.token_label],
            stdin=slave,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.close(slave)
        slave = -1
        os.write(master, f"{so_pin}\n{so_pin}\n{pin}\n{pin}\n".encode())
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise HsmError(f"{SOFTHSM_UTIL} --init-token did not finish in 60 s") from None
    except OSError as e:
        raise HsmError(f"{SOFTHSM_UTIL} --init-token failed: {e.strerror}") from None
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    if proc.returncode != 0:
        said = (err or out).strip().splitlines()
        raise HsmError(
            f"{SOFTHSM_UTIL} --init-token --label {cfg.hsm.token_label} failed: "
            f"{said[-1] if said else proc.returncode} (is this user in group softhsm, "
            "and is SOFTHSM2_CONF's tokendir writable?)"
        )


@dataclass(frozen=True, slots=True)
class HsmOutcome:
    token_created: bool
    key_id: str
    public_pem: bytes
    sensitive: bool
    extractable: bool
    key_label: str
    token_label: str


def _hsm_step(cfg: GatewayConfig, pin: str, so_pin: str | None, init_key: bool) -> HsmOutcome:
    from gateway.edge import signer

    created = False
    if so_pin is not None and not _token_present(cfg):
        _init_softhsm_token(cfg, so_pin, pin)
        # The module read its token list when it was first loaded.
        signer._load_lib(cfg.hsm.module).reinitialize()
        created = True
    info = signer.init_key(cfg.hsm, pin) if init_key else signer.key_info(cfg.hsm, pin)
    return HsmOutcome(
        token_created=created,
        key_id=info.key_id.hex(),
        public_pem=info.public_pem,
        sensitive=info.sensitive,
        extractable=info.extractable,
        key_label=info.key_label,
        token_label=info.token_label,
    )


def _empty_keys_files(profiles_dir: Path, keys_dir: Path, uid: int, gid: int) -> None:
    """An empty device registry for each authenticating profile, so the service starts
    and refuses those devices (bad_device_auth) until `edge-gateway device add`."""
    from gateway.edge.profiles.profileset import read_profiles

    for p in read_profiles(profiles_dir):
        if p.auth is None:
            continue
        path = Path(p.auth.keys_file)
        path = path if path.is_absolute() else keys_dir / path
        text = f"# {p.auth.scheme} device keys for {p.id}: edge-gateway device add\n[devices]\n"
        if write_file(path, text.encode(), mode=0o600, uid=uid, gid=gid):
            _say("created", f"empty device registry for {p.id}", path)


# ---- setup ------------------------------------------------------------------------


def setup(cfg: GatewayConfig, acct: Account | None, pem_out: Path) -> int:
    """Everything the first start needs, kept where it exists."""
    uid = acct.uid if acct else -1
    gid = acct.gid if acct else -1
    root_gid = gid  # files root owns and the service reads: root:<service group>
    pc = cfg.profiles
    if pc is not None:
        if make_dir(pc.dir, mode=0o750, uid=0, gid=root_gid):
            _say("created", "profiles directory", pc.dir)
        if not any(pc.dir.glob("*.toml")):
            shipped = resources.path("firmware_profiles")
            for src in sorted(shipped.glob("*.toml")):
                write_file(pc.dir / src.name, src.read_bytes(), mode=0o640, uid=0, gid=root_gid)
            _say("copied", "shipped firmware profiles", pc.dir, "edit or remove to taste")
        else:
            _say("kept", "profiles", pc.dir)
        if make_dir(pc.keys_dir, mode=0o750, uid=0, gid=root_gid):
            _say("created", "device keys directory", pc.keys_dir)
        _empty_keys_files(pc.dir, pc.keys_dir, uid, gid)
        if pc.pseudonym_key_file is not None:
            key = (secrets.token_hex(32) + "\n").encode("ascii")
            if write_file(pc.pseudonym_key_file, key, mode=0o600, uid=uid, gid=gid):
                _say("created", "pseudonymisation key", pc.pseudonym_key_file, "32 random bytes")
            else:
                _say("kept", "pseudonymisation key", pc.pseudonym_key_file)
    if cfg.mqtt.password_file is not None:
        # The gateway's password to the broker's gateways' listener (`broker config`
        # hashes it for the broker): the service reads it, root writes it.
        secret = (secrets.token_hex(24) + "\n").encode("ascii")
        if write_file(cfg.mqtt.password_file, secret, mode=0o640, uid=0, gid=root_gid):
            _say("created", "MQTT password", cfg.mqtt.password_file, "random, mode 0640")
        else:
            _say("kept", "MQTT password", cfg.mqtt.password_file)
    pin_file = pin_path(cfg)
    # A credential's source is read by root (systemd copies it for the service); a plain
    # pin_file is read by the service itself.
    pin_uid, pin_gid = (uid, gid) if cfg.hsm.pin.pin_file is not None else (0, 0)
    if write_file(
        pin_file, (secrets.token_hex(16) + "\n").encode(), mode=0o600, uid=pin_uid, gid=pin_gid
    ):
        _say("created", "HSM user PIN", pin_file, "random, mode 0600")
    else:
        _say("kept", "HSM user PIN", pin_file)
    pin = read_pin(cfg)
    so_pin: str | None = None
    if _is_softhsm(cfg.hsm.module):
        so_file = pin_file.with_name(pin_file.name + "-so")
        if write_file(so_file, (secrets.token_hex(16) + "\n").encode(), mode=0o600, uid=0, gid=0):
            _say("created", "HSM security officer PIN", so_file, "keep a copy offline")
        so_pin = PinSource(pin_file=so_file, credential=None).read()
    outcome = run_as(acct, lambda: _hsm_step(cfg, pin, so_pin, init_key=True))
    if outcome.token_created:
        _say("created", "HSM token", outcome.token_label, f"as user {acct.name if acct else ''}")
    else:
        _say("kept", "HSM token", outcome.token_label)
    _say("ready", "signing key", outcome.key_label, f"key_id {outcome.key_id}")
    write_file(pem_out, outcome.public_pem, mode=0o644, uid=0, gid=0, replace=True)
    _say("wrote", "public key (give it to the ledger operators)", pem_out)
    print(
        "next: install the TLS files named in the config, run `edge-gateway config check "
        f"--config {cfg.source}`, give the broker `edge-gateway broker config --config "
        f"{cfg.source}`'s files, then `systemctl enable --now edge-gateway`"
    )
    return 0


# ---- config init ------------------------------------------------------------------


_ADDR = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})$")
_IDENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _address(text: str, what: str) -> tuple[str, int]:
    m = _ADDR.match(text)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise UsageError(f"{what} {text!r}: expected HOST:PORT (an IPv6 address in [ ])")
    return m.group(1), int(m.group(2))


def _sub(text: str, pattern: str, repl: str) -> str:
    new, n = re.subn(pattern, lambda _m: repl, text, count=1, flags=re.MULTILINE)
    if n != 1:
        raise RuntimeError(f"the shipped example config has no line matching {pattern!r}")
    return new


def render_config(gateway_id: str, mqtt: str, ledgers: Sequence[str], quorum: int | None) -> str:
    """The shipped examples/gateway.toml with this site's values in place."""
    if not _IDENT.match(gateway_id):
        raise UsageError(f"--gateway-id {gateway_id!r}: letters, digits, '.', '_', '-' (<= 64)")
    host, port = _address(mqtt, "--mqtt")
    nodes: list[tuple[str, str]] = []
    for item in ledgers:
        node_id, sep, addr = item.partition("=")
        if not sep or not _IDENT.match(node_id):
            raise UsageError(f"--ledger {item!r}: expected NODE_ID=HOST:PORT")
        _address(addr, "--ledger")
        nodes.append((node_id, addr))
    if not nodes:
        raise UsageError("--ledger: give at least one NODE_ID=HOST:PORT")
    q = quorum if quorum is not None else len(nodes) // 2 + 1
    if not 1 <= q <= len(nodes):
        raise UsageError(f"--quorum {q}: expected 1 to {len(nodes)} (the number of --ledger)")
    text = (resources.path("examples") / "gateway.toml").read_text(encoding="utf-8")
    text = _sub(text, r'^id = "[^"]*"', f'id = "{gateway_id}"')
    text = _sub(text, r'^client_id = "[^"]*"', f'client_id = "{gateway_id}"')
    text = _sub(text, r'^username = "[^"]*"', f'username = "{gateway_id}"')
    text = _sub(text, r'^host = "[^"]*"', f'host = "{host.strip("[]")}"')
    text = _sub(text, r"^port = \d+", f"port = {port}")
    rows = "\n".join(f'  {{ id = "{n}", address = "{a}" }},' for n, a in nodes)
    text = _sub(text, r"^nodes = \[\n(?:  \{[^\n]*\},\n)+\]", f"nodes = [\n{rows}\n]")
    text = _sub(text, r"^quorum = \d+", f"quorum = {q}")
    # The log's origin names this gateway: the example's domain, this gateway's id.
    origin = re.search(r'^origin = "([^"/]+)/edge-gateway/[^"]*"', text, flags=re.MULTILINE)
    if origin is None:
        raise RuntimeError("the shipped example config has no [log] origin line")
    text = _sub(
        text, r'^origin = "[^"]*"', f'origin = "{origin.group(1)}/edge-gateway/{gateway_id}"'
    )
    return text


def config_init(args: argparse.Namespace) -> int:
    text = render_config(args.gateway_id, args.mqtt, args.ledger, args.quorum)
    out: Path = args.out
    parse_gateway_config(_toml(text, out), out)  # what we write must load
    acct = service_account(args.user)
    if out.exists() and not args.force:
        raise ProvisionError(f"{out} exists: edit it, or pass --force to replace it")
    if acct is not None:
        make_dir(out.parent, mode=0o750, uid=0, gid=acct.gid)
    write_file(
        out, text.encode("utf-8"), mode=0o640, uid=0, gid=acct.gid if acct else -1, replace=True
    )
    _say("wrote", "gateway configuration", out)
    return 0


def _toml(text: str, source: Path) -> dict[str, object]:
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {source}: not valid TOML: {e}") from None


# ---- config check -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckReport:
    lines: tuple[str, ...]


def _service_side_checks(cfg: GatewayConfig, pin: str) -> CheckReport:
    """What the service itself reads, checked as the service's user."""
    from gateway.edge.profiles import ProfileSet

    lines: list[str] = []
    now = dt.datetime.now(dt.UTC)
    warnings = check_certificates(cfg, now=now, warn_days=WARN_EXPIRY_DAYS)
    lines.append("ok       TLS files: present, readable, matching, within their validity")
    lines += [f"warning  {w}" for w in warnings]
    ps = ProfileSet.from_config(cfg)
    lines.append(f"ok       firmware profiles: {', '.join(ps.names())}")
    spool_dir = cfg.spool.path.parent
    if not spool_dir.is_dir():
        lines.append(
            f"note     spool directory {spool_dir} does not exist yet (the unit's "
            "StateDirectory= creates /var/lib/edge-gateway)"
        )
    elif not os.access(spool_dir, os.W_OK):
        raise ProvisionError(f"spool.path {cfg.spool.path}: {spool_dir} is not writable")
    else:
        lines.append(f"ok       spool directory {spool_dir} writable")
    out = _hsm_step(cfg, pin, None, init_key=False)
    if out.sensitive is not True or out.extractable is not False:
        raise HsmError(
            f"hsm key {out.key_label!r} is not sensitive and non-extractable: create a new key"
        )
    lines.append(
        f"ok       HSM: logged in to token {out.token_label!r}, key {out.key_label!r} "
        f"key_id {out.key_id} (sensitive, not extractable)"
    )
    return CheckReport(tuple(lines))


def config_check(args: argparse.Namespace) -> int:
    cfg = load_gateway_config(args.config)
    print(f"ok       configuration {args.config}: gateway {cfg.gateway_id}")
    pin = read_pin(cfg)
    acct = service_account(args.user)
    report = run_as(acct, lambda: _service_side_checks(cfg, pin))
    for line in report.lines:
        print(line)
    who = f" as user {acct.name}" if acct else ""
    print(f"ok       all checks passed{who}; nothing was started")
    return 0


# ---- device keys --------------------------------------------------------------


def device_add(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from gateway.edge.profiles.builtin import DEVICE_ID_RE
    from gateway.edge.profiles.profileset import read_profiles

    cfg = load_gateway_config(args.config)
    if cfg.profiles is None:
        raise ConfigError(f"config {cfg.source}: no [profiles] table: devices need no keys")
    device: str = args.device
    if not DEVICE_ID_RE.match(device):
        raise UsageError(f"device id {device[:80]!r}: letters, digits, '.', '_', '-', ':'")
    profiles = [p for p in read_profiles(cfg.profiles.dir) if args.profile in (p.name, p.id)]
    if len(profiles) != 1:
        raise UsageError(
            f"--profile {args.profile!r}: expected one profile of {cfg.profiles.dir} by name "
            f"or name@version, found {len(profiles)}"
        )
    profile = profiles[0]
    if profile.auth is None:
        raise UsageError(f"profile {profile.id} authenticates no device: it needs no key")
    path = Path(profile.auth.keys_file)
    path = path if path.is_absolute() else cfg.profiles.keys_dir / path
    acct = service_account(args.user)
    existing = path.read_text(encoding="utf-8") if path.exists() else ""
    if re.search(rf'^"{re.escape(device)}"\s*=', existing, flags=re.MULTILINE):
        raise ProvisionError(f"{path}: device {device!r} already has a key: remove its line first")
    secret_out = ""
    if profile.auth.scheme == "hmac-sha256":
        if args.public_key is not None:
            raise UsageError(f"profile {profile.id} uses HMAC keys: drop --public-key")
        key = secrets.token_bytes(32)
        entry = f'"{device}" = "{key.hex()}"\n'
        secret_out = key.hex()
    else:
        if args.public_key is None:
            raise UsageError(
                f"profile {profile.id} verifies ECDSA signatures: give the device's public key "
                "with --public-key FILE (PEM)"
            )
        try:
            pub = serialization.load_pem_public_key(args.public_key.read_bytes())
        except (OSError, ValueError) as e:
            raise UsageError(
                f"--public-key {args.public_key}: not a PEM public key ({e})"
            ) from None
        if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name != "secp256r1":
            raise UsageError(f"--public-key {args.public_key}: expected a P-256 key")
        pem = pub.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")
        entry = f'"{device}" = """\n{pem}"""\n'
    if not existing:
        existing = f"# {profile.auth.scheme} device keys for {profile.id}\n[devices]\n"
    elif "[devices]" not in existing:
        existing += "[devices]\n"
    write_file(
        path,
        (existing.rstrip("\n") + "\n" + entry).encode("utf-8"),
        mode=0o600,
        uid=acct.uid if acct else -1,
        gid=acct.gid if acct else -1,
        replace=True,
    )
    _say("added", f"device {device} to", path)
    if secret_out:
        # The device's copy of the key goes to its provisioning system; it is shown once.
        print(f"key      {secret_out}")
    print("reload: systemctl reload edge-gateway (SIGHUP re-reads profiles and keys)")
    return 0


# ---- command line -------------------------------------------------------------------


def _cmd_setup(args: argparse.Namespace) -> int:
    cfg = load_gateway_config(args.config)
    acct = service_account(args.user)
    pem = args.pem_out or cfg.source.parent / "batch-key.pem"
    return setup(cfg, acct, pem)


def add_setup_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=DEFAULT_PATH)
    p.add_argument(
        "--user",
        help=f"the service's user, owner of the token and keys (default {SERVICE_USER} as root)",
    )
    p.add_argument(
        "--pem-out", type=Path, help="the public key PEM (default: batch-key.pem beside config)"
    )
    p.set_defaults(fn=_cmd_setup)


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="config_cmd", required=True)
    ip = sub.add_parser("init", help="write gateway.toml from the shipped example")
    ip.add_argument("--out", type=Path, default=DEFAULT_PATH)
    ip.add_argument("--gateway-id", required=True, help="this gateway's id (one log per id)")
    ip.add_argument("--mqtt", required=True, metavar="HOST:PORT", help="the MQTT broker (TLS)")
    ip.add_argument(
        "--ledger",
        action="append",
        default=[],
        metavar="NODE_ID=HOST:PORT",
        help="a ledger node; repeat for each",
    )
    ip.add_argument("--quorum", type=int, help="receipts a batch needs (default: a majority)")
    ip.add_argument("--user", help=f"group that may read it (default {SERVICE_USER} as root)")
    ip.add_argument("--force", action="store_true", help="replace an existing file")
    ip.set_defaults(fn=config_init)

    cp = sub.add_parser(
        "check", help="validate config, profiles, keys, TLS files and HSM login; start nothing"
    )
    cp.add_argument("--config", type=Path, default=DEFAULT_PATH)
    cp.add_argument("--user", help=f"check as this user (default {SERVICE_USER} as root)")
    cp.set_defaults(fn=config_check)


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="device_cmd", required=True)
    ap = sub.add_parser("add", help="give a device a key for its profile's authentication")
    ap.add_argument("device", help="the device id (its topic level)")
    ap.add_argument("--profile", required=True, help="profile name or name@version")
    ap.add_argument("--public-key", type=Path, help="the device's P-256 public key (ECDSA)")
    ap.add_argument("--config", type=Path, default=DEFAULT_PATH)
    ap.add_argument("--user", help=f"owner of the keys file (default {SERVICE_USER} as root)")
    ap.set_defaults(fn=device_add)
