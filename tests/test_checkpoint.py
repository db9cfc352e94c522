"""C2SP checkpoints: the body format, our origin names, and ECDSA checkpoints verified by
an implementation that is not ours (sigstore-python), signed in software and in SoftHSM2.

Also what SoftHSM2 offers for Ed25519 (CKM_EDDSA), the mechanism a witness key in an HSM
would use; docs/transparency-log.md records the result.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pkcs11
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from hypothesis import given, settings
from hypothesis import strategies as st
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

# sigstore-python verifies Rekor's ECDSA checkpoints with code it keeps internal
# (sigstore._internal): SignedCheckpoint parses the note, SignedNote.verify selects the
# signature whose 4-byte key ID is the first 4 bytes of SHA-256 of the DER SPKI, and its
# Keyring verifies ECDSA-SHA256. Internal API moves between releases, so pyproject pins
# the range tested here (sigstore 4.5.x, whose Keyring takes sigstore_models PublicKey
# messages with base64 raw_bytes, as in a trusted-root JSON file).
from sigstore._internal.rekor.checkpoint import SignedCheckpoint as SigstoreCheckpoint
from sigstore._internal.trust import Keyring
from sigstore._utils import KeyID
from sigstore.errors import VerificationError
from sigstore_models.common import v1 as sigstore_common

from gateway.edge import signer
from gateway.edge.config import HsmConfig, PinSource
from gateway.formats import checkpoint, cosignature, merkle, note
from gateway.formats.checkpoint import Checkpoint, CheckpointError
from gateway.lab.sandbox import SOFTHSM_MODULE, TEST_PIN, Sandbox

ROOT = hashlib.sha256(b"some root").digest()
ORIGIN = checkpoint.gateway_origin("ledger.carrier.example", "gw-01")


def p256_key(label: str) -> ec.EllipticCurvePrivateKey:
    """TEST ONLY: a P-256 key whose scalar is SHA-256 of a label (mod n)."""
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    d = int.from_bytes(hashlib.sha256(label.encode()).digest(), "big") % n
    return ec.derive_private_key(d, ec.SECP256R1())


def software_digest_signer(key: ec.EllipticCurvePrivateKey) -> Callable[[bytes], bytes]:
    def sign_digest(digest: bytes) -> bytes:
        return key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))

    return sign_digest


def sigstore_keyring(key: ec.EllipticCurvePublicKey) -> Keyring:
    der = note.spki_der(key)
    return Keyring(
        [
            sigstore_common.PublicKey(
                raw_bytes=base64.b64encode(der),
                key_details=sigstore_common.PublicKeyDetails.PKIX_ECDSA_P256_SHA_256,
            )
        ]
    )


def sigstore_verify(signed: bytes, key: ec.EllipticCurvePublicKey) -> SigstoreCheckpoint:
    """sigstore-python's checkpoint verification; raises VerificationError."""
    parsed = SigstoreCheckpoint.from_text(signed.decode())
    parsed.signed_note.verify(
        sigstore_keyring(key), KeyID(hashlib.sha256(note.spki_der(key)).digest())
    )
    return parsed


# --------------------------------------------------------------------------
# Body format.
# --------------------------------------------------------------------------


def test_a_body_parses_and_prints_back() -> None:
    # Origin line, decimal tree size, base64 root hash, each ending in a newline.
    body = ORIGIN + "\n31415926\n" + base64.b64encode(ROOT).decode() + "\n"
    cp = checkpoint.parse_checkpoint(body)
    assert cp.origin == ORIGIN and cp.size == 31415926 and cp.root_hash == ROOT
    assert cp.extensions == ()
    assert cp.body() == body


def test_extension_lines_are_kept_in_order() -> None:
    body = f"o.example/log\n5\n{base64.b64encode(ROOT).decode()}\next one\next two\n"
    cp = checkpoint.parse_checkpoint(body)
    assert cp.extensions == ("ext one", "ext two")
    assert cp.body() == body


