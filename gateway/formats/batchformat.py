"""The gateway's signing keys as verifiers see them: P-256 public keys, their key ids,
and the HSM's raw ECDSA signatures made DER and low-S.

A batch has no format of its own any more: it is the range of the gateway's log
between two checkpoints (gateway.formats.checkpoint), and its one signature is the
checkpoint's. Everything here uses pyca/cryptography and never signs.
"""

from __future__ import annotations

import hashlib
import re

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    encode_dss_signature,
)

# Order of the P-256 group, for the low-S rule.
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def der_low_s(raw: bytes) -> bytes:
    """PKCS#11 CKM_ECDSA returns r || s; make it DER with s in the lower half (low-S)."""
    if len(raw) != 64:
        raise ValueError(f"expected 64-byte r||s from the HSM, got {len(raw)}")
    r = int.from_bytes(raw[:32], "big")
    s = int.from_bytes(raw[32:], "big")
    if s > P256_N // 2:
        s = P256_N - s
    return encode_dss_signature(r, s)


def key_id_of(public_key: ec.EllipticCurvePublicKey) -> bytes:
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def load_public_key(pem: bytes) -> ec.EllipticCurvePublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("expected a P-256 public key")
    return key


def load_public_keys(pem: bytes) -> list[ec.EllipticCurvePublicKey]:
    """Every PEM public key block of a file: a gateway's keys after a key rotation."""
    blocks = re.findall(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", pem, re.S)
    if not blocks:
        raise ValueError("no PEM public key in it")
    return [load_public_key(b) for b in blocks]
