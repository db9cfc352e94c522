"""C2SP signed notes (c2sp.org/signed-note): a text signed by one or more keys.

Parsing is strict and bounded; verification is the spec's: signatures from unknown keys
are ignored, a known key whose signature fails rejects the whole note, and a note that no
known key verifies is rejected. Pure: no I/O, no clock; private keys stay with the caller
(an ECDSA signer is a callable over a SHA-256 digest, which is what a PKCS#11 token offers).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

SIGNATURE_PREFIX = "\u2014 "  # em dash, space
KEY_ID_SIZE = 4
# Signature type bytes assigned by c2sp.org/signed-note.
TYPE_ED25519 = 0x01
TYPE_ECDSA = 0x02
TYPE_COSIGNATURE_V1 = 0x04
# The spec asks verifiers to bound a note and to accept at least 16 signatures; 100 is the
# bound of the Go reference, and 256 KiB leaves room for 16 post-quantum signatures (~5 kB).
MAX_SIGNATURES = 100
MAX_NOTE_BYTES = 256 * 1024
# ECDSA note keys: the curves c2sp.org/signed-note allows; SHA-256 whatever the curve, as
# the reference implementation (transparency-dev/formats) verifies them.
_ECDSA_CURVES = ("secp256r1", "secp384r1", "secp521r1")


class NoteError(ValueError):
    """A note, key or signature is unusable; `reason` is a short code, `detail` says why."""

    reason = "note"

    def __init__(self, detail: str) -> None:
        super().__init__(f"{self.reason}: {detail}")
        self.detail = detail


class MalformedNote(NoteError):
    reason = "malformed_note"


class UnverifiedNote(NoteError):
    """No signature from a known key: the text must be ignored."""

    reason = "unverified_note"


class InvalidNoteSignature(NoteError):
    """A known key's signature does not verify: the whole note is rejected."""

    reason = "bad_signature"


class BadKey(NoteError):
    """A verifier key, signer key or key name that cannot be used."""

    reason = "bad_key"


class SignerFailed(NoteError):
    """A signer returned something that is not a valid signature by its key."""

    reason = "signer_failed"


# --------------------------------------------------------------------------
# Encoding helpers.
# --------------------------------------------------------------------------


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode_strict(text: str) -> bytes:
    """Standard base64 with padding, in its one canonical spelling; ValueError otherwise."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise ValueError("not base64") from None
    if b64encode(raw) != text:
        raise ValueError("not canonical base64")
    return raw


def _is_space(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch).startswith("Z")


def valid_key_name(name: str) -> bool:
    """Non-empty, no Unicode space, no plus, no control character."""
    return (
        bool(name) and "+" not in name and not any(_is_space(ch) or ord(ch) < 0x20 for ch in name)
    )


def check_key_name(name: str) -> str:
    if not valid_key_name(name):
        raise BadKey(f"key name {name!r} is empty or has a space, a plus or a control character")
    return name


def key_id(name: str, sig_type: int, public_key: bytes) -> bytes:
    """SHA-256(name || 0x0A || type || public key)[:4], the spec's recommended key ID."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([sig_type]) + public_key).digest()[
        :KEY_ID_SIZE
    ]


def ecdsa_key_id(spki_der: bytes) -> bytes:
    """Type 0x02 key ID: SHA-256 of the DER SubjectPublicKeyInfo, first 4 bytes.

    c2sp.org/signed-note assigns 0x02 to ECDSA "as implemented by transparency-dev/witness"
    and says its key ID is the truncated SHA-256 of the DER SPKI: no name, no type byte.
    transparency-dev/formats (note.NewECDSAVerifier) and sigstore-python's checkpoint code
    compute exactly this, so a checkpoint signed here verifies there.
    """
    return hashlib.sha256(spki_der).digest()[:KEY_ID_SIZE]


def _check_text_chars(text: str, what: str) -> None:
    for ch in text:
        if ord(ch) < 0x20 and ch != "\n":
            raise MalformedNote(f"{what} has control character U+{ord(ch):04X}")


# --------------------------------------------------------------------------
# The note and its signature lines.
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NoteSignature:
    """One signature line: key name, 4-byte key ID, and the signature proper."""

    name: str
    key_id: bytes
    signature: bytes

    def __post_init__(self) -> None:
        if not valid_key_name(self.name):
            raise MalformedNote(f"signature key name {self.name!r} is not a valid key name")
        if len(self.key_id) != KEY_ID_SIZE:
            raise MalformedNote(f"key ID is {len(self.key_id)} bytes, expected {KEY_ID_SIZE}")
        if not self.signature:
            raise MalformedNote(f"signature by {self.name} is empty")

    def line(self) -> str:
        return f"{SIGNATURE_PREFIX}{self.name} {b64encode(self.key_id + self.signature)}\n"


