"""A ledger node as a witness (c2sp.org/tlog-witness): what it checks, in which order, what
it stores in a real SQLite file, and the split views it keeps as evidence."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import logging
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from gateway.common.errors import ConfigError, OutputFileError
from gateway.formats import checkpoint, cosignature, merkle, note
from gateway.formats.checkpoint import Checkpoint
from gateway.formats.cosignature import Cosigner
from gateway.ledger import witness
from gateway.ledger.witness import LogKey, Witness

ORIGIN = checkpoint.gateway_origin("ledger.carrier.example", "gw-01")
WITNESS = checkpoint.witness_name("ledger.carrier.example", "ledger-1")
NOW = 1_790_000_000.25


def p256_key(label: str) -> ec.EllipticCurvePrivateKey:
    """TEST ONLY: a P-256 key whose scalar is SHA-256 of a label (mod n)."""
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    d = int.from_bytes(hashlib.sha256(label.encode()).digest(), "big") % n
    return ec.derive_private_key(d, ec.SECP256R1())


def ecdsa_signer(origin: str, label: str) -> note.EcdsaDigestSigner:
    key = p256_key(label)

    def sign_digest(digest: bytes) -> bytes:
        return key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))

    return note.EcdsaDigestSigner(origin, note.spki_der(key.public_key()), sign_digest)


def ed_key(label: str) -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.from_private_bytes(hashlib.sha256(label.encode()).digest())


class TestLog:
    """A log in memory: leaves, and checkpoints signed by its key(s)."""

    __test__ = False

    def __init__(self, origin: str = ORIGIN, signers: list[note.NoteSigner] | None = None) -> None:
        self.origin = origin
        self.signers: list[note.NoteSigner] = signers or [ecdsa_signer(origin, "log key")]
        self.leaves: list[bytes] = []

    def grow(self, n: int, tag: str = "tx") -> None:
        start = len(self.leaves)
        self.leaves += [f"{tag}-{i}".encode() for i in range(start, start + n)]

    def checkpoint(self, size: int | None = None) -> bytes:
        size = len(self.leaves) if size is None else size
        cp = Checkpoint(self.origin, size, merkle.root(self.leaves[:size]))
        return checkpoint.sign_checkpoint(cp, self.signers)

    def proof(self, old: int, new: int | None = None) -> list[bytes]:
        new = len(self.leaves) if new is None else new
        return merkle.consistency_proof(self.leaves[:new], old) if old else []

    def verifiers(self) -> tuple[note.NoteVerifier, ...]:
        out: list[note.NoteVerifier] = []
        for s in self.signers:
            assert isinstance(s, note.EcdsaDigestSigner | note.Ed25519Signer)
            out.append(s.verifier())
        return tuple(out)


def connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = connect(tmp_path / "node.sqlite")
    conn.execute("CREATE TABLE leaves (origin TEXT, idx INTEGER, leaf BLOB)")
    yield conn
    conn.close()


@pytest.fixture
def log() -> TestLog:
    lg = TestLog()
    lg.grow(5)
    return lg


def make_witness(
    db: sqlite3.Connection, *logs: TestLog, clock: Callable[[], float] = lambda: NOW
) -> Witness:
    return Witness(
        db, WITNESS, ed_key("witness"), [LogKey(lg.origin, lg.verifiers()) for lg in logs], clock
    )


def spec_verify_cosignature(name: str, public: bytes, body: str, line: str) -> int:
    """c2sp.org/tlog-cosignature, transcribed without gateway code: the line is
    `— <name> base64(key ID || timestamp || signature)`, the key ID is
    SHA-256(name || 0x0A || 0x04 || public key)[:4], and the Ed25519 signature covers
    "cosignature/v1\\ntime <timestamp>\\n" followed by the checkpoint body."""
    prefix = "\u2014 " + name + " "
    assert line.startswith(prefix) and line.endswith("\n")
    raw = base64.b64decode(line[len(prefix) : -1], validate=True)
    assert raw[:4] == hashlib.sha256(name.encode() + b"\n\x04" + public).digest()[:4]
    ts = int.from_bytes(raw[4:12], "big")
    message = b"cosignature/v1\ntime " + str(ts).encode() + b"\n" + body.encode()
    ed25519.Ed25519PublicKey.from_public_bytes(public).verify(raw[12:], message)
    return ts


# --------------------------------------------------------------------------
# The happy path.
# --------------------------------------------------------------------------


def test_first_checkpoint_is_cosigned_and_stored(db: sqlite3.Connection, log: TestLog) -> None:
    w = make_witness(db, log)
    assert w.known_size(ORIGIN) == 0 and w.latest(ORIGIN) is None
    signed = log.checkpoint()
    line = w.add_checkpoint(signed, 0, [])
    assert line.name == WITNESS
    body = note.parse_note(signed).text
    # Our cosignature code and the spec's transcription both verify it, with our clock.
    cosigner = cosignature.CosignatureVerifier(
        WITNESS, note.ed25519_public_bytes(ed_key("witness"))
    )
    assert cosigner.verify(body.encode(), line.signature)
    assert spec_verify_cosignature(WITNESS, cosigner.public_key, body, line.line()) == int(NOW)
    assert cosignature.parse_cosigner_vkey(w.vkey) == cosigner
    assert w.known_size(ORIGIN) == 5
    latest = w.latest(ORIGIN)
    assert latest is not None
    opened = note.open_note(latest, [*log.verifiers(), cosigner])
    assert {s.name for s in opened.verified} == {ORIGIN, WITNESS}
    assert opened.text == body


def test_growth_with_a_valid_consistency_proof(db: sqlite3.Connection, log: TestLog) -> None:
    w = make_witness(db, log)
    w.add_checkpoint(log.checkpoint(), 0, [])
    for n in (1, 2, 10, 100, 7):
        old = len(log.leaves)
        log.grow(n)
        w.add_checkpoint(log.checkpoint(), old, log.proof(old))
        assert w.known_size(ORIGIN) == len(log.leaves)
    sizes = [checkpoint.checkpoint_of(note.parse_note(n)).size for n in w.cosigned(ORIGIN)]
    assert sizes == [5, 6, 8, 18, 118, 125]


def test_the_same_checkpoint_again_is_cosigned_again(db: sqlite3.Connection, log: TestLog) -> None:
    # A log that lost the answer retries: old size = size, empty proof, same root.
    w = make_witness(db, log)
    w.add_checkpoint(log.checkpoint(), 0, [])
    w.add_checkpoint(log.checkpoint(), 5, [])
    assert w.known_size(ORIGIN) == 5 and len(w.cosigned(ORIGIN)) == 1


def test_state_survives_a_restart(tmp_path: Path, log: TestLog) -> None:
    conn = connect(tmp_path / "n.sqlite")
    make_witness(conn, log).add_checkpoint(log.checkpoint(), 0, [])
    conn.close()
    conn = connect(tmp_path / "n.sqlite")
    w = make_witness(conn, log)
    assert w.known_size(ORIGIN) == 5
    log.grow(3)
    with pytest.raises(witness.OldSizeMismatch):
        w.add_checkpoint(log.checkpoint(), 0, [])
    w.add_checkpoint(log.checkpoint(), 5, log.proof(5))
    conn.close()


# --------------------------------------------------------------------------
# Refusals, in the spec's order.
# --------------------------------------------------------------------------


def test_wrong_old_size_answers_the_known_size(db: sqlite3.Connection, log: TestLog) -> None:
    w = make_witness(db, log)
    w.add_checkpoint(log.checkpoint(), 0, [])
    log.grow(4)
    for old in (0, 4, 6):
        with pytest.raises(witness.OldSizeMismatch) as e:
            w.add_checkpoint(log.checkpoint(), old, log.proof(old))
        assert e.value.known_size == 5 and e.value.http_status == 409
        assert "\n" not in str(e.value)
    assert w.known_size(ORIGIN) == 5


def test_old_size_above_the_checkpoint_is_a_bad_request(
    db: sqlite3.Connection, log: TestLog
) -> None:
    w = make_witness(db, log)
    with pytest.raises(witness.BadRequest) as e:
        w.add_checkpoint(log.checkpoint(), 6, [])
    assert e.value.http_status == 400


def test_bad_consistency_proof_is_refused_and_nothing_moves(
    db: sqlite3.Connection, log: TestLog
) -> None:
    w = make_witness(db, log)
    w.add_checkpoint(log.checkpoint(), 0, [])
    log.grow(6)
    good = log.proof(5)
    bad_proofs = [
        [],
        good[:-1],
        [*good, good[0]],
        [bytes([good[0][0] ^ 1]) + good[0][1:], *good[1:]],
        [good[0][:31], *good[1:]],
    ]
    for proof in bad_proofs:
        with pytest.raises(witness.BadConsistencyProof) as e:
            w.add_checkpoint(log.checkpoint(), 5, proof)
        assert e.value.http_status == 422
    # A proof for old size 0 must be empty.
    fresh = TestLog("other.example/log")
    fresh.grow(3)
    w2 = make_witness(db, log, fresh)
    with pytest.raises(witness.BadConsistencyProof):
        w2.add_checkpoint(fresh.checkpoint(), 0, [merkle.EMPTY_ROOT])
    assert w.known_size(ORIGIN) == 5 and w2.known_size("other.example/log") == 0
    assert w.evidence() == []


def test_unknown_origin(db: sqlite3.Connection, log: TestLog) -> None:
    w = make_witness(db, log)
    other = TestLog("log.example/unknown")
    other.grow(2)
    with pytest.raises(witness.UnknownLog) as e:
        w.add_checkpoint(other.checkpoint(), 0, [])
    assert e.value.http_status == 404
    with pytest.raises(witness.UnknownLog):
        w.known_size("log.example/unknown")


def test_bad_signature(db: sqlite3.Connection, log: TestLog) -> None:
    w = make_witness(db, log)
    # Same origin, another key: an unknown key is ignored, so no known key signed it.
    impostor = TestLog(ORIGIN, [ecdsa_signer(ORIGIN, "impostor")])
    impostor.leaves = list(log.leaves)
    with pytest.raises(witness.BadSignature) as e:
        w.add_checkpoint(impostor.checkpoint(), 0, [])
    assert e.value.http_status == 403
    # The log's own signature over another body.
    signed = log.checkpoint()
    forged = signed.replace(b"\n5\n", b"\n4\n", 1)
    with pytest.raises(witness.BadSignature):
        w.add_checkpoint(forged, 0, [])
    # The unknown origin is told first, as the spec orders it (404 before 403).
    with pytest.raises(witness.UnknownLog):
        w.add_checkpoint(signed.replace(ORIGIN.encode(), b"x.example/y"), 0, [])
    assert w.known_size(ORIGIN) == 0


@pytest.mark.parametrize(
    "data",
    [b"", b"not a note", b"o\n5\nroot\n\n\xe2\x80\x94 o AAAA\n", b"\xff\xfe", b"a\n\nb\n"],
)
def test_malformed_notes_are_bad_requests(
    db: sqlite3.Connection, log: TestLog, data: bytes
) -> None:
    w = make_witness(db, log)
    with pytest.raises(witness.BadRequest):
        w.add_checkpoint(data, 0, [])


def test_too_many_proof_lines(db: sqlite3.Connection, log: TestLog) -> None:
    w = make_witness(db, log)
    with pytest.raises(witness.BadRequest):
        w.add_checkpoint(log.checkpoint(), 0, [merkle.EMPTY_ROOT] * 64)


# --------------------------------------------------------------------------
# Split views.
# --------------------------------------------------------------------------


def test_two_checkpoints_of_one_size_are_a_split_view_kept_as_evidence(
    db: sqlite3.Connection, log: TestLog, caplog: pytest.LogCaptureFixture
) -> None:
    w = make_witness(db, log)
    w.add_checkpoint(log.checkpoint(), 0, [])
    cosigned = w.latest(ORIGIN)
    fork = TestLog(ORIGIN, log.signers)
    fork.grow(5, tag="other")
    presented = fork.checkpoint()
    with caplog.at_level(logging.ERROR, logger="gateway.ledger.witness"):
        for _ in range(3):
            with pytest.raises(witness.SplitView) as e:
                w.add_checkpoint(presented, 5, [])
            assert e.value.http_status == 409
    # Logged once per pair, however often the log shows it.
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "SPLIT VIEW" in errors[0].getMessage()
    [ev] = w.evidence(ORIGIN)
    assert ev.id == e.value.evidence and ev.kind == "same_size"
    assert ev.cosigned_note == cosigned and ev.presented_note == presented
    # Both notes still verify: the evidence is signed by the log itself.
    for data in (ev.cosigned_note, ev.presented_note):
        checkpoint.open_checkpoint(data, log.verifiers(), ORIGIN)
    assert w.known_size(ORIGIN) == 5 and w.latest(ORIGIN) == cosigned


def test_a_smaller_checkpoint_contradicting_one_cosigned_is_a_split_view(
    db: sqlite3.Connection, log: TestLog
) -> None:
    w = make_witness(db, log)
    w.add_checkpoint(log.checkpoint(3), 0, [])
    w.add_checkpoint(log.checkpoint(5), 3, log.proof(3, 5))
    fork = TestLog(ORIGIN, log.signers)
    fork.grow(3, tag="other")
    with pytest.raises(witness.SplitView):
        w.add_checkpoint(fork.checkpoint(), 3, [])
    [ev] = w.evidence(ORIGIN)
    assert ev.cosigned_size == 3
    # Without a stored checkpoint of that size, it is only a stale old size.
    with pytest.raises(witness.OldSizeMismatch):
        w.add_checkpoint(fork.checkpoint(2), 2, [])


def test_a_later_checkpoint_grown_from_another_tree_is_a_split_view(
    db: sqlite3.Connection, log: TestLog, caplog: pytest.LogCaptureFixture
) -> None:
    w = make_witness(db, log)
    w.add_checkpoint(log.checkpoint(), 0, [])
    # The log shows others a tree whose leaf 2 differs, and grows it to 12 leaves.
    fork = TestLog(ORIGIN, log.signers)
    fork.leaves = [*log.leaves[:2], b"changed", *log.leaves[3:]]
    fork.grow(7)
    # Its consistency proof from 5 opens its new root, and the old root it implies is not
    # the one this witness cosigned.
    presented = fork.checkpoint()
    with (
        caplog.at_level(logging.ERROR, logger="gateway.ledger.witness"),
        pytest.raises(witness.SplitView) as e,
    ):
        w.add_checkpoint(presented, 5, fork.proof(5))
    assert e.value.http_status == 422
    [ev] = w.evidence(ORIGIN)
    assert ev.kind == "inconsistent" and ev.old_size == 5
    assert ev.proof == tuple(fork.proof(5))
    assert ev.presented_note == presented
    assert checkpoint.checkpoint_of(note.parse_note(ev.cosigned_note)).root_hash == merkle.root(
        log.leaves
    )
    assert sum(r.levelno == logging.ERROR for r in caplog.records) == 1
    # The honest continuation is still cosigned.
    log.grow(7)
    w.add_checkpoint(log.checkpoint(), 5, log.proof(5))
    assert w.known_size(ORIGIN) == 12


def test_a_fork_from_a_power_of_two_size_is_a_bad_proof(db: sqlite3.Connection) -> None:
    # From a size that is a power of two, the proof starts from the witness's own old root,
    # so a forked tree's proof opens nothing: refused, but not evidence of a fork.
    log = TestLog()
    log.grow(4)
    w = make_witness(db, log)
    w.add_checkpoint(log.checkpoint(), 0, [])
    fork = TestLog(ORIGIN, log.signers)
    fork.leaves = [b"changed", *log.leaves[1:]]
    fork.grow(4)
    with pytest.raises(witness.BadConsistencyProof):
        w.add_checkpoint(fork.checkpoint(), 4, fork.proof(4))
    assert w.evidence() == []


# --------------------------------------------------------------------------
# The node's own checks run inside the witness's transaction.
# --------------------------------------------------------------------------


def test_a_failing_check_leaves_nothing_stored(db: sqlite3.Connection, log: TestLog) -> None:
    w = make_witness(db, log)

    class LeavesMissing(Exception):
        pass

    def check(cp: Checkpoint) -> None:
        db.executemany(
            "INSERT INTO leaves VALUES (?, ?, ?)",
            [(cp.origin, i, leaf) for i, leaf in enumerate(log.leaves[: cp.size])],
        )
        raise LeavesMissing("leaf 3 does not hash to the proof")

    with pytest.raises(LeavesMissing):
        w.add_checkpoint(log.checkpoint(), 0, [], check=check)
    assert db.execute("SELECT COUNT(*) FROM leaves").fetchone()[0] == 0
    assert w.known_size(ORIGIN) == 0 and w.latest(ORIGIN) is None
    assert not db.in_transaction

    seen: list[int] = []

    def ok(cp: Checkpoint) -> None:
        seen.append(cp.size)
        db.execute("INSERT INTO leaves VALUES (?, 0, x'00')", (cp.origin,))

    w.add_checkpoint(log.checkpoint(), 0, [], check=ok)
    assert seen == [5] and db.execute("SELECT COUNT(*) FROM leaves").fetchone()[0] == 1


def test_check_is_not_called_for_a_refused_checkpoint(db: sqlite3.Connection, log: TestLog) -> None:
    w = make_witness(db, log)
    called: list[Checkpoint] = []
    with pytest.raises(witness.OldSizeMismatch):
        w.add_checkpoint(log.checkpoint(), 3, log.proof(3), check=called.append)
    assert called == []


# --------------------------------------------------------------------------
# Key rotation.
# --------------------------------------------------------------------------


def test_rotation_adds_a_verifier_that_persists(tmp_path: Path, log: TestLog) -> None:
    conn = connect(tmp_path / "n.sqlite")
    w = make_witness(conn, log)
    w.add_checkpoint(log.checkpoint(), 0, [])
    new_signer = ecdsa_signer(ORIGIN, "new log key")
    old_signer = log.signers[0]
    old_verifier = log.verifiers()[0]
    # Overlap: both keys sign; the witness knows only the old one and ignores the other.
    log.signers = [old_signer, new_signer]
    log.grow(2)
    w.add_checkpoint(log.checkpoint(), 5, log.proof(5))
    # After the overlap the old key stops; the new key is not trusted yet.
    log.signers = [new_signer]
    log.grow(2)
    with pytest.raises(witness.BadSignature):
        w.add_checkpoint(log.checkpoint(), 7, log.proof(7))
    w.add_log(LogKey(ORIGIN, (new_signer.verifier(),)))
    w.add_checkpoint(log.checkpoint(), 7, log.proof(7))
    conn.close()
    # A restart with only the configured (old) key still knows the added one.
    conn = connect(tmp_path / "n.sqlite")
    w = Witness(conn, WITNESS, ed_key("witness"), [LogKey(ORIGIN, (old_verifier,))])
    assert {v.key_id for v in w.verifiers(ORIGIN)} == {old_signer.key_id, new_signer.key_id}
    log.grow(1)
    w.add_checkpoint(log.checkpoint(), 9, log.proof(9))
    conn.close()


def test_a_key_added_by_a_check_counts_only_if_the_checkpoint_commits(
    db: sqlite3.Connection, log: TestLog
) -> None:
    w = make_witness(db, log)
    new_signer = ecdsa_signer(ORIGIN, "new log key")

    def rotate_then_fail(cp: Checkpoint) -> None:
        w.add_log(LogKey(ORIGIN, (new_signer.verifier(),)))
        raise RuntimeError("a later leaf is bad")

    with pytest.raises(RuntimeError):
        w.add_checkpoint(log.checkpoint(), 0, [], check=rotate_then_fail)
    assert len(w.verifiers(ORIGIN)) == 1
    assert db.execute("SELECT COUNT(*) FROM witness_log_keys").fetchone()[0] == 0

    w.add_checkpoint(
        log.checkpoint(),
        0,
        [],
        check=lambda cp: w.add_log(LogKey(ORIGIN, (new_signer.verifier(),))),
    )
    assert len(w.verifiers(ORIGIN)) == 2


def test_two_keys_under_one_name_and_id_are_refused(db: sqlite3.Connection) -> None:
    with pytest.raises(ConfigError):
        LogKey(ORIGIN, ())
    with pytest.raises(ConfigError):
        Witness(db, "bad name", ed_key("w"), [])
    log = TestLog()
    with pytest.raises(ConfigError):
        Witness(db, WITNESS, ed_key("w"), [LogKey(ORIGIN, log.verifiers())] * 2)


# --------------------------------------------------------------------------
# The node's key file.
# --------------------------------------------------------------------------


def test_keygen_writes_a_private_key_file_and_prints_the_vkey(
    tmp_path: Path, db: sqlite3.Connection
) -> None:
    out = tmp_path / "witness.key"
    vkey = witness.keygen(WITNESS, out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    text = out.read_text()
    assert text.startswith(f"PRIVATE+KEY+{WITNESS}+") and text.endswith("\n")
    signer = note.ed25519_signer_from_skey(text.strip())
    name, key = witness.load_key(out)
    assert name == WITNESS == signer.name
    w = Witness(db, name, key, [])
    assert w.vkey == vkey
    assert cosignature.parse_cosigner_vkey(vkey).public_key == note.ed25519_public_bytes(key)
    with pytest.raises(OutputFileError):
        witness.keygen(WITNESS, out)
    out.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        witness.load_key(out)
    with pytest.raises(ConfigError):
        witness.keygen("two words", tmp_path / "other.key")


def test_a_cosignature_by_another_key_does_not_verify(db: sqlite3.Connection, log: TestLog) -> None:
    line = make_witness(db, log).add_checkpoint(log.checkpoint(), 0, [])
    body = note.parse_note(log.checkpoint()).text
    other = note.ed25519_public_bytes(ed_key("someone else"))
    with pytest.raises((InvalidSignature, AssertionError)):
        spec_verify_cosignature(WITNESS, other, body, line.line())


def test_ledger_node_keygen_command(tmp_path: Path) -> None:
    out = tmp_path / "node.key"
    run = [sys.executable, "-m", "gateway", "ledger-node", "keygen", "--name", WITNESS]
    res = subprocess.run([*run, "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    vkey = res.stdout.strip()
    name, key = witness.load_key(out)
    assert cosignature.parse_cosigner_vkey(vkey) == Cosigner(name, key).verifier()
    again = subprocess.run([*run, "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 73 and again.stderr.count("\n") == 1


def test_concurrent_submissions_never_roll_the_witness_back(tmp_path: Path) -> None:
    # The race of c2sp.org/tlog-witness: the old size is checked and the new checkpoint
    # written atomically, so the checkpoints cosigned form one chain, each from the size
    # of the one before, however the submissions interleave.
    log = TestLog()
    log.grow(400)
    conn = connect(tmp_path / "n.sqlite")
    w = make_witness(conn, log)
    notes = {size: log.checkpoint(size) for size in range(1, 401)}
    chain: list[tuple[int, int]] = []

    def submit(step: int) -> None:
        for _ in range(40):
            known = w.known_size(ORIGIN)
            size = min(400, known + step)
            with contextlib.suppress(witness.OldSizeMismatch):
                w.add_checkpoint(
                    notes[size],
                    known,
                    log.proof(known, size),
                    # Runs inside the witness's transaction: the order of commits.
                    check=lambda cp, old=known: chain.append((old, cp.size)),
                )

    threads = [threading.Thread(target=submit, args=(step,)) for step in (1, 2, 3, 5, 7, 11)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert chain[0][0] == 0
    for (_, before), (old, _) in itertools.pairwise(chain):
        assert old == before
    assert chain[-1][1] == w.known_size(ORIGIN)
    cosigned = [checkpoint.checkpoint_of(note.parse_note(n)) for n in w.cosigned(ORIGIN)]
    for a, b in itertools.pairwise(cosigned):
        proof = merkle.consistency_proof(log.leaves[: b.size], a.size)
        assert merkle.verify_consistency(a.size, b.size, proof, a.root_hash, b.root_hash)
    assert w.evidence() == []
    conn.close()