R64 = base64.b64encode(ROOT).decode()


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (f"o\n05\n{R64}\n", "leading zero"),
        (f"o\n+5\n{R64}\n", "plus sign"),
        (f"o\n 5\n{R64}\n", "space"),
        (f"o\n\u0665\n{R64}\n", "a digit that is not ASCII"),
        (f"o\n18446744073709551616\n{R64}\n", "2^64"),
        (f"o\nfive\n{R64}\n", "size not a number"),
        (f"o\n-5\n{R64}\n", "negative size"),
        ("o\n5\nnot base64!\n", "root not base64"),
        (f"o\n5\n{R64[:-1]}\n", "base64 without padding"),
        (f"o\n5\n{base64.b64encode(ROOT[:31]).decode()}\n", "31-byte root"),
        (f"o\n5\n{base64.b64encode(ROOT + b'x').decode()}\n", "33-byte root"),
        (f"o\n5\n{R64}\n\n", "empty extension line"),
        (f"o\n5\n{R64}", "no final newline"),
        (f"\n5\n{R64}\n", "empty origin"),
        (f"o\n0\n{R64}\n", "empty tree whose root is not SHA-256 of nothing"),
        ("o\n5\n", "no root"),
    ],
)
def test_strict_body_rules(body: str, why: str) -> None:
    with pytest.raises(CheckpointError):
        checkpoint.parse_checkpoint(body)


def test_empty_tree_and_largest_size() -> None:
    empty = Checkpoint("o", 0, merkle.EMPTY_ROOT)
    assert checkpoint.parse_checkpoint(empty.body()) == empty
    top = Checkpoint("o", 2**64 - 1, ROOT)
    assert checkpoint.parse_checkpoint(top.body()).size == 2**64 - 1
    with pytest.raises(CheckpointError):
        Checkpoint("o", 2**64, ROOT)
    with pytest.raises(CheckpointError):
        Checkpoint("o", -1, ROOT)
    with pytest.raises(CheckpointError):
        Checkpoint("two\nlines", 1, ROOT)


@settings(max_examples=300, deadline=None)
@given(
    st.text(
        st.characters(min_codepoint=0x21, blacklist_categories=("Cs",)), min_size=1, max_size=30
    ),
    st.integers(1, 2**64 - 1),
    st.binary(min_size=32, max_size=32),
    st.lists(
        st.text(
            st.characters(min_codepoint=0x20, blacklist_categories=("Cs",)), min_size=1, max_size=10
        ),
        max_size=3,
    ),
)
def test_any_checkpoint_round_trips(origin: str, size: int, root: bytes, ext: list[str]) -> None:
    cp = Checkpoint(origin, size, root, tuple(ext))
    assert checkpoint.parse_checkpoint(cp.body()) == cp


# --------------------------------------------------------------------------
# Origins and witness names.
# --------------------------------------------------------------------------


def test_gateway_origin_and_witness_name() -> None:
    assert ORIGIN == "ledger.carrier.example/edge-gateway/gw-01"
    assert note.valid_key_name(ORIGIN)
    assert checkpoint.witness_name("ledger.carrier.example", "ledger-1") == (
        "ledger.carrier.example/ledger-witness/ledger-1"
    )


@pytest.mark.parametrize(
    ("domain", "gateway_id"),
    [
        ("Ledger.Example", "gw"),
        ("https://ledger.example", "gw"),
        ("ledger.example/", "gw"),
        ("", "gw"),
        ("-a.example", "gw"),
        ("ledger example", "gw"),
        ("ledger.example", "gw 1"),
        ("ledger.example", "gw+1"),
        ("ledger.example", "gw/1"),
        ("ledger.example", "gwé"),
        ("ledger.example", ""),
        ("ledger.example", "g" * 129),
    ],
)
def test_origin_parts_are_refused_unless_plain(domain: str, gateway_id: str) -> None:
    with pytest.raises(note.BadKey):
        checkpoint.gateway_origin(domain, gateway_id)


# --------------------------------------------------------------------------
# Signing and opening.
# --------------------------------------------------------------------------


