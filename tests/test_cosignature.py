"""Witness cosignatures (c2sp.org/tlog-cosignature, Ed25519, type 0x04).

Checked against a second implementation written below straight from the spec text, which
must produce the same bytes (Ed25519 signatures are deterministic); vkeys, key IDs, signer
keys and timestamps built here from the spec's rules; verification and tampering.
"""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.formats import checkpoint, cosignature, note
from gateway.formats.cosignature import CosignatureVerifier, Cosigner


def ed_key(label: str) -> ed25519.Ed25519PrivateKey:
    """TEST ONLY: an Ed25519 key from SHA-256 of a label."""
    return ed25519.Ed25519PrivateKey.from_private_bytes(hashlib.sha256(label.encode()).digest())


# --------------------------------------------------------------------------
# Reference: c2sp.org/tlog-cosignature "Ed25519 signed message", transcribed.
# --------------------------------------------------------------------------


def ref_cosignature_line(name: str, seed: bytes, timestamp: int, body: str) -> str:
    key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    key_id = hashlib.sha256(name.encode() + b"\n" + b"\x04" + pub).digest()[:4]
    message = b"cosignature/v1\n" + b"time " + str(timestamp).encode() + b"\n" + body.encode()
    sig = timestamp.to_bytes(8, "big") + key.sign(message)
    return "\u2014 " + name + " " + base64.b64encode(key_id + sig).decode() + "\n"


BODY = checkpoint.Checkpoint(
    "ledger.carrier.example/edge-gateway/gw-7", 1234, hashlib.sha256(b"root").digest()
).body()


def test_cosignature_line_equals_the_reference_byte_for_byte() -> None:
    seed = hashlib.sha256(b"witness-1").digest()
    w = Cosigner("ledger.carrier.example/ledger-witness/n1", ed_key("witness-1"))
    assert ed_key("witness-1").private_bytes_raw() == seed
    for ts in (0, 1, 1679315147, 2**63 - 1):
        got = w.signature(BODY, ts).line()
        assert got == ref_cosignature_line(w.name, seed, ts, BODY)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**63 - 1), st.integers(0, 2**64 - 1), st.binary(min_size=32, max_size=32))
def test_any_checkpoint_and_time_match_the_reference(ts: int, size: int, root: bytes) -> None:
    body = checkpoint.Checkpoint("o.example/log", size or 1, root).body()
    w = Cosigner("w.example/k", ed_key("k"))
    assert w.signature(body, ts).line() == ref_cosignature_line(
        w.name, ed_key("k").private_bytes_raw(), ts, body
    )
    assert w.verifier().verify(body.encode(), w.signature(body, ts).signature)


# --------------------------------------------------------------------------
# Keys and timestamps, built from the spec's rules.
# --------------------------------------------------------------------------


def spec_vkey(name: str, sig_type: int, public_key: bytes) -> str:
    """`<name>+<hex SHA-256(name || 0x0A || type || key)[:4]>+<base64(type || key)>`."""
    material = bytes([sig_type]) + public_key
    kid = hashlib.sha256(name.encode() + b"\n" + material).digest()[:4]
    return f"{name}+{kid.hex()}+{base64.b64encode(material).decode()}"


def spec_skey(name: str, seed: bytes) -> str:
    """An Ed25519 signer key, `PRIVATE+KEY+<name>+<key ID>+base64(0x01 || seed)`."""
    public = note.ed25519_public_bytes(ed25519.Ed25519PrivateKey.from_private_bytes(seed))
    kid = spec_vkey(name, 0x01, public).split("+")[1]
    return f"PRIVATE+KEY+{name}+{kid}+{base64.b64encode(bytes([0x01]) + seed).decode()}"


WITNESS = "witness.carrier.example/w1"


def test_cosigner_vkey_and_key_id_follow_the_spec() -> None:
    public = note.ed25519_public_bytes(ed_key("native"))
    vkey = spec_vkey(WITNESS, 0x04, public)
    v = cosignature.parse_cosigner_vkey(vkey)
    assert v.key_id.hex() == vkey.split("+")[1]
    assert v.vkey() == vkey == Cosigner(WITNESS, ed_key("native")).verifier().vkey()
    # The plain Ed25519 note key ID of the same key differs: the type byte is hashed.
    assert note.key_id(v.name, note.TYPE_ED25519, v.public_key) != v.key_id


def test_an_ed25519_vkey_is_accepted_for_cosignatures_with_its_own_id() -> None:
    vkey = note.Ed25519Signer(WITNESS, ed_key("plain")).verifier().vkey()
    assert vkey == spec_vkey(WITNESS, 0x01, note.ed25519_public_bytes(ed_key("plain")))
    v = cosignature.parse_cosigner_vkey(vkey)
    assert note.key_id(v.name, note.TYPE_ED25519, v.public_key).hex() == vkey.split("+")[1]
    assert v.key_id == cosignature.cosignature_key_id(v.name, v.public_key)
    assert v.vkey() != vkey and v.vkey().split("+")[2].startswith("B")  # 0x04 || key


def test_cosignature_timestamps() -> None:
    w = Cosigner(WITNESS, ed_key("ts"))
    for ts in (0, 1, 1_700_000_000, 2**63 - 1):
        sig = w.signature(BODY, ts).signature
        assert sig[:8] == ts.to_bytes(8, "big")  # big-endian seconds, then the signature
        assert cosignature.timestamp_of(sig) == ts
    # A plain Ed25519 note signature (64 bytes) is not a cosignature: no timestamp in it.
    plain = note.signature_by(note.Ed25519Signer(WITNESS, ed_key("ts")), BODY)
    with pytest.raises(ValueError):
        cosignature.timestamp_of(plain.signature)