@dataclass(frozen=True, slots=True)
class Note:
    """The note text (ending in a newline) and its signature lines, in order."""

    text: str
    signatures: tuple[NoteSignature, ...]

    def __post_init__(self) -> None:
        check_note_text(self.text)
        if not self.signatures:
            raise MalformedNote("a note needs at least one signature")
        if len(self.signatures) > MAX_SIGNATURES:
            raise MalformedNote(f"{len(self.signatures)} signatures, at most {MAX_SIGNATURES}")

    def serialise(self) -> bytes:
        out = (self.text + "\n" + "".join(s.line() for s in self.signatures)).encode()
        if len(out) > MAX_NOTE_BYTES:
            raise MalformedNote(f"note is {len(out)} bytes, at most {MAX_NOTE_BYTES}")
        return out

    def with_signatures(self, added: Sequence[NoteSignature]) -> Note:
        """This note with `added` appended; an existing line by the same key is replaced."""
        keys = {(s.name, s.key_id) for s in added}
        kept = tuple(s for s in self.signatures if (s.name, s.key_id) not in keys)
        return Note(self.text, kept + tuple(added))


def check_note_text(text: str) -> str:
    """The text part of a note: ends in a newline, no control character but newline."""
    if not text.endswith("\n"):
        raise MalformedNote("note text must end with a newline")
    _check_text_chars(text, "note text")
    return text


def parse_note(data: bytes) -> Note:
    """Strict parse of a signed note; MalformedNote on any deviation from the spec."""
    if len(data) > MAX_NOTE_BYTES:
        raise MalformedNote(f"note is {len(data)} bytes, at most {MAX_NOTE_BYTES}")
    try:
        whole = data.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedNote("note is not valid UTF-8") from None
    _check_text_chars(whole, "note")
    split = whole.rfind("\n\n")
    if split < 0:
        raise MalformedNote("no blank line before the signatures")
    text, block = whole[: split + 1], whole[split + 2 :]
    if not block or not block.endswith("\n"):
        raise MalformedNote("signature block is empty or does not end with a newline")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise MalformedNote(f"{len(lines)} signatures, at most {MAX_SIGNATURES}")
    return Note(text, tuple(_parse_signature_line(line) for line in lines))


def _parse_signature_line(line: str) -> NoteSignature:
    if not line.startswith(SIGNATURE_PREFIX):
        raise MalformedNote(f"signature line does not start with an em dash: {line[:40]!r}")
    name, sep, encoded = line[len(SIGNATURE_PREFIX) :].partition(" ")
    if not sep or not valid_key_name(name):
        raise MalformedNote(f"signature line has no valid key name: {line[:40]!r}")
    try:
        raw = b64decode_strict(encoded)
    except ValueError as e:
        raise MalformedNote(f"signature by {name}: {e}") from None
    if len(raw) <= KEY_ID_SIZE:
        raise MalformedNote(f"signature by {name} is {len(raw)} bytes, key ID included")
    return NoteSignature(name, raw[:KEY_ID_SIZE], raw[KEY_ID_SIZE:])


# --------------------------------------------------------------------------
# Verifiers and signers.
# --------------------------------------------------------------------------


class NoteVerifier(Protocol):
    """A known key: its name and key ID select the signature lines it must verify."""

    @property
    def name(self) -> str: ...

    @property
    def key_id(self) -> bytes: ...

    def verify(self, text: bytes, signature: bytes) -> bool: ...

    def vkey(self) -> str: ...