def test_open_checkpoint_checks_the_origin() -> None:
    key = p256_key("log")
    log = note.EcdsaDigestSigner(
        ORIGIN, note.spki_der(key.public_key()), software_digest_signer(key)
    )
    signed = checkpoint.sign_checkpoint(Checkpoint(ORIGIN, 3, ROOT), [log])
    got = checkpoint.open_checkpoint(signed, [log.verifier()], origin=ORIGIN)
    assert got.checkpoint == Checkpoint(ORIGIN, 3, ROOT)
    with pytest.raises(checkpoint.WrongOrigin):
        checkpoint.open_checkpoint(signed, [log.verifier()], origin=ORIGIN + "x")


def spec_signed_checkpoint(origin: str, size: int, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A checkpoint signed without gateway code, from the spec's rules: the body, an empty
    line, and `— <origin> base64(SHA-256(DER SPKI)[:4] || DER ECDSA-SHA256 signature)`."""
    body = f"{origin}\n{size}\n{base64.b64encode(ROOT).decode()}\n"
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    sig = key.sign(body.encode(), ec.ECDSA(hashes.SHA256()))
    line = (
        "\u2014 " + origin + " " + base64.b64encode(hashlib.sha256(der).digest()[:4] + sig).decode()
    )
    return (body + "\n" + line + "\n").encode()


def test_a_checkpoint_signed_from_the_spec_verifies_with_sigstore_and_with_ours() -> None:
    # A checkpoint our code did not make: the independent verifier and ours both accept it.
    key = p256_key("another log")
    data = spec_signed_checkpoint("log.example/other", 271828, key)
    assert sigstore_verify(data, key.public_key()).checkpoint.log_size == 271828
    v = note.EcdsaVerifier.from_public_key("log.example/other", key.public_key())
    assert note.parse_vkey(v.vkey()) == v
    assert checkpoint.open_checkpoint(data, [v]).checkpoint.size == 271828


def test_sigstore_verifies_our_ecdsa_checkpoint_signed_through_the_digest_callable() -> None:
    key = p256_key("gateway log")
    log = note.EcdsaDigestSigner(
        ORIGIN, note.spki_der(key.public_key()), software_digest_signer(key)
    )
    cp = Checkpoint(ORIGIN, 123456, ROOT)
    signed = checkpoint.sign_checkpoint(cp, [log])
    parsed = sigstore_verify(signed, key.public_key())
    assert parsed.checkpoint.origin == ORIGIN
    assert parsed.checkpoint.log_size == 123456
    assert parsed.checkpoint.log_hash == ROOT.hex()
    # ...and it is not an accept-all: a changed size or signature is refused there too.
    with pytest.raises(VerificationError):
        sigstore_verify(signed.replace(b"\n123456\n", b"\n123457\n"), key.public_key())
    line = signed.split(b"\n\n")[1]
    raw = base64.b64decode(line.split(b" ")[-1])
    flipped = base64.b64encode(raw[:-1] + bytes([raw[-1] ^ 1]))
    with pytest.raises(VerificationError):
        sigstore_verify(signed.replace(line.split(b" ")[-1], flipped), key.public_key())


def test_sigstore_accepts_our_checkpoint_with_witness_cosignatures_attached() -> None:
    key = p256_key("gateway log")
    log = note.EcdsaDigestSigner(
        ORIGIN, note.spki_der(key.public_key()), software_digest_signer(key)
    )
    signed = note.parse_note(checkpoint.sign_checkpoint(Checkpoint(ORIGIN, 9, ROOT), [log]))
    w = cosignature.Cosigner(
        "ledger.carrier.example/ledger-witness/n1", ed25519.Ed25519PrivateKey.generate()
    )
    cosigned = w.cosign(signed, 1_700_000_000).serialise()
    assert sigstore_verify(cosigned, key.public_key()).checkpoint.log_size == 9


# --------------------------------------------------------------------------
# SoftHSM2: the key never leaves the token.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    sb = Sandbox(tmp_path_factory.mktemp("tlog-hsm"), tls=False)
    label = "tlog-test"
    sb.hsm(label)
    lib = pkcs11.lib(str(SOFTHSM_MODULE))
    # SoftHSM reads SOFTHSM2_CONF at C_Initialize: start over so this token is seen, and
    # finalize at the end so the next user of the library starts over with its own.
    lib.reinitialize()
    try:
        yield label
    finally:
        lib.finalize()
        sb.close()


@pytest.mark.integration
def test_checkpoint_signed_in_softhsm_verifies_with_sigstore(token: str, tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(TEST_PIN + "\n")
    pin_file.chmod(0o600)
    cfg = HsmConfig(
        module=SOFTHSM_MODULE,
        token_label=token,
        key_label="tlog-checkpoint",
        key_id=b"\x07",
        pin=PinSource(pin_file=pin_file, credential=None),
    )
    info = signer.init_key(cfg, TEST_PIN)
    assert info.sensitive and not info.extractable
    public = serialization.load_pem_public_key(info.public_pem)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    hsm = signer.Signer(cfg, TEST_PIN)
    hsm.start()
    try:
        log = note.EcdsaDigestSigner(
            ORIGIN, note.spki_der(public), lambda digest: hsm.sign_digest(digest).result(10)
        )
        for size in (1, 2, 1000):
            signed = checkpoint.sign_checkpoint(Checkpoint(ORIGIN, size, ROOT), [log])
            assert sigstore_verify(signed, public).checkpoint.log_size == size
            assert (
                checkpoint.open_checkpoint(signed, [log.verifier()], ORIGIN).checkpoint.size == size
            )
        assert hsm.signatures == 3
    finally:
        hsm.close()
    # The checkpoint key's ID in the note is the first 4 bytes of the gateway's key_id.
    assert log.key_id == info.key_id[:4]


@pytest.mark.integration
def test_softhsm_offers_ed25519_for_a_witness_key_that_never_leaves_it(token: str) -> None:
    lib = pkcs11.lib(str(SOFTHSM_MODULE))
    tok = lib.get_token(token_label=token)
    mechanisms = tok.slot.get_mechanisms()
    # SoftHSM 2.6.1 as Debian builds it: EdDSA is there (Ed25519 and Ed448).
    assert Mechanism.EC_EDWARDS_KEY_PAIR_GEN in mechanisms
    assert Mechanism.EDDSA in mechanisms
    with tok.open(user_pin=TEST_PIN, rw=True) as session:
        params = session.create_domain_parameters(
            KeyType.EC_EDWARDS,
            {Attribute.EC_PARAMS: encode_named_curve_parameters("1.3.101.112")},  # Ed25519
            local=True,
        )
        pub, priv = params.generate_keypair(
            store=True,
            label="witness-ed25519",
            id=b"\x09",
            mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
            public_template={Attribute.VERIFY: True, Attribute.TOKEN: True},
            private_template={
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SIGN: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
            },
        )
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            priv[Attribute.VALUE]
        point = bytes(pub[Attribute.EC_POINT])
        # CKA_EC_POINT is the 32-byte key wrapped in a DER OCTET STRING.
        assert len(point) == 34 and point[:2] == b"\x04\x20"
        public_key = point[2:]
        name = "ledger.carrier.example/ledger-witness/hsm-1"
        body = Checkpoint(ORIGIN, 77, ROOT).body()
        ts = 1_700_000_000
        # Pure EdDSA: the token signs the whole message, no digest step.
        sig = bytes(priv.sign(cosignature.signed_message(ts, body), mechanism=Mechanism.EDDSA))
        assert len(sig) == 64
        again = bytes(priv.sign(cosignature.signed_message(ts, body), mechanism=Mechanism.EDDSA))
        assert sig == again  # deterministic, as RFC 8032 requires
        line = note.NoteSignature(
            name, cosignature.cosignature_key_id(name, public_key), ts.to_bytes(8, "big") + sig
        )
        verifier = cosignature.CosignatureVerifier(name, public_key)
        opened = note.verify_note(note.Note(body, (line,)), [verifier])
        assert opened.verified == (line,)
        session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="witness-ed25519").destroy()