def test_ed25519_signer_keys_give_witnesses_their_vkeys_public_key() -> None:
    for i in range(1, 4):
        name = f"witness.carrier.example/w{i}"
        seed = hashlib.sha256(b"witness seed %d" % i).digest()
        w = Cosigner.from_skey(spec_skey(name, seed))
        public = note.ed25519_public_bytes(ed25519.Ed25519PrivateKey.from_private_bytes(seed))
        plain = note.parse_vkey(spec_vkey(name, 0x01, public))
        assert isinstance(plain, note.Ed25519Verifier)
        assert w.verifier().public_key == plain.public_key and w.name == plain.name
        assert cosignature.parse_cosigner_vkey(spec_vkey(name, 0x01, public)) == w.verifier()


# --------------------------------------------------------------------------
# Verification and tampering.
# --------------------------------------------------------------------------


def _log_and_witnesses() -> tuple[note.Ed25519Signer, list[Cosigner]]:
    log = note.Ed25519Signer("ledger.carrier.example/edge-gateway/gw-7", ed_key("log"))
    return log, [
        Cosigner(f"ledger.carrier.example/ledger-witness/n{i}", ed_key(f"w{i}")) for i in range(3)
    ]


def test_a_cosigned_checkpoint_verifies_under_log_and_witness_keys() -> None:
    log, ws = _log_and_witnesses()
    signed = note.sign_note(BODY, [log])
    for i, w in enumerate(ws):
        signed = w.cosign(signed, 1_700_000_000 + i)
    opened = note.open_note(signed.serialise(), [log.verifier(), *(w.verifier() for w in ws)])
    assert [s.name for s in opened.verified] == [log.name, *(w.name for w in ws)]
    # A witness that cosigns again replaces its own line.
    again = ws[0].cosign(signed, 1_800_000_000)
    assert len(again.signatures) == 4
    assert cosignature.timestamp_of(again.signatures[-1].signature) == 1_800_000_000


def test_tampered_cosignatures_are_refused() -> None:
    log, (w, *_) = _log_and_witnesses()
    signed = w.cosign(note.sign_note(BODY, [log]), 1_700_000_000)
    sig = signed.signatures[-1]
    verifiers = [log.verifier(), w.verifier()]
    later = (1_700_000_001).to_bytes(8, "big") + sig.signature[8:]
    for bad in (
        later,  # the timestamp is signed
        sig.signature[:20] + bytes([sig.signature[20] ^ 1]) + sig.signature[21:],
        sig.signature[:-1],
        (2**63).to_bytes(8, "big") + sig.signature[8:],
    ):
        tampered = note.Note(
            BODY, (signed.signatures[0], note.NoteSignature(sig.name, sig.key_id, bad))
        )
        with pytest.raises(note.InvalidNoteSignature):
            note.open_note(tampered.serialise(), verifiers)
    other_body = checkpoint.Checkpoint(
        "ledger.carrier.example/edge-gateway/gw-7", 1235, hashlib.sha256(b"root").digest()
    ).body()
    moved = note.Note(other_body, (note.signature_by(log, other_body), sig))
    with pytest.raises(note.InvalidNoteSignature):
        note.open_note(moved.serialise(), verifiers)


def test_a_witness_key_is_not_a_plain_ed25519_note_key() -> None:
    log, (w, *_) = _log_and_witnesses()
    signed = w.cosign(note.sign_note(BODY, [log]), 5).serialise()
    as_plain = note.Ed25519Verifier(w.name, w.verifier().public_key)
    # Different key ID (type byte), so the line is simply not this key's.
    with pytest.raises(note.UnverifiedNote):
        note.open_note(signed, [as_plain])


def test_only_checkpoints_are_cosigned() -> None:
    _, (w, *_) = _log_and_witnesses()
    with pytest.raises(checkpoint.CheckpointError):
        w.signature("just a text\n", 1)
    with pytest.raises(ValueError):
        w.signature(BODY, 2**63)
    with pytest.raises(ValueError):
        w.signature(BODY, -1)
    forged = ed_key("w0").sign(cosignature.signed_message(1, "just a text\n"))
    assert not w.verifier().verify(b"just a text\n", (1).to_bytes(8, "big") + forged)


def test_cosigner_vkeys_of_other_types_are_refused() -> None:
    p256 = ec.derive_private_key(
        int.from_bytes(hashlib.sha256(b"p").digest()[:16], "big"), ec.SECP256R1()
    )
    ecdsa_vkey = note.EcdsaVerifier.from_public_key(WITNESS, p256.public_key()).vkey()
    with pytest.raises(note.BadKey):
        cosignature.parse_cosigner_vkey(ecdsa_vkey)
    native = Cosigner(WITNESS, ed_key("native")).verifier().vkey()
    name, kid, key = native.split("+", 2)
    with pytest.raises(note.BadKey):
        cosignature.parse_cosigner_vkey(f"{name}+00000000+{key}")
    with pytest.raises(note.BadKey):
        cosignature.parse_cosigner_vkey(f"other.example+{kid}+{key}")


def test_verifier_refuses_wrong_lengths() -> None:
    v = CosignatureVerifier("w", note.ed25519_public_bytes(ed_key("x")))
    body = BODY.encode()
    assert not v.verify(body, b"")
    assert not v.verify(body, bytes(71))
    assert not v.verify(body, bytes(73))
    assert not v.verify(b"\xff\n", bytes(72))
