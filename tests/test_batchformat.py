"""The gateway's keys as verifiers see them: pinned key ids, P-256 only, several keys in
one PEM file after a rotation, and the HSM's raw r || s made low-S DER so that pyca and
openssl verify it. (A batch has no format of its own: it is a range of the log between
two checkpoints, whose signed-note vectors are tests/test_checkpoint.py's.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

from gateway.formats import batchformat as bf

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "keys.json").read_text(encoding="utf-8")
)
N = bf.P256_N


def _vector_key() -> ec.EllipticCurvePublicKey:
    return bf.load_public_key(VECTORS["test_key"]["public_key_pem"].encode("ascii"))


def _pem(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_key_id_is_the_sha256_of_the_spki_and_pinned() -> None:
    assert bf.key_id_of(_vector_key()).hex() == VECTORS["test_key"]["key_id"]


def test_vector_private_scalar_matches_public_key() -> None:
    scalar = int(VECTORS["test_key"]["private_scalar_hex"], 16)
    derived = ec.derive_private_key(scalar, ec.SECP256R1()).public_key()
    assert bf.key_id_of(derived) == bf.key_id_of(_vector_key())


def test_load_public_key_refuses_other_curves() -> None:
    pem = _pem(ec.generate_private_key(ec.SECP384R1()).public_key())
    with pytest.raises(ValueError, match="P-256"):
        bf.load_public_key(pem)


def test_load_public_keys_reads_every_block_of_a_rotated_key_file() -> None:
    old, new = (ec.generate_private_key(ec.SECP256R1()).public_key() for _ in range(2))
    keys = bf.load_public_keys(b"# old\n" + _pem(old) + b"# new\n" + _pem(new))
    assert [bf.key_id_of(k) for k in keys] == [bf.key_id_of(old), bf.key_id_of(new)]
    with pytest.raises(ValueError, match="no PEM public key"):
        bf.load_public_keys(b"not a key")


# --------------------------------------------------------------------------
# Low-S DER from the HSM's r || s.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("case", VECTORS["der_low_s"]["cases"], ids=lambda c: c["name"])
def test_der_low_s_vector(case: dict[str, str]) -> None:
    assert bf.der_low_s(bytes.fromhex(case["raw_hex"])).hex() == case["der_hex"]


def test_high_s_is_converted_to_n_minus_s() -> None:
    r, s = 0x1234_5678_9ABC, N - 7
    der = bf.der_low_s(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
    assert decode_dss_signature(der) == (r, 7)


def test_low_s_is_kept() -> None:
    r, s = 99, N // 2
    assert decode_dss_signature(bf.der_low_s(r.to_bytes(32, "big") + s.to_bytes(32, "big"))) == (
        r,
        s,
    )


def test_der_low_s_of_a_real_signature_still_verifies() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    message = b"edge-gateway.invalid/gw-test\n5\nroot\n"
    digest = hashes.Hash(hashes.SHA256())
    digest.update(message)
    prehashed = digest.finalize()
    for _ in range(8):  # about half of these have a high s
        r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
        der = bf.der_low_s(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
        assert decode_dss_signature(der)[1] <= N // 2
        key.public_key().verify(der, message, ec.ECDSA(hashes.SHA256()))
        # The HSM signs the digest (CKM_ECDSA); that is the same signature.
        key.public_key().verify(der, prehashed, ec.ECDSA(Prehashed(hashes.SHA256())))


@pytest.mark.parametrize("length", [0, 63, 65, 72])
def test_der_low_s_refuses_wrong_length(length: int) -> None:
    with pytest.raises(ValueError, match="64-byte"):
        bf.der_low_s(b"\x01" * length)
