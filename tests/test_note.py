"""C2SP signed notes: gateway.formats.note against the spec's rules.

Every key, vkey, signer key and note here is made in the test: by our signers, or
written from the rules of c2sp.org/signed-note (key IDs, vkey layout) and of the signer-key
layout that gateway.formats.note reads. Checked: verification, tampering, malformed input and key
handling, and properties over random texts and bytes.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.formats import note
from gateway.formats.note import (
    BadKey,
    EcdsaDigestSigner,
    EcdsaVerifier,
    Ed25519Signer,
    InvalidNoteSignature,
    MalformedNote,
    NoteError,
    SignerFailed,
    UnverifiedNote,
)


def ed_key(seed_text: str) -> ed25519.Ed25519PrivateKey:
    """TEST ONLY: an Ed25519 key from SHA-256 of a label."""
    return ed25519.Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed_text.encode()).digest())


def p256_key(label: str) -> ec.EllipticCurvePrivateKey:
    """TEST ONLY: a P-256 key whose scalar is SHA-256 of a label (mod n)."""
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    d = int.from_bytes(hashlib.sha256(label.encode()).digest(), "big") % n
    return ec.derive_private_key(d, ec.SECP256R1())


def digest_signer(key: ec.EllipticCurvePrivateKey) -> Callable[[bytes], bytes]:
    """What an HSM offers: sign a SHA-256 digest, return DER."""

    def sign_digest(digest: bytes) -> bytes:
        assert len(digest) == 32
        return key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))

    return sign_digest


def ed_signer() -> Ed25519Signer:
    return Ed25519Signer("edge.example/ed", ed_key("tamper"))


def ec_signer() -> EcdsaDigestSigner:
    k = p256_key("tamper")
    return EcdsaDigestSigner("edge.example/ec", note.spki_der(k.public_key()), digest_signer(k))


TEXT = "edge.example/edge-gateway/gw-1\n42\n" + base64.b64encode(bytes(range(32))).decode() + "\n"


def spec_vkey(name: str, material: bytes) -> str:
    """A vkey as the spec lays it out, its key ID SHA-256(name || 0x0A || material)[:4]."""
    kid = hashlib.sha256(name.encode() + b"\n" + material).digest()[:4]
    return f"{name}+{kid.hex()}+{base64.b64encode(material).decode()}"


def spec_skey(name: str, seed: bytes) -> str:
    """An Ed25519 signer key: PRIVATE+KEY+<name>+<key ID>+base64(0x01 || seed)."""
    public = note.ed25519_public_bytes(ed25519.Ed25519PrivateKey.from_private_bytes(seed))
    kid = hashlib.sha256(name.encode() + b"\n\x01" + public).digest()[:4]
    encoded = base64.b64encode(bytes([note.TYPE_ED25519]) + seed).decode()
    return f"PRIVATE+KEY+{name}+{kid.hex()}+{encoded}"


# --------------------------------------------------------------------------
# Ed25519 (type 0x01): keys and notes made here.
# --------------------------------------------------------------------------


def test_open_verifies_known_keys_and_keeps_unknown_ones() -> None:
    a = Ed25519Signer("edge.example/a", ed_key("a"))
    b = Ed25519Signer("edge.example/b", ed_key("b"))
    both = note.sign_note(TEXT, [a, b]).serialise()
    one = note.open_note(both, [a.verifier()])
    assert one.text == TEXT
    assert [s.name for s in one.verified] == [a.name]
    assert [s.name for s in one.unverified] == [b.name]
    two = note.open_note(both, [a.verifier(), b.verifier()])
    assert [s.name for s in two.verified] == [a.name, b.name]
    assert two.unverified == ()
    with pytest.raises(UnverifiedNote):
        note.open_note(both, [])


def test_more_than_one_hundred_signatures_is_malformed() -> None:
    signer = ed_signer()
    line = note.signature_by(signer, TEXT).line()
    data = (TEXT + "\n" + line * 101).encode()
    with pytest.raises(MalformedNote):
        note.open_note(data, [signer.verifier()])
    repeated = (TEXT + "\n" + line * 100).encode()
    opened = note.open_note(repeated, [signer.verifier()])
    assert len(opened.verified) == 1  # a repeated line counts once


def test_corrupted_signature_by_a_known_key_rejects_the_note() -> None:
    signer = ed_signer()
    good = note.signature_by(signer, TEXT)
    # Three bytes inserted into the signature: a line of the right key ID that cannot verify.
    longer = good.signature[:30] + b"\xab\xcd\xef" + good.signature[30:]
    data = note.Note(TEXT, (note.NoteSignature(good.name, good.key_id, longer),)).serialise()
    with pytest.raises(InvalidNoteSignature):
        note.open_note(data, [signer.verifier()])


def spki_vkey(name: str, der: bytes) -> str:
    """A type 0x02 vkey as the spec lays it out, its key ID SHA-256(DER SPKI)[:4]."""
    material = bytes([note.TYPE_ECDSA]) + der
    return f"{name}+{hashlib.sha256(der).digest()[:4].hex()}+{base64.b64encode(material).decode()}"


def _bad_vkey(case: str) -> str:
    ed = ed_signer().verifier()
    ec_ = ec_signer().verifier()
    ec_material = ec_.vkey().split("+", 2)[2]
    cases = {
        "ed25519 key of 33 bytes": spec_vkey(ed.name, b"\x01" + ed.public_key + b"\x00"),
        "ed25519 key of 31 bytes": spec_vkey(ed.name, b"\x01" + ed.public_key[:31]),
        "unknown signature type": spec_vkey(ed.name, b"\x7f" + ed.public_key),
        "ecdsa key that is not DER": spki_vkey(ec_.name, b"\x30\x00"),
        "no key material": f"{ec_.name}+{ec_.key_id.hex()}",
        "key material not base64": f"{ec_.name}+{ec_.key_id.hex()}+not_base64!",
        "key ID not hex": f"{ec_.name}+notahex1+{ec_material}",
        "key ID of another key": f"{ec_.name}+00000000+{ec_material}",
    }
    assert ec_.key_id != bytes(4)
    return cases[case]


@pytest.mark.parametrize(
    "case",
    [
        "ed25519 key of 33 bytes",
        "ed25519 key of 31 bytes",
        "unknown signature type",
        "ecdsa key that is not DER",
        "no key material",
        "key material not base64",
        "key ID not hex",
        "key ID of another key",
    ],
)
def test_bad_vkeys_are_refused(case: str) -> None:
    with pytest.raises(BadKey):
        note.parse_vkey(_bad_vkey(case))


def test_every_mangling_of_a_vkey_is_refused() -> None:
    # Every proper substring, and every character plus one.
    vkey = ed_signer().verifier().vkey()
    assert vkey == spec_vkey("edge.example/ed", b"\x01" + ed_signer().verifier().public_key)
    assert note.parse_vkey(vkey).vkey() == vkey
    for i in range(len(vkey) + 1):
        for j in range(i + 1, len(vkey) + 1):
            if (i, j) != (0, len(vkey)):
                with pytest.raises(BadKey):
                    note.parse_vkey(vkey[i:j])
    for i in range(len(vkey)):
        mangled = vkey[:i] + chr(ord(vkey[i]) + 1) + vkey[i + 1 :]
        with pytest.raises(BadKey):
            note.parse_vkey(mangled)


def test_every_mangling_of_a_signer_key_is_refused_without_echoing_it() -> None:
    skey = spec_skey("edge.example/ed", ed_key("tamper").private_bytes_raw())
    assert note.ed25519_signer_from_skey(skey).verifier() == ed_signer().verifier()
    for i in range(len(skey)):
        mangled = skey[:i] + chr(ord(skey[i]) + 1) + skey[i + 1 :]
        with pytest.raises(BadKey) as e:
            note.ed25519_signer_from_skey(mangled)
        assert skey.split("+", 4)[4][:12] not in str(e.value)


# --------------------------------------------------------------------------
# ECDSA (type 0x02).
# --------------------------------------------------------------------------


def test_ecdsa_vkey_names_its_key_by_the_spki_alone() -> None:
    v = ec_signer().verifier()
    parsed = note.parse_vkey(v.vkey())
    assert isinstance(parsed, EcdsaVerifier) and parsed == v
    assert v.vkey() == spki_vkey(v.name, v.public_key_der)
    # The key ID is SHA-256 of the DER SubjectPublicKeyInfo, nothing else.
    assert v.key_id == hashlib.sha256(v.public_key_der).digest()[:4]


def test_ecdsa_key_under_another_name_does_not_verify() -> None:
    signer = ec_signer()
    signed = note.sign_note(TEXT, [signer]).serialise()
    _, kid, material = signer.verifier().vkey().split("+", 2)
    v = note.parse_vkey(f"other.example/ec+{kid}+{material}")
    assert v.key_id == signer.key_id
    with pytest.raises(UnverifiedNote):
        note.open_note(signed, [v])


def test_ecdsa_digest_signer_signs_what_the_verifier_accepts() -> None:
    key = p256_key("ecdsa-note")
    der = note.spki_der(key.public_key())
    signer = EcdsaDigestSigner("edge.example/log", der, digest_signer(key))
    signed = note.sign_note("hello\n", [signer]).serialise()
    assert note.open_note(signed, [signer.verifier()]).verified[0].key_id == signer.key_id
    assert (
        signer.verifier()
        .vkey()
        .startswith(f"edge.example/log+{hashlib.sha256(der).digest()[:4].hex()}+Aj")
    )


def test_ecdsa_digest_signer_refuses_a_signature_its_key_does_not_verify() -> None:
    key, other = p256_key("right"), p256_key("wrong")
    wrong = EcdsaDigestSigner("x", note.spki_der(key.public_key()), digest_signer(other))
    with pytest.raises(SignerFailed):
        wrong.sign(b"text\n")

    def raw_r_s(digest: bytes) -> bytes:
        # PKCS#11 CKM_ECDSA answers r || s, not DER: a caller must convert it.
        r, s = decode_dss_signature(digest_signer(key)(digest))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    with pytest.raises(SignerFailed):
        EcdsaDigestSigner("x", note.spki_der(key.public_key()), raw_r_s).sign(b"text\n")


def test_ecdsa_keys_outside_the_allowed_curves_are_refused() -> None:
    k1 = ec.generate_private_key(ec.SECP256K1())
    with pytest.raises(BadKey):
        EcdsaVerifier("x", note.spki_der(k1.public_key()))
    with pytest.raises(BadKey):
        EcdsaVerifier("x", b"\x30\x00")


# --------------------------------------------------------------------------
# Tampering.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["ed25519", "ecdsa"])
def test_one_changed_byte_anywhere_is_refused(which: str) -> None:
    signer: note.NoteSigner = ed_signer() if which == "ed25519" else ec_signer()
    verifier = ed_signer().verifier() if which == "ed25519" else ec_signer().verifier()
    signed = note.sign_note(TEXT, [signer]).serialise()
    assert note.open_note(signed, [verifier]).verified
    line_start = signed.index("\u2014".encode())
    name_at = line_start + 4
    sig_b64_at = signed.index(b" ", name_at) + 1
    raw = base64.b64decode(signed[sig_b64_at:-1])

    def with_sig(raw_: bytes) -> bytes:
        return signed[:sig_b64_at] + base64.b64encode(raw_) + b"\n"

    cases = {
        "body": (signed[:3] + b"X" + signed[4:], InvalidNoteSignature),
        "size digit": (signed.replace(b"\n42\n", b"\n43\n"), InvalidNoteSignature),
        "signature": (with_sig(raw[:10] + bytes([raw[10] ^ 1]) + raw[11:]), InvalidNoteSignature),
        "last signature byte": (with_sig(raw[:-1] + bytes([raw[-1] ^ 1])), InvalidNoteSignature),
        "key id": (with_sig(bytes([raw[0] ^ 1]) + raw[1:]), UnverifiedNote),
        "name": (signed[:name_at] + b"X" + signed[name_at + 1 :], UnverifiedNote),
    }
    for what, (data, err) in cases.items():
        assert data != signed, what
        with pytest.raises(err):
            note.open_note(data, [verifier])


def test_a_known_key_with_a_bad_repeated_line_rejects_the_note() -> None:
    signer = ed_signer()
    good = note.signature_by(signer, TEXT)
    bad = note.NoteSignature(good.name, good.key_id, bytes(64))
    data = note.Note(TEXT, (good, bad)).serialise()
    # Stricter than skipping repeats: the spec says every known key's line must verify.
    with pytest.raises(InvalidNoteSignature):
        note.open_note(data, [signer.verifier()])


@dataclass(frozen=True)
class ClaimedKey:
    """A verifier that claims any name and key ID (a colliding key, as an attacker may make)."""

    name: str
    key_id: bytes

    def verify(self, text: bytes, signature: bytes) -> bool:
        return True

    def vkey(self) -> str:
        return f"{self.name}+{self.key_id.hex()}+AQ=="


def test_two_different_keys_under_one_name_and_id_are_a_configuration_error() -> None:
    a = note.Ed25519Verifier("n", note.ed25519_public_bytes(ed_key("a")))
    b = note.Ed25519Verifier("n", note.ed25519_public_bytes(ed_key("b")))
    assert a.key_id != b.key_id
    with pytest.raises(BadKey):
        note.verifier_index([a, ClaimedKey("n", a.key_id)])
    assert len(note.verifier_index([a, a, b])) == 2


def test_a_colliding_key_id_under_another_name_is_ignored() -> None:
    signer = ed_signer()
    data = note.sign_note(TEXT, [signer]).serialise()
    # Same ID, other name (or same name, other ID): not the signer's key, so ignored.
    with pytest.raises(UnverifiedNote):
        note.open_note(data, [ClaimedKey("other", signer.key_id)])
    with pytest.raises(UnverifiedNote):
        note.open_note(data, [ClaimedKey(signer.name, b"\x00\x00\x00\x00")])


# --------------------------------------------------------------------------
# The spec's syntax rules.
# --------------------------------------------------------------------------


def _signed(text: str = "hello\n") -> bytes:
    return note.sign_note(text, [ed_signer()]).serialise()


@pytest.mark.parametrize(
    "name", ["", "a b", "a+b", "a\u00a0b", "a\u2003b", "a\u3000b", "a\tb", "a\u2028b"]
)
def test_key_names_without_spaces_or_plus(name: str) -> None:
    assert not note.valid_key_name(name)
    with pytest.raises(BadKey):
        Ed25519Signer(name, ed_key("n"))


def test_key_names_may_be_any_other_unicode() -> None:
    assert note.valid_key_name("ledger.example/témoin-1")
    assert note.valid_key_name("oid/1.3.6.1.4.1.44363.47.1")


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda d: d.replace(b"\n", b"\r\n"), "carriage return"),
        (lambda d: d[:-1], "no final newline"),
        (lambda d: d.replace(b"\n\n", b"\n"), "no blank line"),
        (lambda d: d.replace("\u2014 ".encode(), b"- "), "hyphen instead of em dash"),
        (lambda d: d.replace("\u2014 ".encode(), "\u2014".encode()), "no space after dash"),
        (lambda d: d.replace(b"hello", b"he\x00lo"), "NUL"),
        (lambda d: d.replace(b"hello", b"he\x1blo"), "escape"),
        (lambda d: d.replace(b"hello", b"h\xc3(llo"), "invalid UTF-8"),
        (lambda d: d.replace(b"hello", b"h\xed\xa0\x80llo"), "UTF-8 surrogate"),
        (lambda d: d + b"trailing line\n", "a line that is not a signature"),
        (lambda d: d[:-2] + b"\n", "base64 cut short"),
        (lambda d: d.replace("\u2014 ".encode(), "\u2014  ".encode()), "empty key name"),
        (lambda d: d[:-1] + b" \n", "trailing space"),
        (lambda d: d[: d.index(b"\n\n") + 1], "text alone"),
        (lambda d: d[: d.index(b"\n\n") + 2], "blank line and no signature"),
    ],
)
def test_malformed_variations_are_refused(change: Any, why: str) -> None:
    data = _signed()
    assert data.endswith(b"=\n")  # an Ed25519 line: 68 bytes, base64 ends in one pad
    with pytest.raises(MalformedNote):
        note.open_note(change(data), [ed_signer().verifier()])


def test_non_canonical_base64_is_refused() -> None:
    data = _signed()
    line = data[data.index(b"\n\n") + 2 : -1]
    b64 = line.split(b" ")[-1]
    # The last character before "=" carries 2 unused bits; setting them keeps the bytes.
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = b64[-2:-1]
    tweaked = b64[:-2] + bytes([alphabet[alphabet.index(last) | 1]]) + b"="
    if tweaked == b64:
        tweaked = b64[:-2] + bytes([alphabet[alphabet.index(last) | 2]]) + b"="
    assert base64.b64decode(tweaked) == base64.b64decode(b64) and tweaked != b64
    with pytest.raises(MalformedNote):
        note.parse_note(data.replace(b64, tweaked))


def test_text_may_hold_blank_lines_the_last_one_separates() -> None:
    text = "first\n\nsecond\n\n"
    signer = ed_signer()
    signed = note.sign_note(text, [signer]).serialise()
    assert note.open_note(signed, [signer.verifier()]).text == text


def test_sixteen_signatures_are_accepted_and_all_known_ones_checked() -> None:
    signers = [Ed25519Signer(f"w{i}.example/k", ed_key(f"w{i}")) for i in range(16)]
    signed = note.sign_note("sixteen\n", signers).serialise()
    opened = note.open_note(signed, [s.verifier() for s in signers])
    assert len(opened.verified) == 16


def test_size_bound() -> None:
    sig = note.signature_by(ed_signer(), "x\n")
    big = "x" * (note.MAX_NOTE_BYTES - 200) + "\n"
    with pytest.raises(MalformedNote):
        note.parse_note(("y" * note.MAX_NOTE_BYTES + "\n\n").encode() + sig.line().encode())
    assert note.Note(big, (note.NoteSignature(sig.name, sig.key_id, b"s"),)).serialise()


def test_signing_needs_a_text_ending_in_newline_and_a_signer() -> None:
    with pytest.raises(MalformedNote):
        note.sign_note("no newline", [ed_signer()])
    with pytest.raises(MalformedNote):
        note.sign_note("x\n", [])
    with pytest.raises(MalformedNote):
        note.sign_note("bell\x07\n", [ed_signer()])


def test_a_new_signature_by_the_same_key_replaces_the_old_line() -> None:
    a, b = ed_signer(), ec_signer()
    n1 = note.sign_note(TEXT, [a, b])
    again = n1.with_signatures([note.signature_by(a, TEXT)])
    assert [s.name for s in again.signatures] == [b.name, a.name]


texts = st.lists(
    st.text(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\n", min_codepoint=0x20),
        max_size=40,
    ),
    min_size=1,
    max_size=6,
).map(lambda ls: "".join(line + "\n" for line in ls))


@settings(max_examples=200, deadline=None)
@given(texts)
def test_any_text_round_trips_and_verifies(text: str) -> None:
    signer = ed_signer()
    signed = note.sign_note(text, [signer]).serialise()
    parsed = note.parse_note(signed)
    assert parsed.text == text and parsed.serialise() == signed
    assert note.open_note(signed, [signer.verifier()]).text == text


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_escape_as_another_error(data: bytes) -> None:
    with contextlib.suppress(NoteError):
        note.open_note(data, [ed_signer().verifier()])
