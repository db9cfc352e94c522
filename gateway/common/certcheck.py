"""Start-up checks of the TLS files a configuration names.

Every certificate, key and CA file must exist, be readable, parse, be inside its validity
window, and every key must belong to its certificate. Otherwise the start stops with one
line naming the config key, the path and the fix (CertificateError, exit code 79), rather
than with a handshake failure minutes later on some other host's log.
"""

from __future__ import annotations

import datetime as dt
import re
import warnings
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.utils import CryptographyDeprecationWarning

from gateway.common.errors import CertificateError
from gateway.common.tomlconfig import TlsClient, TlsServer

_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


def _when(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S UTC")


class _Checker:
    def __init__(self, source: Path, now: dt.datetime, warn_days: int = 0) -> None:
        self.source = source
        self.now = now
        self.warn_before = now + dt.timedelta(days=warn_days)
        self.warnings: list[str] = []

    def fail(self, key: str, path: Path, problem: str) -> CertificateError:
        return CertificateError(f"config {self.source}: {key} {path} {problem}")

    def read(self, key: str, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise self.fail(key, path, "does not exist: fix the path or install the file") from None
        except IsADirectoryError:
            raise self.fail(key, path, "is a directory: expected a PEM file") from None
        except PermissionError:
            raise self.fail(
                key, path, "is not readable by this user: fix its owner or mode"
            ) from None
        except OSError as e:
            raise self.fail(key, path, f"cannot be read: {e.strerror}") from None

    def certificates(self, key: str, path: Path) -> list[x509.Certificate]:
        data = self.read(key, path)
        if b"-----BEGIN CERTIFICATE-----" not in data:
            raise self.fail(
                key, path, "holds no PEM certificate: expected -----BEGIN CERTIFICATE-----"
            )
        try:
            return x509.load_pem_x509_certificates(data)
        except ValueError as e:
            raise self.fail(key, path, f"is not a valid PEM certificate ({e})") from None

    def in_window(self, key: str, path: Path, cert: x509.Certificate) -> None:
        subject = cert.subject.rfc4514_string() or "(empty subject)"
        if cert.not_valid_after_utc < self.now:
            raise self.fail(
                key,
                path,
                f"expired on {_when(cert.not_valid_after_utc)} ({subject}): renew it",
            )
        if cert.not_valid_before_utc > self.now:
            raise self.fail(
                key,
                path,
                f"is not valid before {_when(cert.not_valid_before_utc)} ({subject}): "
                "check this machine's clock, or reissue it",
            )
        if cert.not_valid_after_utc < self.warn_before and not any(
            f" {path} expires" in w for w in self.warnings
        ):
            days = (cert.not_valid_after_utc - self.now).days
            self.warnings.append(
                f"config {self.source}: {key} {path} expires on "
                f"{_when(cert.not_valid_after_utc)}, in {days} days ({subject}): renew it"
            )

    def private_key(self, key: str, path: Path) -> PrivateKeyTypes:
        data = self.read(key, path)
        try:
            return serialization.load_pem_private_key(data, password=None)
        except TypeError:
            raise self.fail(
                key,
                path,
                "is encrypted: the service reads it unattended, so store it unencrypted "
                "with mode 0600",
            ) from None
        except (ValueError, UnsupportedAlgorithm):
            raise self.fail(key, path, "is not a PEM private key") from None

    def ca(self, key: str, path: Path) -> None:
        data = self.read(key, path)
        # A bundle may hold a retired root beside the current one, or (a system bundle) a
        # certificate this parser is stricter about than OpenSSL: it is usable while one
        # certificate in it parses and is valid now.
        certs = []
        for block in _PEM_CERT.findall(data):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", CryptographyDeprecationWarning)
                    certs.append(x509.load_pem_x509_certificate(block))
            except ValueError:
                continue
        if not certs:
            certs = self.certificates(key, path)  # raises the precise reason
        problems: list[CertificateError] = []
        for cert in certs:
            try:
                self.in_window(key, path, cert)
                return
            except CertificateError as e:
                problems.append(e)
        raise problems[0]

    def pair(self, prefix: str, cert_path: Path, key_path: Path) -> None:
        cert_key, key_key = f"{prefix}.cert_file", f"{prefix}.key_file"
        chain = self.certificates(cert_key, cert_path)
        for cert in chain:
            self.in_window(cert_key, cert_path, cert)
        private = self.private_key(key_key, key_path)
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if private.public_key().public_bytes(der, spki) != chain[0].public_key().public_bytes(
            der, spki
        ):
            raise self.fail(
                key_key,
                key_path,
                f"does not match {cert_key} {cert_path}: use the key that certificate was "
                "issued for",
            )

    def client(self, prefix: str, tls: TlsClient | None) -> None:
        if tls is None:
            return
        self.ca(f"{prefix}.ca_file", tls.ca_file)
        if tls.cert_file is not None and tls.key_file is not None:
            self.pair(prefix, tls.cert_file, tls.key_file)

    def server(self, prefix: str, tls: TlsServer | None) -> None:
        if tls is None:
            return
        self.pair(prefix, tls.cert_file, tls.key_file)
        if tls.client_ca_file is not None:
            self.ca(f"{prefix}.client_ca_file", tls.client_ca_file)


def _now(now: dt.datetime | None) -> dt.datetime:
    return now if now is not None else dt.datetime.now(dt.UTC)


def check(
    source: Path,
    *,
    clients: tuple[tuple[str, TlsClient | None], ...] = (),
    servers: tuple[tuple[str, TlsServer | None], ...] = (),
    now: dt.datetime | None = None,
    warn_days: int = 30,
) -> list[str]:
    """Raise CertificateError for the first unusable TLS file of the named sections (config
    key prefix, e.g. "mqtt.tls"); return one line for each certificate that expires within
    `warn_days`."""
    c = _Checker(source, _now(now), warn_days)
    for prefix, client in clients:
        c.client(prefix, client)
    for prefix, server in servers:
        c.server(prefix, server)
    return c.warnings