class NoteSigner(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def key_id(self) -> bytes: ...

    def sign(self, text: bytes) -> bytes: ...


def format_vkey(name: str, key_id_: bytes, sig_type: int, public_key: bytes) -> str:
    """`<name>+<hex key ID>+<base64(type || public key)>`."""
    return f"{check_key_name(name)}+{key_id_.hex()}+{b64encode(bytes([sig_type]) + public_key)}"


def split_vkey(vkey: str) -> tuple[str, bytes, int, bytes]:
    """Name, key ID, signature type and public key material of a vkey (not yet checked)."""
    name, _, rest = vkey.partition("+")
    id_hex, _, encoded = rest.partition("+")
    check_key_name(name)
    if len(id_hex) != 2 * KEY_ID_SIZE or any(c not in "0123456789abcdefABCDEF" for c in id_hex):
        raise BadKey(f"vkey {vkey[:60]!r}: key ID is not 8 hex digits")
    try:
        material = b64decode_strict(encoded)
    except ValueError as e:
        raise BadKey(f"vkey {vkey[:60]!r}: {e}") from None
    if len(material) < 2:
        raise BadKey(f"vkey {vkey[:60]!r}: no key material")
    return name, bytes.fromhex(id_hex), material[0], material[1:]


def _expect_key_id(vkey: str, stated: bytes, computed: bytes) -> None:
    if stated != computed:
        raise BadKey(f"vkey {vkey[:60]!r}: key ID {stated.hex()} is not {computed.hex()}")


@dataclass(frozen=True, slots=True)
class Ed25519Verifier:
    """Type 0x01: Ed25519 (RFC 8032) over the note text."""

    name: str
    public_key: bytes
    key_id: bytes = field(init=False)

    def __post_init__(self) -> None:
        check_key_name(self.name)
        _load_ed25519_public(self.public_key)
        object.__setattr__(self, "key_id", key_id(self.name, TYPE_ED25519, self.public_key))

    def verify(self, text: bytes, signature: bytes) -> bool:
        if len(signature) != 64:
            return False
        try:
            _load_ed25519_public(self.public_key).verify(signature, text)
        except InvalidSignature:
            return False
        return True

    def vkey(self) -> str:
        return format_vkey(self.name, self.key_id, TYPE_ED25519, self.public_key)


def _load_ed25519_public(raw: bytes) -> ed25519.Ed25519PublicKey:
    if len(raw) != 32:
        raise BadKey(f"Ed25519 public key is {len(raw)} bytes, expected 32")
    try:
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise BadKey("not an Ed25519 public key") from None


def ed25519_public_bytes(key: ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, ed25519.Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True, slots=True)
class Ed25519Signer:
    """Type 0x01 signer over an Ed25519 private key held in software."""

    name: str
    private_key: ed25519.Ed25519PrivateKey = field(repr=False)
    key_id: bytes = field(init=False)

    def __post_init__(self) -> None:
        check_key_name(self.name)
        pub = ed25519_public_bytes(self.private_key)
        object.__setattr__(self, "key_id", key_id(self.name, TYPE_ED25519, pub))

    def sign(self, text: bytes) -> bytes:
        return self.private_key.sign(text)

    def verifier(self) -> Ed25519Verifier:
        return Ed25519Verifier(self.name, ed25519_public_bytes(self.private_key))


def split_skey(skey: str) -> tuple[str, bytes, int, bytes]:
    """`PRIVATE+KEY+<name>+<hex key ID>+<base64(type || private key)>` (the Go note format)."""
    if not skey.startswith("PRIVATE+KEY+"):
        raise BadKey("signer key does not start with PRIVATE+KEY+")
    try:
        return split_vkey(skey[len("PRIVATE+KEY+") :])
    except BadKey:
        # Never echo private key material into an error message.
        raise BadKey("signer key is malformed") from None


def ed25519_signer_from_skey(skey: str) -> Ed25519Signer:
    """An Ed25519 signer from a Go-style signer key; its key ID must match."""
    name, stated, sig_type, seed = split_skey(skey)
    if sig_type != TYPE_ED25519 or len(seed) != 32:
        raise BadKey(f"signer key for {name} is not an Ed25519 seed (type 0x01)")
    signer = Ed25519Signer(name, ed25519.Ed25519PrivateKey.from_private_bytes(seed))
    if signer.key_id != stated:
        raise BadKey(f"signer key for {name}: key ID {stated.hex()} does not match the key")
    return signer


def _load_ecdsa_public(spki_der: bytes) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_der_public_key(spki_der)
    except (ValueError, UnsupportedAlgorithm):
        raise BadKey("ECDSA key is not a DER SubjectPublicKeyInfo") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in _ECDSA_CURVES:
        raise BadKey("ECDSA note keys must be on P-256, P-384 or P-521")
    return key


def spki_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True, slots=True)
class EcdsaVerifier:
    """Type 0x02: DER ECDSA over SHA-256 of the note text, key ID from the SPKI alone."""

    name: str
    public_key_der: bytes
    key_id: bytes = field(init=False)

    def __post_init__(self) -> None:
        check_key_name(self.name)
        _load_ecdsa_public(self.public_key_der)
        object.__setattr__(self, "key_id", ecdsa_key_id(self.public_key_der))

    @classmethod
    def from_public_key(cls, name: str, key: ec.EllipticCurvePublicKey) -> EcdsaVerifier:
        return cls(name, spki_der(key))

    def verify(self, text: bytes, signature: bytes) -> bool:
        key = _load_ecdsa_public(self.public_key_der)
        try:
            key.verify(signature, text, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return False
        return True

    def vkey(self) -> str:
        """transparency-dev/formats' form: base64(0x02 || DER SPKI), key ID as above."""
        return format_vkey(self.name, self.key_id, TYPE_ECDSA, self.public_key_der)


@dataclass(frozen=True, slots=True)
class EcdsaDigestSigner:
    """Type 0x02 signer whose key lives elsewhere: `sign_digest(sha256(text)) -> DER`.

    A PKCS#11 token signs a digest with CKM_ECDSA; the text is hashed here. Every
    signature is verified against the public key before it is used, so a wrong key or a
    faulty token fails here instead of producing a note nobody can verify.
    """

    name: str
    public_key_der: bytes
    sign_digest: Callable[[bytes], bytes] = field(repr=False, compare=False)
    key_id: bytes = field(init=False)

    def __post_init__(self) -> None:
        check_key_name(self.name)
        _load_ecdsa_public(self.public_key_der)
        object.__setattr__(self, "key_id", ecdsa_key_id(self.public_key_der))

    def sign(self, text: bytes) -> bytes:
        digest = hashlib.sha256(text).digest()
        der = bytes(self.sign_digest(digest))
        key = _load_ecdsa_public(self.public_key_der)
        try:
            key.verify(der, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        except (InvalidSignature, ValueError):
            raise SignerFailed(
                f"signer for {self.name} returned a signature its public key does not verify"
            ) from None
        return der

    def verifier(self) -> EcdsaVerifier:
        return EcdsaVerifier(self.name, self.public_key_der)


def parse_vkey(vkey: str) -> Ed25519Verifier | EcdsaVerifier:
    """A note verifier from a vkey of type 0x01 (Ed25519) or 0x02 (ECDSA); key ID checked."""
    name, stated, sig_type, material = split_vkey(vkey)
    verifier: Ed25519Verifier | EcdsaVerifier
    if sig_type == TYPE_ED25519:
        verifier = Ed25519Verifier(name, material)
    elif sig_type == TYPE_ECDSA:
        verifier = EcdsaVerifier(name, material)
    else:
        raise BadKey(f"vkey for {name}: signature type 0x{sig_type:02x} is not supported here")
    _expect_key_id(vkey, stated, verifier.key_id)
    return verifier


# --------------------------------------------------------------------------
# Signing and verification.
# --------------------------------------------------------------------------


def signature_by(signer: NoteSigner, text: str) -> NoteSignature:
    check_note_text(text)
    return NoteSignature(check_key_name(signer.name), signer.key_id, signer.sign(text.encode()))


def sign_note(text: str, signers: Sequence[NoteSigner]) -> Note:
    """A new note: `text` signed by each of `signers`, in that order."""
    if not signers:
        raise MalformedNote("signing a note needs at least one signer")
    return Note(check_note_text(text), tuple(signature_by(s, text) for s in signers))


@dataclass(frozen=True, slots=True)
class VerifiedNote:
    """A note whose known signatures all verified; unknown ones are kept, unchecked."""

    note: Note
    verified: tuple[NoteSignature, ...]  # one per known key, first line of each
    unverified: tuple[NoteSignature, ...]

    @property
    def text(self) -> str:
        return self.note.text

    def verified_by(self, verifier: NoteVerifier) -> NoteSignature | None:
        for s in self.verified:
            if s.name == verifier.name and s.key_id == verifier.key_id:
                return s
        return None


def verifier_index(verifiers: Iterable[NoteVerifier]) -> dict[tuple[str, bytes], NoteVerifier]:
    """Known keys by (name, key ID); two different keys under one pair is a configuration
    error, since a signature line could not say which of them it claims."""
    known: dict[tuple[str, bytes], NoteVerifier] = {}
    for v in verifiers:
        k = (v.name, v.key_id)
        if k in known and known[k] != v:
            raise BadKey(f"two different keys named {v.name} with key ID {v.key_id.hex()}")
        known[k] = v
    return known


def verify_note(note: Note, verifiers: Iterable[NoteVerifier]) -> VerifiedNote:
    """Every line from a known key must verify (even a repeated one); at least one must."""
    known = verifier_index(verifiers)
    text = note.text.encode()
    verified: list[NoteSignature] = []
    unverified: list[NoteSignature] = []
    seen: set[tuple[str, bytes]] = set()
    for sig in note.signatures:
        k = (sig.name, sig.key_id)
        v = known.get(k)
        if v is None:
            unverified.append(sig)
            continue
        if not v.verify(text, sig.signature):
            raise InvalidNoteSignature(f"signature by {sig.name}+{sig.key_id.hex()} is invalid")
        if k not in seen:
            seen.add(k)
            verified.append(sig)
    if not verified:
        raise UnverifiedNote("no signature from a known key")
    return VerifiedNote(note, tuple(verified), tuple(unverified))


def open_note(data: bytes, verifiers: Iterable[NoteVerifier]) -> VerifiedNote:
    """Parse and verify in one step: what a client does with a note it received."""
    return verify_note(parse_note(data), verifiers)
