"""Reading TOML configuration: typed values out of tables, with one-line errors.

A wrong value stops the start with one line naming the key, the value and what is allowed.
The edge service (gateway.edge.config) and the ledger node (gateway.ledger.config) both read
their files through this; it imports nothing of either.

Hand-written on purpose. A typed-validation library (msgspec: Structs with
forbid_unknown_fields, Meta ranges, strict convert) was measured against it with the same
messages and tests, and came out longer: 938 lines against 836 for the three config modules
(721 against 681 lines of code). The config objects must stay frozen dataclasses (callers use
dataclasses.replace), so its schema declares every table a second time beside them; its
errors name the broken bound but not the value or the whole range, so a translation layer
rebuilt them from the schema; and the checks across keys (TLS pairs, PIN sources, quorum,
identities) stayed code either way. Here each key is read once, with its default and range.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.common.errors import ConfigError
from gateway.common.identity import ALLOWED, URI_PREFIX, Identity, parse_identity

REQUIRED: Any = object()


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


class Reader:
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
        if default is REQUIRED:
            raise ConfigError(
                f"config {self._source}: {self._key(name)} is missing: it is required"
            )
        return default

    def table(self, name: str, required: bool = False) -> Reader:
        self._seen.add(name)
        value = self._data.get(name)
        if value is None:
            if required:
                raise ConfigError(f"config {self._source}: [{self._key(name)}] is missing")
            value = {}
        if not isinstance(value, dict):
            raise self.fail(name, value, "expected a table")
        return Reader(value, f"{self._key(name)}.", self._source)

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

    def path(self, name: str, default: object = REQUIRED) -> Path:
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
        """One certificate identity (gateway.common.identity); `uri` True/False insists on a SAN
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
            raise mutual_tls_only(self, name, v, tls_key)
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


def mutual_tls_only(r: Reader, name: str, value: object, tls_key: str) -> ConfigError:
    return r.fail(
        name,
        value,
        f"only takes effect with mutual TLS: set {tls_key}.client_ca_file (the CA of client "
        f"certificates), or remove {name}",
    )


def address(r: Reader, name: str, default: object = REQUIRED) -> str:
    v = r.string(name, default)
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise r.fail(name, v, "expected host:port, e.g. 127.0.0.1:7443 or [::1]:7443")
    return v


def _tls_table(r: Reader, name: str, plaintext_key: str, first: str, what: str) -> Reader | None:
    """A section's [name] table, or None under `plaintext_key = true`. TLS is on by default:
    without plaintext the table and its `first` key are required."""
    if r.boolean(plaintext_key, False):
        if r.has(name):
            raise r.fail(plaintext_key, True, f"cannot be true while [{name}] is set")
        r.table(name)
        return None
    t = r.table(name)
    if not t.has(first):
        raise ConfigError(
            f"config {r._source}: {r._key(name)}.{first} is missing: TLS is on by default; "
            f"set {what}, or set {r._key(plaintext_key)} = true for a plain-text link"
        )
    return t


def tls_client(r: Reader, name: str, plaintext_key: str) -> TlsClient | None:
    t = _tls_table(r, name, plaintext_key, "ca_file", "it")
    if t is None:
        return None
    cfg = TlsClient(
        ca_file=t.path("ca_file"),
        cert_file=t.opt_path("cert_file"),
        key_file=t.opt_path("key_file"),
    )
    if (cfg.cert_file is None) != (cfg.key_file is None):
        raise t.fail("cert_file", str(cfg.cert_file), "cert_file and key_file go together")
    t.finish()
    return cfg


def tls_server(r: Reader, name: str, plaintext_key: str) -> TlsServer | None:
    t = _tls_table(r, name, plaintext_key, "cert_file", "cert_file and key_file")
    if t is None:
        return None
    cfg = TlsServer(
        cert_file=t.path("cert_file"),
        key_file=t.path("key_file"),
        client_ca_file=t.opt_path("client_ca_file"),
    )
    t.finish()
    return cfg


def load_toml(path: Path) -> dict[str, Any]:
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


def ident(r: Reader, name: str, default: object = REQUIRED) -> str:
    v = r.string(name, default)
    if len(v) > 128 or not all(c.isalnum() or c in "-_." for c in v):
        raise r.fail(name, v, "expected 1-128 characters of letters, digits, '-', '_' or '.'")
    return v
