"""`edge-gateway pki dev`: a throwaway ECDSA P-256 CA and the leaf certificates a lab needs.

For the demo, the tests and a developer's box only: the CA key lies on disk beside the
rest. Production certificates come from the carrier's own PKI; the batch-signing key is
not an X.509 key at all and never leaves the HSM.
"""

from __future__ import annotations

import datetime as dt
import grp
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.common.errors import GatewayError

ORGANIZATION = "Edge Gateway Dev PKI"
DEFAULT_HOSTS = ("127.0.0.1", "localhost", "::1")
# Longer than the 30 days within which start-up and `config check` warn of expiry.
DEFAULT_DAYS = 90
# Lab machines and VMs drift; a certificate that starts an hour ago still works on them.
BACKDATE = dt.timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class LeafSpec:
    name: str  # file stem
    common_name: str
    server: bool  # serverAuth with the host SANs; otherwise clientAuth
    purpose: str


# One shared "ledger" server certificate serves every reference ledger node on a box.
LEAVES: tuple[LeafSpec, ...] = (
    LeafSpec("mosquitto", "mosquitto", True, "MQTT broker (TLS listener)"),
    LeafSpec("gateway-api", "gateway-api", True, "the gateway's gRPC API"),
    LeafSpec("ledger", "ledger-node", True, "reference ledger nodes"),
    LeafSpec("gateway", "edge-gateway", False, "the gateway, to MQTT and to ledger nodes"),
    LeafSpec("operator", "operator", False, "admin client (list it in api.admin_subjects)"),
    LeafSpec("reader", "reader", False, "read-only client (GetStatus, health)"),
    LeafSpec("device", "device-simulator", False, "devices and `edge-gateway simulate`"),
)


class PkiError(GatewayError):
    """The dev PKI cannot be written where asked."""


@dataclass(frozen=True, slots=True)
class Issued:
    name: str
    cert: Path
    key: Path
    subject: str  # RFC 4514, e.g. "CN=operator,O=Edge Gateway Dev PKI"
    purpose: str = ""


@dataclass(frozen=True, slots=True)
class DevPki:
    dir: Path
    ca: Issued
    leaves: Mapping[str, Issued]
    not_after: dt.datetime

    def __getitem__(self, name: str) -> Issued:
        return self.leaves[name]


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


@dataclass(frozen=True, slots=True)
class Authority:
    """A CA key and certificate in memory, issuing leaves."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(
        cls,
        not_before: dt.datetime,
        not_after: dt.datetime,
        common_name: str = "Edge Gateway Dev CA",
    ) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = _name(common_name)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> Authority:
        """A dev CA written earlier, to issue more leaves (e.g. one per device)."""
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{key_path} is not an EC private key")
        return cls(key, x509.load_pem_x509_certificate(cert_path.read_bytes()))

    def issue(
        self,
        common_name: str,
        *,
        server: bool,
        hosts: Sequence[str],
        not_before: dt.datetime,
        not_after: dt.datetime,
        san_uri: str | None = None,
        subject: x509.Name | None = None,
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """A leaf for `common_name` in the dev organisation, or for `subject` when given;
        `san_uri` adds a URI SAN (e.g. a SPIFFE id) to a client certificate."""
        key = ec.generate_private_key(ec.SECP256R1())
        eku = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        b = (
            x509.CertificateBuilder()
            .subject_name(subject if subject is not None else _name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if server:
            b = b.add_extension(_san(hosts), critical=False)
        elif san_uri is not None:
            uri = x509.UniformResourceIdentifier(san_uri)
            b = b.add_extension(x509.SubjectAlternativeName([uri]), critical=False)
        return key, b.sign(self.key, hashes.SHA256())


def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """PEM, unencrypted (gRPC and the MQTT client read it unattended), mode 0600 from birth."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.chmod(0o644)


def subject_of(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


def make_dev_pki(
    out: Path,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = DEFAULT_DAYS,
    *,
    force: bool = False,
    now: dt.datetime | None = None,
    group: str | None = None,
) -> DevPki:
    """Write ca.crt/ca.key and <name>.crt/<name>.key for every entry of LEAVES into `out`.

    With `group` (root only), the directory and the leaf keys become readable by that
    group (0750, 0640, owner root), as a service running as that group needs; the CA
    key stays 0600."""
    gid = _group_id(group)
    if days < 1:
        raise PkiError(f"pki dev --days {days}: expected at least 1")
    if not hosts:
        raise PkiError("pki dev --hosts: expected at least one host name or address")
    if (out / "ca.key").exists() and not force:
        raise PkiError(
            f"pki dev: {out / 'ca.key'} exists: choose another --out directory, or --force "
            "to replace every file of the dev PKI there"
        )
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise PkiError(f"pki dev --out {out}: cannot create it: {e.strerror}") from None
    now = now or dt.datetime.now(dt.UTC)
    not_before = now - BACKDATE
    not_after = now + dt.timedelta(days=days)
    ca = Authority.create(not_before, not_after)
    try:
        write_key(out / "ca.key", ca.key)
        write_cert(out / "ca.crt", ca.cert)
        leaves: dict[str, Issued] = {}
        for spec in LEAVES:
            key, cert = ca.issue(
                spec.common_name,
                server=spec.server,
                hosts=hosts,
                not_before=not_before,
                not_after=not_after,
            )
            issued = Issued(
                spec.name,
                out / f"{spec.name}.crt",
                out / f"{spec.name}.key",
                subject_of(cert),
                spec.purpose,
            )
            write_key(issued.key, key)
            write_cert(issued.cert, cert)
            leaves[spec.name] = issued
        if gid is not None:
            os.chown(out, 0, gid)
            out.chmod(0o750)
            for issued in leaves.values():
                os.chown(issued.key, 0, gid)
                issued.key.chmod(0o640)
    except OSError as e:
        raise PkiError(f"pki dev --out {out}: cannot write: {e}") from None
    ca_issued = Issued("ca", out / "ca.crt", out / "ca.key", subject_of(ca.cert), "the dev CA")
    return DevPki(dir=out, ca=ca_issued, leaves=leaves, not_after=not_after)


def _group_id(group: str | None) -> int | None:
    if group is None:
        return None
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise PkiError(f"pki dev --group {group}: no such group") from None
    if os.geteuid() != 0:
        raise PkiError(f"pki dev --group {group}: changing owners needs root")
    return gid


def describe(pki: DevPki, hosts: Sequence[str]) -> list[str]:
    """What `pki dev` prints: one line per certificate and key written."""
    lines = [f"dev PKI in {pki.dir} (ECDSA P-256, valid until {pki.not_after:%Y-%m-%d %H:%M} UTC)"]
    rows = [pki.ca, *pki.leaves.values()]
    width = max(len(r.name) for r in rows)
    files = {r.name: f"{r.cert.name} {r.key.name}" for r in rows}
    fwidth = max(len(f) for f in files.values())
    for r in rows:
        lines.append(f"  {r.name:<{width}}  {files[r.name]:<{fwidth}}  {r.subject}")
        lines.append(f"  {'':<{width}}  {'':<{fwidth}}  {r.purpose}")
    lines.append("keys are unencrypted PEM, mode 0600")
    lines.append(f"server certificates name: {', '.join(hosts)}")
    lines.append(
        f'admin_subjects = ["{pki["operator"].subject}"] lets the operator certificate '
        "submit and read transactions"
    )
    return lines
