"""Device receipts: the compact encoding (gateway.formats.receipt) and the reference device
verifier (gateway.formats.device_verifier), over a log built here whose checkpoints a P-256
key inside SoftHSM2 signs and three ledger-node witnesses cosign."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pkcs11
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.edge import signer
from gateway.edge.config import HsmConfig, PinSource
from gateway.formats import checkpoint, merkle, note, receipt, tlogproof
from gateway.formats import device_verifier as dv
from gateway.formats.checkpoint import Checkpoint
from gateway.formats.cosignature import Cosigner
from gateway.formats.receipt import Receipt, ReceiptError
from gateway.lab.sandbox import SOFTHSM_MODULE, TEST_PIN, Sandbox
from gateway.ledger.witness import LogKey, Witness
from tests.test_witness import ecdsa_signer

ORIGIN = checkpoint.gateway_origin("ledger.carrier.example", "gw-07")
WITNESSES = [
    Cosigner(
        checkpoint.witness_name("ledger.carrier.example", f"ledger-{i}"),
        ed25519.Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"w%d" % i).digest()),
    )
    for i in (1, 2, 3)
]
VKEYS = [w.verifier().vkey() for w in WITNESSES]
POLICY = tlogproof.WitnessPolicy(tuple(w.verifier() for w in WITNESSES), 2)
TS = 1_790_000_000


@dataclass
class Hsm:
    log: note.EcdsaDigestSigner
    spki: bytes
    signer: signer.Signer


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hsm]:
    tmp = tmp_path_factory.mktemp("receipt-hsm")
    sb = Sandbox(tmp, tls=False)
    label = "receipt-test"
    sb.hsm(label)
    lib = pkcs11.lib(str(SOFTHSM_MODULE))
    # SoftHSM reads SOFTHSM2_CONF at C_Initialize: start over so this token is seen.
    lib.reinitialize()
    pin_file = tmp / "pin"
    pin_file.write_text(TEST_PIN + "\n")
    pin_file.chmod(0o600)
    cfg = HsmConfig(
        module=SOFTHSM_MODULE,
        token_label=label,
        key_label="tlog-checkpoint",
        key_id=b"\x07",
        pin=PinSource(pin_file=pin_file, credential=None),
    )
    info = signer.init_key(cfg, TEST_PIN)
    public = serialization.load_pem_public_key(info.public_pem)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    s = signer.Signer(cfg, TEST_PIN)
    s.start()
    spki = note.spki_der(public)
    log = note.EcdsaDigestSigner(ORIGIN, spki, lambda d: s.sign_digest(d).result(10))
    try:
        yield Hsm(log, spki, s)
    finally:
        s.close()
        lib.finalize()
        sb.close()


def leaves(n: int, tag: str = "tx") -> list[bytes]:
    return [f"{tag} {i}".encode() for i in range(n)]


def cosigned_checkpoint(
    data: list[bytes], signers: list[note.NoteSigner], witnesses: list[Cosigner] = WITNESSES
) -> bytes:
    cp = Checkpoint(ORIGIN, len(data), merkle.root(data))
    signed = note.parse_note(checkpoint.sign_checkpoint(cp, signers))
    for i, w in enumerate(witnesses):
        signed = w.cosign(signed, TS + i)
    return signed.serialise()


def receipt_for(index: int, data: list[bytes], signed: bytes) -> bytes:
    hashes = [merkle.leaf_hash(d) for d in data]
    bundle = tlogproof.make_tlog_proof(index, merkle.subtree_hashes(hashes), signed)
    return receipt.from_tlog_proof(hashes[index], bundle).encode()


def trust(hsm: Hsm, quorum: int = 2, keys: list[bytes] | None = None) -> dv.Trust:
    return dv.Trust.of(ORIGIN, keys or [hsm.spki], VKEYS, quorum)


# --------------------------------------------------------------------------
# Receipts from the gateway's output verify on a device.
# --------------------------------------------------------------------------


@pytest.mark.integration
def test_receipts_of_a_softhsm_signed_log_verify_with_the_device_verifier(hsm: Hsm) -> None:
    data = leaves(1000)
    signed = cosigned_checkpoint(data, [hsm.log])
    names = {hsm.log.key_id: ORIGIN} | {w.key_id: w.name for w in WITNESSES}
    for index in (0, 1, 499, 511, 512, 998, 999):
        raw = receipt_for(index, data, signed)
        got = dv.verify_receipt(raw, trust(hsm), tx_id=merkle.leaf_hash(data[index]))
        assert (got.index, got.size, got.root) == (index, 1000, merkle.root(data))
        assert [n for n, _ in got.cosigned_by] == [w.name for w in WITNESSES]
        assert [t for _, t in got.cosigned_by] == [TS, TS + 1, TS + 2]
        # The encoding decodes the same in both implementations, and back into a bundle
        # that the gateway's own offline verifier accepts.
        r = receipt.decode(raw)
        assert dv.parse_receipt(raw) == dv.Receipt(r.tx_id, r.index, r.size, r.proof, r.signatures)
        bundle = r.to_tlog_proof(ORIGIN, names)
        tlogproof.verify_tlog_proof(bundle, r.tx_id, [hsm.log.verifier()], POLICY)
        assert len(r.proof) == receipt.proof_length(index, 1000)
        assert len(raw) <= receipt.max_size(1000, 3)
    # Each receipt is fetched with the other's tx_id: refused.
    raw = receipt_for(3, data, signed)
    with pytest.raises(dv.ReceiptInvalid, match="another transaction"):
        dv.verify_receipt(raw, trust(hsm), tx_id=merkle.leaf_hash(data[4]))


def test_receipt_sizes_for_nb_iot() -> None:
    # One P-256 log signature (at most 72 bytes DER) and three cosignatures (72 bytes).
    assert receipt.max_size(10**6, 3) == 999
    assert receipt.max_size(10**9, 3) == 1319
    # During a key rotation overlap the old key signs too.
    assert receipt.max_size(10**6, 3, log_keys=2) == 999 + 77
    assert receipt.proof_length(0, 10**6) == 20 and receipt.proof_length(0, 10**9) == 30


# --------------------------------------------------------------------------
# What the device refuses.
# --------------------------------------------------------------------------


@pytest.mark.integration
def test_every_changed_byte_of_a_receipt_is_refused(hsm: Hsm) -> None:
    data = leaves(40)
    raw = receipt_for(21, data, cosigned_checkpoint(data, [hsm.log]))
    t = trust(hsm, quorum=3)
    dv.verify_receipt(raw, t)
    for pos in range(len(raw)):
        changed = raw[:pos] + bytes([raw[pos] ^ 0x01]) + raw[pos + 1 :]
        with pytest.raises(dv.ReceiptInvalid):
            dv.verify_receipt(changed, t)
    for cut in (0, 1, 49, 50, len(raw) - 1):
        with pytest.raises(dv.ReceiptInvalid):
            dv.verify_receipt(raw[:cut], t)
    with pytest.raises(dv.ReceiptInvalid):
        dv.verify_receipt(raw + b"\x00", t)


@pytest.mark.integration
def test_wrong_keys_origin_or_too_few_witnesses_are_refused(hsm: Hsm) -> None:
    data = leaves(9)
    raw = receipt_for(4, data, cosigned_checkpoint(data, [hsm.log], WITNESSES[:1]))
    dv.verify_receipt(raw, trust(hsm, quorum=1))
    with pytest.raises(dv.ReceiptInvalid, match="1 trusted witnesses cosigned, 2 required"):
        dv.verify_receipt(raw, trust(hsm, quorum=2))
    other = note.spki_der(ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(dv.ReceiptInvalid, match="not signed by a log key"):
        dv.verify_receipt(raw, trust(hsm, quorum=1, keys=[other]))
    with pytest.raises(dv.ReceiptInvalid, match="signature on the checkpoint is invalid"):
        dv.verify_receipt(raw, dv.Trust.of(ORIGIN + "x", [hsm.spki], VKEYS, 1))
    # A signature by a known key over another tree: the inclusion proof of another leaf.
    r = receipt.decode(raw)
    moved = Receipt(r.tx_id, 5, r.size, r.proof, r.signatures).encode()
    with pytest.raises(dv.ReceiptInvalid):
        dv.verify_receipt(moved, trust(hsm, quorum=1))


def test_a_receipt_survives_a_key_rotation_overlap() -> None:
    old, new = ecdsa_signer(ORIGIN, "old"), ecdsa_signer(ORIGIN, "new")
    data = leaves(12)
    raw = receipt_for(7, data, cosigned_checkpoint(data, [old, new]))
    for keys in (
        [old.public_key_der],
        [new.public_key_der],
        [old.public_key_der, new.public_key_der],
    ):
        dv.verify_receipt(raw, dv.Trust.of(ORIGIN, keys, VKEYS, 3))
    assert len(raw) <= receipt.max_size(12, 3, log_keys=2)


def test_the_encoding_is_strict() -> None:
    log = ecdsa_signer(ORIGIN, "k")
    data = leaves(5)
    raw = receipt_for(2, data, cosigned_checkpoint(data, [log]))
    r = receipt.decode(raw)
    assert r.encode() == raw
    for bad in (raw[:-1], raw + b"\x00", b"\x02" + raw[1:], raw[:40]):
        with pytest.raises(ReceiptError):
            receipt.decode(bad)
    with pytest.raises(ReceiptError):
        Receipt(r.tx_id, 5, 5, r.proof, r.signatures)
    with pytest.raises(ReceiptError):
        Receipt(r.tx_id, 0, 5, r.proof, ())
    # A bundle whose proof does not lead to its checkpoint makes no receipt.
    bundle = tlogproof.make_tlog_proof(
        2,
        merkle.subtree_hashes([merkle.leaf_hash(d) for d in data]),
        r.to_tlog_proof(ORIGIN, {log.key_id: ORIGIN}).checkpoint,
    )
    with pytest.raises(ReceiptError):
        receipt.from_tlog_proof(merkle.leaf_hash(data[3]), bundle)


# --------------------------------------------------------------------------
# Later: still in the log, with a consistency proof from any ledger node.
# --------------------------------------------------------------------------


@pytest.mark.integration
def test_a_kept_receipt_is_checked_against_a_ledger_nodes_newer_checkpoint(
    hsm: Hsm, tmp_path: Path
) -> None:
    data = leaves(300)
    first = cosigned_checkpoint(data, [hsm.log])
    raw = receipt_for(123, data, first)
    # A ledger node that witnessed the log since.
    db = sqlite3.connect(tmp_path / "node.sqlite", isolation_level=None)
    node = Witness(
        db, WITNESSES[1].name, WITNESSES[1].private_key, [LogKey(ORIGIN, (hsm.log.verifier(),))]
    )
    node.add_checkpoint(first, 0, [])
    grown = data + leaves(77, "later")
    node.add_checkpoint(
        checkpoint.sign_checkpoint(Checkpoint(ORIGIN, len(grown), merkle.root(grown)), [hsm.log]),
        300,
        merkle.consistency_proof(grown, 300),
    )
    newer = node.latest(ORIGIN)
    assert newer is not None
    # What the node serves: its latest checkpoint and a consistency proof, base64 lines.
    proof_text = b"".join(
        note.b64encode(h).encode() + b"\n" for h in merkle.consistency_proof(grown, 300)
    )
    proof = dv.parse_proof_lines(proof_text)
    assert dv.verify_still_included(raw, newer, proof, trust(hsm)) == 377
    # The same size: an empty proof.
    assert dv.verify_still_included(raw, first, [], trust(hsm)) == 300

    # A log that rewrote history cannot prove it extends the receipt's tree.
    forked = [b"rewritten", *data[1:], *leaves(77, "later")]
    fork_note = cosigned_checkpoint(forked, [hsm.log])
    with pytest.raises(dv.ReceiptInvalid, match="does not extend"):
        dv.verify_still_included(raw, fork_note, merkle.consistency_proof(forked, 300), trust(hsm))
    with pytest.raises(dv.ReceiptInvalid, match="does not extend"):
        dv.verify_still_included(raw, newer, proof[:-1], trust(hsm))
    # A newer checkpoint the gateway did not sign, or that no trusted witness cosigned.
    stranger = ecdsa_signer(ORIGIN, "stranger")
    with pytest.raises(dv.ReceiptInvalid, match="not signed by a log key"):
        dv.verify_still_included(raw, cosigned_checkpoint(grown, [stranger]), proof, trust(hsm))
    bare = checkpoint.sign_checkpoint(Checkpoint(ORIGIN, 377, merkle.root(grown)), [hsm.log])
    with pytest.raises(dv.ReceiptInvalid, match="0 trusted witnesses"):
        dv.verify_still_included(raw, bare, proof, trust(hsm))
    db.close()


# --------------------------------------------------------------------------
# The device verifier's Ed25519 (pure Python) and Merkle code against the gateway's.
# --------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.binary(max_size=300), st.integers(0, 63 * 8 - 1))
def test_pure_python_ed25519_agrees_with_cryptography(seed: bytes, msg: bytes, bit: int) -> None:
    key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    pub = note.ed25519_public_bytes(key)
    sig = key.sign(msg)
    assert dv.ed25519_verify(pub, msg, sig)
    flipped = bytearray(sig)
    flipped[bit // 8] ^= 1 << (bit % 8)
    assert not dv.ed25519_verify(pub, msg, bytes(flipped))
    assert not dv.ed25519_verify(pub, msg + b"x", sig)
    other = note.ed25519_public_bytes(ed25519.Ed25519PrivateKey.from_private_bytes(os.urandom(32)))
    assert not dv.ed25519_verify(other, msg, sig)


def test_ed25519_edge_cases() -> None:
    key = ed25519.Ed25519PrivateKey.from_private_bytes(b"\x01" * 32)
    pub, sig = note.ed25519_public_bytes(key), key.sign(b"m")
    # S + L is the same scalar mod L but not canonical: refused (RFC 8032 5.1.7).
    s = int.from_bytes(sig[32:], "little") + dv._L
    if s < 2**256:
        assert not dv.ed25519_verify(pub, b"m", sig[:32] + s.to_bytes(32, "little"))
    assert not dv.ed25519_verify(pub[:31], b"m", sig)
    assert not dv.ed25519_verify(pub, b"m", sig[:63])
    assert not dv.ed25519_verify(b"\xff" * 32, b"m", sig)  # y >= p: not a point


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.data())
def test_device_merkle_code_agrees_with_the_gateways(n: int, data: st.DataObject) -> None:
    hashes = [hashlib.sha256(b"%d" % i).digest() for i in range(n)]
    index = data.draw(st.integers(0, n - 1))
    old = data.draw(st.integers(1, n))
    proof = merkle.inclusion_proof_from_hashes(hashes, index)
    root = merkle.root_from_hashes(hashes)
    assert dv.root_from_inclusion_proof(hashes[index], index, n, proof) == root
    cproof = merkle.consistency_proof_from_hashes(hashes, old)
    old_root = merkle.root_from_hashes(hashes[:old])
    assert dv.consistent(old, n, cproof, old_root, root)
    if cproof:
        assert not dv.consistent(old, n, cproof[:-1], old_root, root)
        assert not dv.consistent(old, n, cproof, root if old != n else b"\x00" * 32, old_root)


def test_witness_vkeys_are_checked() -> None:
    assert dv.witness_key(VKEYS[0]).name == WITNESSES[0].name
    assert dv.witness_key(VKEYS[0]).key_id == WITNESSES[0].key_id
    # An Ed25519 (0x01) vkey for the same key: cosignatures still carry the 0x04 key ID.
    plain = note.Ed25519Signer(WITNESSES[0].name, WITNESSES[0].private_key).verifier().vkey()
    assert dv.witness_key(plain) == dv.witness_key(VKEYS[0])
    name, kid, rest = VKEYS[0].split("+", 2)
    for bad in (f"{name}+00000000+{rest}", f"{name}+{kid}+{rest[:-4]}", "x", f"+{kid}+{rest}"):
        with pytest.raises(dv.ReceiptInvalid):
            dv.witness_key(bad)
    with pytest.raises(dv.ReceiptInvalid):
        dv.Trust.of(ORIGIN, [], [VKEYS[0], VKEYS[0]], 1)


def test_the_device_verifier_imports_nothing_from_the_gateway() -> None:
    import ast

    tree = ast.parse(Path(dv.__file__).read_text())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module.split(".")[0])
    assert modules <= {
        "__future__",
        "base64",
        "binascii",
        "functools",
        "hashlib",
        "struct",
        "collections",
        "dataclasses",
        "cryptography",
    }
    # ...and cryptography only inside the one function a device port replaces.
    top = {n.module for n in tree.body if isinstance(n, ast.ImportFrom)}
    assert not any(m and m.startswith("cryptography") for m in top)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=700))
def test_arbitrary_bytes_fail_only_as_invalid_receipts(data: bytes) -> None:
    t = dv.Trust.of(
        ORIGIN, [note.spki_der(ec.derive_private_key(7, ec.SECP256R1()).public_key())], VKEYS, 1
    )
    for raw in (data, b"\x01" + data):
        with contextlib.suppress(ReceiptError):
            receipt.decode(raw)
        with contextlib.suppress(dv.ReceiptInvalid):
            dv.verify_receipt(raw, t)
        with contextlib.suppress(dv.ReceiptInvalid):
            dv.parse_signed_checkpoint(raw)
