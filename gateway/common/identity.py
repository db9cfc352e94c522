"""Who a client certificate is: the exact identities roles name in the configuration.

An identity is a SAN URI (`uri:spiffe://carrier.example/oss/submitter`) or a whole subject
DN, parsed once from its RFC 4514 string and compared as a structure: the same attributes
with the same values in the same order. Never a substring, never a common name alone:
every device and client holds a certificate from the carrier's CA, and some are
compromised, so anything less than the exact identity lets one of them pass for another.
The TLS handshake has already verified the chain against the configured client CA; the
certificate read here is the one it verified.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography import x509

URI_PREFIX = "uri:"
ALLOWED = (
    'expected "uri:<SAN URI>" (e.g. "uri:spiffe://carrier.example/oss/submitter") or the '
    'certificate\'s full subject DN as RFC 4514 (e.g. "CN=operator,O=Example Carrier", as '
    "`openssl x509 -noout -subject -nameopt RFC2253` prints it)"
)


@dataclass(frozen=True, slots=True)
class Identity:
    """One configured identity: exactly one of `uri` and `subject` is set."""

    text: str  # as configured, for messages
    uri: str | None = None
    subject: x509.Name | None = None

    def matches(self, peer: PeerCertificate) -> bool:
        if self.uri is not None:
            return self.uri in peer.uris
        return self.subject is not None and self.subject == peer.subject

    def __reduce__(self) -> tuple[object, tuple[str]]:
        # x509.Name does not pickle; the configuration travels to the intake processes.
        return parse_identity, (self.text,)


def parse_identity(text: str) -> Identity:
    """`uri:<SAN URI>` or an RFC 4514 DN; ValueError saying what is wrong and what is allowed."""
    if text.startswith(URI_PREFIX):
        uri = text[len(URI_PREFIX) :]
        scheme, sep, rest = uri.partition(":")
        if not sep or not scheme or not rest or any(c.isspace() for c in uri):
            raise ValueError(f"not a URI after 'uri:'; {ALLOWED}")
        return Identity(text=text, uri=uri)
    if not text:
        raise ValueError(f"an empty identity; {ALLOWED}")
    if "=" not in text:
        raise ValueError(
            "a bare name is not an identity (any certificate from the CA may carry it as its "
            f"common name): write the certificate's full subject DN, e.g. \"CN={text},O=Example "
            'Carrier" (`openssl x509 -noout -subject -nameopt RFC2253` prints it), or '
            '"uri:<SAN URI>"'
        )
    try:
        name = x509.Name.from_rfc4514_string(text)
    except ValueError:
        raise ValueError(
            "not an RFC 4514 DN (attribute names in capitals, no spaces around ',' and '='); "
            f"{ALLOWED}"
        ) from None
    if not list(name):
        raise ValueError(f"an empty DN; {ALLOWED}")
    return Identity(text=text, subject=name)


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """The client's verified certificate, as far as identities are concerned."""

    subject: x509.Name
    uris: frozenset[str]

    @property
    def description(self) -> str:
        """For logs and refusals: the subject, and the SAN URIs if any."""
        text = self.subject.rfc4514_string() or "an empty subject"
        if self.uris:
            text += " (" + ", ".join(sorted(self.uris)) + ")"
        return text

    def is_any(self, identities: Iterable[Identity]) -> bool:
        return any(i.matches(self) for i in identities)


@functools.lru_cache(maxsize=256)
def _parse_certificate(pem: bytes) -> PeerCertificate | None:
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = frozenset(san.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        uris = frozenset()
    return PeerCertificate(cert.subject, uris)


def peer_certificate(auth_context: Mapping[str, Iterable[bytes]]) -> PeerCertificate | None:
    """The client certificate from grpc's auth context (x509_pem_cert, the leaf the TLS
    handshake verified); None without one."""
    pems = list(auth_context.get("x509_pem_cert", ()))
    return _parse_certificate(bytes(pems[0])) if pems else None
