"""Batch headers: pinned encoding, the signing input, low-S DER, and offline
verification refusing each kind of bad batch with its reason code.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)

from gateway._pb.edgegateway.v1 import batch_pb2, transaction_pb2
from gateway.formats import batchformat as bf
from gateway.formats import merkle
from gateway.formats.canonical import canonical_json, transaction_bytes

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "headers.json").read_text(encoding="utf-8")
)
HEADERS = VECTORS["headers"]
HASH_FIELDS = {"prev_header_hash", "merkle_root", "key_id"}
N = bf.P256_N


def _fields(d: dict[str, Any]) -> bf.HeaderFields:
    return bf.HeaderFields(**{k: bytes.fromhex(v) if k in HASH_FIELDS else v for k, v in d.items()})


def _vector_key() -> ec.EllipticCurvePublicKey:
    return bf.load_public_key(VECTORS["test_key"]["public_key_pem"].encode("ascii"))


# --------------------------------------------------------------------------
# Pinned header bytes.
# --------------------------------------------------------------------------


def test_domain_tag_is_the_documented_one() -> None:
    assert bf.DOMAIN_TAG == b"edge-ledger-gateway/batch/v1\x00"
    assert bytes.fromhex(VECTORS["domain_tag_hex"]) == bf.DOMAIN_TAG


@pytest.mark.parametrize("case", HEADERS, ids=lambda c: c["name"])
def test_header_encoding_is_pinned(case: dict[str, Any]) -> None:
    header = bf.encode_header(_fields(case["fields"]))
    assert header.hex() == case["header_hex"]
    assert bf.header_hash(header).hex() == case["header_hash"]
    assert bf.signing_digest(header).hex() == case["signing_digest"]
    assert bf.signing_input(header) == bf.DOMAIN_TAG + header


@pytest.mark.parametrize("case", HEADERS, ids=lambda c: c["name"])
def test_header_vector_is_consistent(case: dict[str, Any]) -> None:
    leaves = [bytes.fromhex(x) for x in case["leaves_hex"]]
    f = case["fields"]
    assert f["merkle_root"] == merkle.root(leaves).hex()
    assert f["tx_count"] == len(leaves)
    assert f["byte_count"] == sum(len(x) for x in leaves)
    assert f["key_id"] == VECTORS["test_key"]["key_id"] == bf.key_id_of(_vector_key()).hex()
    h = bf.parse_header(bytes.fromhex(case["header_hex"]))
    assert h.version == bf.HEADER_VERSION
    assert h.signature_algorithm == bf.SIGNATURE_ALGORITHM
    assert (h.gateway_id, h.seq, h.created_ms) == (f["gateway_id"], f["seq"], f["created_ms"])


def test_header_vectors_form_a_hash_chain() -> None:
    first, second = HEADERS[0], HEADERS[1]
    assert first["fields"]["seq"] == 0
    assert first["fields"]["prev_header_hash"] == bf.ZERO_HASH.hex()
    assert second["fields"]["seq"] == 1
    assert second["fields"]["prev_header_hash"] == first["header_hash"]


@pytest.mark.parametrize("case", HEADERS, ids=lambda c: c["name"])
def test_pinned_signature_verifies(case: dict[str, Any]) -> None:
    key = _vector_key()
    header = bytes.fromhex(case["header_hex"])
    signature = bytes.fromhex(case["signature_der_hex"])
    bf.verify_signature(header, signature, key)
    # The HSM signs the digest (CKM_ECDSA); that is the same signature.
    key.verify(
        signature, bytes.fromhex(case["signing_digest"]), ec.ECDSA(Prehashed(hashes.SHA256()))
    )
    batch = batch_pb2.SignedBatch(
        header=header,
        signature=signature,
        transactions=[bytes.fromhex(x) for x in case["leaves_hex"]],
    )
    assert bf.verify_batch(batch, key).seq == case["fields"]["seq"]


def test_vector_private_scalar_matches_public_key() -> None:
    scalar = int(VECTORS["test_key"]["private_scalar_hex"], 16)
    derived = ec.derive_private_key(scalar, ec.SECP256R1()).public_key()
    assert bf.key_id_of(derived) == bf.key_id_of(_vector_key())


@pytest.mark.parametrize("name", sorted(HASH_FIELDS))
def test_encode_header_refuses_hashes_that_are_not_32_bytes(name: str) -> None:
    f = replace(_fields(HEADERS[0]["fields"]), **{name: b"\x00" * 31})
    with pytest.raises(ValueError, match="32 bytes"):
        bf.encode_header(f)


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
    header = bf.encode_header(_fields(HEADERS[0]["fields"]))
    for _ in range(8):  # about half of these have a high s
        r, s = decode_dss_signature(key.sign(bf.signing_input(header), ec.ECDSA(hashes.SHA256())))
        der = bf.der_low_s(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
        assert decode_dss_signature(der)[1] <= N // 2
        key.public_key().verify(der, bf.signing_input(header), ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize("length", [0, 63, 65, 72])
def test_der_low_s_refuses_wrong_length(length: int) -> None:
    with pytest.raises(ValueError, match="64-byte"):
        bf.der_low_s(b"\x01" * length)


# --------------------------------------------------------------------------
# verify_batch with a software key.
# --------------------------------------------------------------------------


def _leaf(i: int) -> bytes:
    tx = transaction_pb2.Transaction(
        device_id=f"meter-{i:04d}",
        device_seq=i,
        received_time_ms=1_700_000_000_000 + i,
        profile="acme-meter@1",
        kind="meter.reading",
        fields=canonical_json({"kwh": i / 4}),
        payload_sha256=bytes(32),
        gateway_id="gw-test",
        channel="mqtt",
    )
    return transaction_bytes(tx)


def _sign(key: ec.EllipticCurvePrivateKey, header: bytes, *, high_s: bool = False) -> bytes:
    r, s = decode_dss_signature(key.sign(bf.signing_input(header), ec.ECDSA(hashes.SHA256())))
    s = max(s, N - s) if high_s else min(s, N - s)
    return encode_dss_signature(r, s)


class Signer:
    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.public = self.key.public_key()
        self.txs = [_leaf(i) for i in range(7)]

    def fields(self, **changes: Any) -> bf.HeaderFields:
        f = bf.HeaderFields(
            gateway_id="gw-test",
            seq=3,
            prev_header_hash=b"\x11" * 32,
            merkle_root=merkle.root(self.txs),
            tx_count=len(self.txs),
            byte_count=sum(len(t) for t in self.txs),
            first_received_ms=1_700_000_000_000,
            last_received_ms=1_700_000_000_006,
            created_ms=1_700_000_000_100,
            key_id=bf.key_id_of(self.public),
        )
        return replace(f, **changes)

    def batch(self, header: bytes | None = None, **kw: Any) -> batch_pb2.SignedBatch:
        header = bf.encode_header(self.fields()) if header is None else header
        return batch_pb2.SignedBatch(
            header=header, signature=_sign(self.key, header, **kw), transactions=self.txs
        )


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer()


def _reason(batch: batch_pb2.SignedBatch, key: ec.EllipticCurvePublicKey) -> str:
    with pytest.raises(bf.BatchInvalid) as info:
        bf.verify_batch(batch, key)
    assert str(info.value).startswith(info.value.reason + ": ")
    return info.value.reason


def test_well_formed_batch_verifies(signer: Signer) -> None:
    h = bf.verify_batch(signer.batch(), signer.public)
    assert (h.seq, h.tx_count, h.gateway_id) == (3, 7, "gw-test")


def test_batch_survives_the_wire(signer: Signer) -> None:
    wire = signer.batch().SerializeToString()
    bf.verify_batch(batch_pb2.SignedBatch.FromString(wire), signer.public)


def test_tampered_header_byte_is_bad_signature(signer: Signer) -> None:
    batch = signer.batch()
    header = bytearray(batch.header)
    # Flip a byte inside prev_header_hash: still a canonical header, no longer the signed one.
    header[header.index(b"\x11" * 32) + 5] ^= 0x01
    batch.header = bytes(header)
    assert _reason(batch, signer.public) == "bad_signature"


def test_tampered_transaction_is_bad_merkle_root(signer: Signer) -> None:
    batch = signer.batch()
    tx = bytearray(batch.transactions[4])
    tx[-1] ^= 0x01
    batch.transactions[4] = bytes(tx)
    assert _reason(batch, signer.public) == "bad_merkle_root"


def test_reordered_transactions_are_bad_merkle_root(signer: Signer) -> None:
    batch = signer.batch()
    batch.transactions[0], batch.transactions[1] = batch.transactions[1], batch.transactions[0]
    assert _reason(batch, signer.public) == "bad_merkle_root"


def test_wrong_tx_count_is_bad_count(signer: Signer) -> None:
    header = bf.encode_header(signer.fields(tx_count=len(signer.txs) + 1))
    assert _reason(signer.batch(header), signer.public) == "bad_count"


def test_missing_transaction_is_bad_count(signer: Signer) -> None:
    batch = signer.batch()
    del batch.transactions[-1]
    assert _reason(batch, signer.public) == "bad_count"


def test_wrong_byte_count_is_bad_count(signer: Signer) -> None:
    header = bf.encode_header(signer.fields(byte_count=1))
    assert _reason(signer.batch(header), signer.public) == "bad_count"


def test_high_s_signature_is_bad_signature(signer: Signer) -> None:
    batch = signer.batch(high_s=True)
    # The same signature is mathematically valid; only the low-S rule refuses it.
    signer.public.verify(batch.signature, bf.signing_input(batch.header), ec.ECDSA(hashes.SHA256()))
    assert _reason(batch, signer.public) == "bad_signature"


def test_signature_that_is_not_der_is_bad_signature(signer: Signer) -> None:
    batch = signer.batch()
    batch.signature = b"\x30\x02\x01"
    assert _reason(batch, signer.public) == "bad_signature"


def test_signature_by_another_key_is_bad_signature(signer: Signer) -> None:
    header = bf.encode_header(signer.fields())
    other = ec.generate_private_key(ec.SECP256R1())
    batch = batch_pb2.SignedBatch(
        header=header, signature=_sign(other, header), transactions=signer.txs
    )
    assert _reason(batch, signer.public) == "bad_signature"


def test_signature_over_untagged_header_is_bad_signature(signer: Signer) -> None:
    header = bf.encode_header(signer.fields())
    r, s = decode_dss_signature(signer.key.sign(header, ec.ECDSA(hashes.SHA256())))
    batch = batch_pb2.SignedBatch(
        header=header, signature=encode_dss_signature(r, min(s, N - s)), transactions=signer.txs
    )
    assert _reason(batch, signer.public) == "bad_signature"


def test_wrong_key_is_unknown_key(signer: Signer) -> None:
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    assert _reason(signer.batch(), other) == "unknown_key"


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    assert number < 16
    return bytes([number << 3 | wire_type]) + payload


@pytest.mark.parametrize(
    "mangle",
    [
        # A default value written out explicitly (last_received_ms = 0).
        lambda h: h + _field(9, 0, b"\x00"),
        # Field 1 (version) moved to the end: same message, other bytes.
        lambda h: h[2:] + h[:2],
        # An unknown field appended.
        lambda h: h + _field(15, 0, b"\x01"),
        # A varint padded with a redundant continuation byte (version = 1 as 0x81 0x00).
        lambda h: _field(1, 0, b"\x81\x00") + h[2:],
    ],
    ids=["explicit-default", "out-of-order", "unknown-field", "padded-varint"],
)
def test_non_canonical_header_is_bad_header(signer: Signer, mangle: Any) -> None:
    canonical = bf.encode_header(signer.fields())
    assert canonical[:2] == b"\x08\x01"  # version = 1 comes first
    header = mangle(canonical)
    parsed = batch_pb2.BatchHeader.FromString(header)
    assert parsed.seq == 3  # it parses; only its bytes are wrong
    # Properly signed, so nothing but the canonical-form rule can refuse it.
    assert _reason(signer.batch(header), signer.public) == "bad_header"


def test_header_that_does_not_parse_is_bad_header(signer: Signer) -> None:
    assert _reason(signer.batch(b"\x0a\xff"), signer.public) == "bad_header"


def test_other_header_version_is_bad_header(signer: Signer) -> None:
    h = batch_pb2.BatchHeader.FromString(bf.encode_header(signer.fields()))
    h.version = 2
    header = h.SerializeToString(deterministic=True)
    assert _reason(signer.batch(header), signer.public) == "bad_header"


def test_other_signature_algorithm_is_bad_header(signer: Signer) -> None:
    h = batch_pb2.BatchHeader.FromString(bf.encode_header(signer.fields()))
    h.signature_algorithm = "ecdsa-p384-sha384"
    header = h.SerializeToString(deterministic=True)
    assert _reason(signer.batch(header), signer.public) == "bad_header"


def test_load_public_key_refuses_other_curves() -> None:
    pem = (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ValueError, match="P-256"):
        bf.load_public_key(pem)


def test_openssl_dgst_verifies_the_signature(tmp_path: Path) -> None:
    assert shutil.which("openssl"), "openssl not found: apt-get install -y openssl (make test does)"
    case = HEADERS[0]
    (tmp_path / "key.pem").write_text(VECTORS["test_key"]["public_key_pem"], encoding="ascii")
    (tmp_path / "signed").write_bytes(bf.DOMAIN_TAG + bytes.fromhex(case["header_hex"]))
    (tmp_path / "sig").write_bytes(bytes.fromhex(case["signature_der_hex"]))
    result = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", "key.pem", "-signature", "sig", "signed"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "Verified OK" in result.stdout
