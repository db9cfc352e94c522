"""Device keys and the pseudonymisation key, read from files named in config.

Secrets live in files, never in a profile or the gateway TOML, and never in a
message: errors name the file, the line and the device, not the value. Files
holding secrets (HMAC device keys, the pseudonymisation key) must not be
accessible by group or others, as the HSM PIN file must not; a public key
registry may be.
"""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from gateway.edge.profiles.builtin import DEVICE_ID_RE
from gateway.edge.profiles.spec import ProfileError
from gateway.edge.profiles.tomlpos import key_lines

MIN_HMAC_KEY = 16
MAX_HMAC_KEY = 64
MIN_PSEUDONYM_KEY = 32


def check_private(path: Path, what: str) -> None:
    """Refuse a secret file that group or others may access."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ProfileError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise ProfileError(f"{what} {path} cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ProfileError(f"{what} {path} is not a regular file")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        mode = stat.S_IMODE(st.st_mode)
        raise ProfileError(f"{what} {path} is readable by others (mode {mode:04o}): chmod 600 it")


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"{what} {path} cannot be read: {type(e).__name__}") from None


def _devices(path: Path, what: str) -> tuple[dict[str, object], dict[tuple[str | int, ...], int]]:
    text = _read_text(path, what)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # tomllib's message quotes no value, only the position.
        raise ProfileError(f"{what} {path}: not valid TOML: {e}") from None
    devices = data.get("devices")
    extra = sorted(set(data) - {"devices"})
    if extra or not isinstance(devices, dict):
        raise ProfileError(
            f"{what} {path}: expected one [devices] table of device id = key"
            + (f" (unknown key {extra[0]!r})" if extra else "")
        )
    return devices, key_lines(text)


def _where(path: Path, lines: dict[tuple[str | int, ...], int], device: str) -> str:
    return f"{path}:{lines.get(('devices', device), 1)}: device {device[:64]!r}"


def read_hmac_keys(path: Path, what: str) -> dict[str, bytes]:
    """device id -> HMAC-SHA256 key, from `[devices]` entries of hex text."""
    check_private(path, what)
    devices, lines = _devices(path, what)
    out: dict[str, bytes] = {}
    for device, value in devices.items():
        if not DEVICE_ID_RE.match(device):
            raise ProfileError(f"{what} {_where(path, lines, device)}: not a valid device id")
        try:
            key = bytes.fromhex(value) if isinstance(value, str) else b""
        except ValueError:
            key = b""
        if not MIN_HMAC_KEY <= len(key) <= MAX_HMAC_KEY:
            raise ProfileError(
                f"{what} {_where(path, lines, device)}: expected a key of "
                f"{MIN_HMAC_KEY}-{MAX_HMAC_KEY} bytes as hex"
            )
        out[device] = key
    return out


def read_public_keys(path: Path, what: str) -> dict[str, ec.EllipticCurvePublicKey]:
    """device id -> P-256 public key, from `[devices]` entries of PEM SubjectPublicKeyInfo."""
    devices, lines = _devices(path, what)
    out: dict[str, ec.EllipticCurvePublicKey] = {}
    for device, value in devices.items():
        if not DEVICE_ID_RE.match(device):
            raise ProfileError(f"{what} {_where(path, lines, device)}: not a valid device id")
        try:
            key = load_pem_public_key(value.encode("ascii")) if isinstance(value, str) else None
        except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm):
            key = None
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise ProfileError(
                f"{what} {_where(path, lines, device)}: expected a P-256 public key as PEM "
                "(-----BEGIN PUBLIC KEY-----)"
            )
        out[device] = key
    return out


def read_pseudonym_key(path: Path, what: str = "profiles.pseudonym_key_file") -> bytes:
    """The gateway's pseudonymisation key: hex text of at least 32 bytes."""
    check_private(path, what)
    text = _read_text(path, what).strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < MIN_PSEUDONYM_KEY:
        raise ProfileError(
            f"{what} {path}: expected at least {MIN_PSEUDONYM_KEY} random bytes as hex "
            "(openssl rand -hex 32 > FILE)"
        )
    return key
