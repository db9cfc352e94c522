"""The auditor's export directory: built here from a log whose checkpoints three ledger-node
witnesses cosigned (real SQLite files), verified by gateway.formats.auditdir and by
sigstore-python's checkpoint code, and refused after each kind of tampering."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from gateway.formats import auditdir, checkpoint, merkle, note, tlogproof
from gateway.formats.checkpoint import Checkpoint
from gateway.formats.cosignature import Cosigner
from gateway.ledger.witness import LogKey, Witness
from tests.test_checkpoint import sigstore_verify
from tests.test_witness import ORIGIN, ecdsa_signer, ed_key, p256_key

SIZES = (10, 37, 64, 100, 150, 151)
LOG_LABEL = "audit log key"


@dataclass
class Export:
    directory: Path
    leaves: list[bytes]
    witness_keys: list[Cosigner]


def leaf(i: int) -> bytes:
    return f"transaction {i}".encode()


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Export:
    """What `edge-gateway demo --export DIR` writes, from a log built here."""
    tmp = tmp_path_factory.mktemp("audit")
    d = tmp / "export"
    for sub in ("witnesses", "checkpoints", "consistency", "proofs", "leaves"):
        (d / sub).mkdir(parents=True)
    log = ecdsa_signer(ORIGIN, LOG_LABEL)
    pem = (
        p256_key(LOG_LABEL)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (d / "gateway.pem").write_bytes(pem)
    witnesses = []
    keys = []
    for i in (1, 2, 3):
        name = checkpoint.witness_name("ledger.carrier.example", f"ledger-{i}")
        db = sqlite3.connect(tmp / f"node{i}.sqlite", isolation_level=None)
        w = Witness(db, name, ed_key(f"node {i}"), [LogKey(ORIGIN, (log.verifier(),))])
        witnesses.append(w)
        keys.append(Cosigner(name, ed_key(f"node {i}")))
        (d / "witnesses" / f"ledger-{i}.vkey").write_text(w.vkey + "\n")
    leaves = [leaf(i) for i in range(SIZES[-1])]
    hashes = [merkle.leaf_hash(x) for x in leaves]
    notes: dict[int, bytes] = {}
    old = 0
    for size in SIZES:
        signed = checkpoint.sign_checkpoint(
            Checkpoint(ORIGIN, size, merkle.root(leaves[:size])), [log]
        )
        proof = merkle.consistency_proof(leaves[:size], old) if old else []
        lines = [w.add_checkpoint(signed, old, proof) for w in witnesses]
        notes[size] = note.parse_note(signed).with_signatures(lines).serialise()
        (d / "checkpoints" / str(size)).write_bytes(notes[size])
        if old:
            (d / "consistency" / f"{old}-{size}.txt").write_text(
                "".join(note.b64encode(h) + "\n" for h in proof)
            )
        old = size
    (d / "checkpoint").write_bytes(notes[SIZES[-1]])
    provider = merkle.subtree_hashes(hashes)
    # 120 transactions: most against the latest checkpoint, some against older ones.
    for i in range(0, 151, 1):
        if i % 5 == 4:
            continue
        size = next(s for s in SIZES if s > i) if i % 3 == 0 else SIZES[-1]
        bundle = tlogproof.make_tlog_proof(i, provider, notes[size])
        tx = hashes[i].hex()
        (d / "proofs" / f"{tx}.tlog-proof").write_bytes(bundle.serialise())
        (d / "leaves" / f"{tx}.bin").write_bytes(leaves[i])
    return Export(d, leaves, keys)


def test_the_export_verifies(export: Export) -> None:
    report = auditdir.audit(export.directory, witness_quorum=3, origin=ORIGIN, min_proofs=100)
    assert report.ok, report.failures
    assert report.checkpoints == len(SIZES) and report.latest_size == 151
    assert report.consistency_proofs == len(SIZES) - 1
    assert report.proofs == 121
    assert (report.witnesses, report.quorum) == (3, 3)
    assert report.summary().startswith(f"{export.directory}: OK: {ORIGIN}: 6 checkpoints")
    # Default quorum: a majority of the witnesses listed.
    assert auditdir.audit(export.directory).quorum == 2


def test_every_checkpoint_of_the_export_verifies_with_sigstore(export: Export) -> None:
    key = p256_key(LOG_LABEL).public_key()
    for path in sorted((export.directory / "checkpoints").iterdir()):
        parsed = sigstore_verify(path.read_bytes(), key)
        assert parsed.checkpoint.log_size == int(path.name)
        assert parsed.checkpoint.origin == ORIGIN
    assert sigstore_verify((export.directory / "checkpoint").read_bytes(), key)


def test_the_command_line(export: Export, tmp_path: Path) -> None:
    run = [sys.executable, "-m", "gateway.formats.auditdir"]
    ok = subprocess.run([*run, str(export.directory)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("\n") == 1 and ": OK: " in ok.stdout
    bad = tmp_path / "bad"
    shutil.copytree(export.directory, bad)
    first = sorted((bad / "leaves").iterdir())[0]
    first.write_bytes(first.read_bytes() + b"!")
    res = subprocess.run(
        [*run, str(bad), "--witness-quorum", "3"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 65
    assert res.stdout.count("\n") == 1 and "FAILED" in res.stdout and first.name in res.stdout
    missing = subprocess.run([*run, str(tmp_path / "nothing")], capture_output=True, timeout=60)
    assert missing.returncode == 66
    (bad / "gateway.pem").write_text("not a key\n")
    res = subprocess.run([*run, str(bad)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 66 and "Traceback" not in res.stderr


# --------------------------------------------------------------------------
# Each kind of tampering is found.
# --------------------------------------------------------------------------


def _replace_line(path: Path, index: int, new: str) -> None:
    lines = path.read_text().split("\n")
    lines[index] = new
    path.write_text("\n".join(lines))


def _flip_b64(text: str) -> str:
    c = "A" if text[0] != "A" else "B"
    return c + text[1:]


def tamper_checkpoint_size(d: Path, e: Export) -> None:
    p = d / "checkpoints" / "64"
    p.write_bytes(p.read_bytes().replace(b"\n64\n", b"\n65\n", 1))


def tamper_latest_is_older(d: Path, e: Export) -> None:
    shutil.copy(d / "checkpoints" / "100", d / "checkpoint")


def tamper_too_few_cosignatures(d: Path, e: Export) -> None:
    p = d / "checkpoints" / "37"
    p.write_bytes(p.read_bytes().rsplit("\u2014".encode(), 1)[0])


def tamper_bad_cosignature(d: Path, e: Export) -> None:
    p = d / "checkpoints" / "37"
    text = p.read_text().split("\n")
    # The last line before the final newline is a cosignature; change a byte of it.
    last = text[-2]
    head, _, sig = last.rpartition(" ")
    raw = bytearray(note.b64decode_strict(sig))
    raw[-1] ^= 1
    text[-2] = f"{head} {note.b64encode(bytes(raw))}"
    p.write_text("\n".join(text))


def tamper_consistency_changed(d: Path, e: Export) -> None:
    p = d / "consistency" / "37-64.txt"
    _replace_line(p, 0, _flip_b64(p.read_text().split("\n")[0]))


def tamper_consistency_missing(d: Path, e: Export) -> None:
    (d / "consistency" / "64-100.txt").unlink()


def tamper_forked_checkpoint(d: Path, e: Export) -> None:
    # The log itself signs another tree of size 100 and the witnesses' keys cosign it:
    # every signature is valid, and the directory still does not verify.
    forked = [b"rewritten", *e.leaves[1:100]]
    log = ecdsa_signer(ORIGIN, LOG_LABEL)
    signed = note.parse_note(
        checkpoint.sign_checkpoint(Checkpoint(ORIGIN, 100, merkle.root(forked)), [log])
    )
    for w in e.witness_keys:
        signed = w.cosign(signed, 1_790_000_000)
    (d / "checkpoints" / "100").write_bytes(signed.serialise())


def tamper_leaf_changed(d: Path, e: Export) -> None:
    p = sorted((d / "leaves").iterdir())[5]
    p.write_bytes(b"x" + p.read_bytes())


def tamper_leaf_missing(d: Path, e: Export) -> None:
    sorted((d / "leaves").iterdir())[7].unlink()


def tamper_proof_hash(d: Path, e: Export) -> None:
    p = sorted((d / "proofs").iterdir())[3]
    lines = p.read_text().split("\n")
    _replace_line(p, 2, _flip_b64(lines[2]))


def tamper_proof_index(d: Path, e: Export) -> None:
    p = sorted((d / "proofs").iterdir())[4]
    text = p.read_text()
    index = int(text.split("\n")[1].split(" ")[1])
    p.write_text(text.replace(f"index {index}\n", f"index {index ^ 1}\n", 1))


def tamper_other_gateway_key(d: Path, e: Export) -> None:
    other = p256_key("someone else").public_key()
    (d / "gateway.pem").write_bytes(
        other.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def tamper_other_witness_key(d: Path, e: Export) -> None:
    other = Cosigner(e.witness_keys[0].name, ed_key("impostor witness"))
    (d / "witnesses" / "ledger-1.vkey").write_text(other.verifier().vkey() + "\n")


def tamper_checkpoint_renamed(d: Path, e: Export) -> None:
    (d / "checkpoints" / "100").rename(d / "checkpoints" / "101")


def tamper_unknown_file(d: Path, e: Export) -> None:
    (d / "proofs" / "notes.txt").write_text("hello\n")


def tamper_latest_missing_from_checkpoints(d: Path, e: Export) -> None:
    (d / "checkpoints" / "151").unlink()
    (d / "consistency" / "150-151.txt").unlink()


@pytest.mark.parametrize(
    "tamper",
    [
        tamper_checkpoint_size,
        tamper_latest_is_older,
        tamper_too_few_cosignatures,
        tamper_bad_cosignature,
        tamper_consistency_changed,
        tamper_consistency_missing,
        tamper_forked_checkpoint,
        tamper_leaf_changed,
        tamper_leaf_missing,
        tamper_proof_hash,
        tamper_proof_index,
        tamper_other_gateway_key,
        tamper_other_witness_key,
        tamper_checkpoint_renamed,
        tamper_unknown_file,
        tamper_latest_missing_from_checkpoints,
    ],
)
def test_tampering_is_found(
    export: Export, tmp_path: Path, tamper: Callable[[Path, Export], None]
) -> None:
    d = tmp_path / "copy"
    shutil.copytree(export.directory, d)
    tamper(d, export)
    report = auditdir.audit(d, witness_quorum=3)
    assert not report.ok
    assert report.first_failure is not None and "\n" not in report.first_failure


def test_a_missing_cosignature_is_fine_while_the_quorum_holds(
    export: Export, tmp_path: Path
) -> None:
    d = tmp_path / "copy"
    shutil.copytree(export.directory, d)
    tamper_too_few_cosignatures(d, export)
    assert auditdir.audit(d, witness_quorum=2).ok
    assert not auditdir.audit(d, witness_quorum=3).ok


def test_a_forked_checkpoint_is_reported_as_inconsistent(export: Export, tmp_path: Path) -> None:
    d = tmp_path / "copy"
    shutil.copytree(export.directory, d)
    tamper_forked_checkpoint(d, export)
    report = auditdir.audit(d, witness_quorum=3)
    assert report.first_failure == (
        "consistency/64-100.txt: the tree of size 100 does not extend the tree of size 64"
    )
    assert any(f.startswith("consistency/100-150.txt") for f in report.failures)


def test_a_key_rotation_verifies_with_both_keys_in_gateway_pem(
    export: Export, tmp_path: Path
) -> None:
    d = tmp_path / "copy"
    shutil.copytree(export.directory, d)
    new = ecdsa_signer(ORIGIN, "rotated log key")
    old = ecdsa_signer(ORIGIN, LOG_LABEL)
    # 150 is signed by both keys (the overlap), 151 by the new key only.
    for size, signers in ((150, [old, new]), (151, [new])):
        signed = note.parse_note(
            checkpoint.sign_checkpoint(
                Checkpoint(ORIGIN, size, merkle.root(export.leaves[:size])), signers
            )
        )
        for w in export.witness_keys:
            signed = w.cosign(signed, 1_790_000_000)
        (d / "checkpoints" / str(size)).write_bytes(signed.serialise())
        if size == 151:
            (d / "checkpoint").write_bytes(signed.serialise())
    pems = [
        p256_key(label)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        for label in (LOG_LABEL, "rotated log key")
    ]
    (d / "gateway.pem").write_bytes(pems[0] + pems[1])
    report = auditdir.audit(d, witness_quorum=3)
    assert report.ok, report.failures
    (d / "gateway.pem").write_bytes(pems[1])
    report = auditdir.audit(d, witness_quorum=3)
    assert report.first_failure is not None
    assert report.first_failure.startswith("checkpoints/10: not signed by the log key")
