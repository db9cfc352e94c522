"""The export for auditors (`edge-gateway export`, `edge-gateway demo --export`): written from
a running gateway's spool on real Mosquitto, SoftHSM2 and three ledger nodes while devices
still publish, then verified with nothing but the directory, by gateway.formats.auditdir and
by sigstore-python's checkpoint code."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.edge import export, tlog
from gateway.edge import spool as spool_mod
from gateway.edge.config import load_gateway_config
from gateway.formats import auditdir, batchformat, checkpoint, keyrotation, merkle, note, tlogproof
from gateway.formats.checkpoint import Checkpoint
from gateway.formats.cosignature import Cosigner
from gateway.lab import demo, simulate
from gateway.lab.sandbox import GatewayProc, Hsm, Sandbox
from tests.conftest import Deployment, deploy
from tests.test_checkpoint import VerificationError, sigstore_verify
from tests.test_witness import ORIGIN, ecdsa_signer, ed_key, p256_key

# --------------------------------------------------------------------------
# The sample: first, last, evenly between.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lo", "hi", "n", "expected"),
    [
        (0, 5, 100, [0, 1, 2, 3, 4]),
        (0, 100, 100, list(range(100))),
        (0, 1000, 5, [0, 249, 499, 749, 999]),
        (10, 11, 3, [10]),
        (7, 7, 3, []),
        (0, 50, 0, []),
        (0, 50, 1, [49]),
    ],
)
def test_the_sample_spreads_over_the_log(lo: int, hi: int, n: int, expected: list[int]) -> None:
    assert export.sample_indices(lo, hi, n) == expected


def test_a_sample_of_a_large_log_has_n_distinct_indices_first_and_last() -> None:
    for hi, n in ((101, 100), (10**7, 100), (257, 256), (10**9 + 7, 1000)):
        got = export.sample_indices(0, hi, n)
        assert len(set(got)) == n == len(got) and got == sorted(got)
        assert got[0] == 0 and got[-1] == hi - 1


# --------------------------------------------------------------------------
# A running gateway, exported while devices publish.
# --------------------------------------------------------------------------


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=timeout
    )


def committed_size(spool: Path) -> int:
    conn = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
    try:
        row = conn.execute(
            "SELECT max(size) FROM log_checkpoint WHERE committed_ms IS NOT NULL"
        ).fetchone()
        return int(row[0] or 0)
    finally:
        conn.close()


def committed_sizes(spool: Path, upto: int) -> list[int]:
    conn = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
    try:
        return [
            int(r[0])
            for r in conn.execute(
                "SELECT size FROM log_checkpoint WHERE committed_ms IS NOT NULL AND size <= ?"
                " ORDER BY size",
                (upto,),
            )
        ]
    finally:
        conn.close()


def files(d: Path) -> set[str]:
    return {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()}


class Running:
    def __init__(self, d: Deployment, gw: GatewayProc, origin: str) -> None:
        self.d, self.gw, self.origin = d, gw, origin
        key = serialization.load_pem_public_key(d.public_key.read_bytes())
        assert isinstance(key, ec.EllipticCurvePublicKey)
        self.key = key


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """A gateway whose ledger nodes' vkeys are in [log] witnesses, small batches (many
    checkpoints), and 600 transactions committed."""
    sb = Sandbox(tmp_path_factory.mktemp("export") / "sb")
    try:
        d = deploy(sb, batch="max_tx = 40\nmax_age_s = 0.2")  # the sandbox lists the vkeys
        gw = d.start_gateway()
        yield Running(d, gw, load_gateway_config(d.config).log_origin)
    finally:
        sb.close()


def publish(r: Running, devices: int, count: int, rate: float, start_seq: int) -> None:
    opts = simulate.SimulateOptions(
        port=r.d.broker.port,
        devices=devices,
        count=count,
        rate=rate,
        seconds=600,
        start_seq=start_seq,
    )
    res = asyncio.run(simulate.run(r.d.sandbox.simulate_options(opts)))
    assert res.acknowledged == devices * count and res.failed == 0, res.line()


def ensure_loaded(r: Running) -> None:
    """The 1200 transactions the first test publishes, committed, whichever test runs."""
    if demo.gateway_status(r.gw).transactions_stored < 1200:
        publish(r, 20, 60, 5000.0, 1)
    demo.wait_drained(r.gw, 1200, timeout=90)


@pytest.mark.integration
def test_an_export_written_while_devices_publish_verifies_offline(
    running: Running, tmp_path: Path
) -> None:
    r = running
    load = threading.Thread(target=publish, args=(r, 20, 60, 150.0, 1))
    load.start()
    try:
        deadline = time.monotonic() + 60
        while committed_size(r.gw.spool) < 150 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert committed_size(r.gw.spool) >= 150
        out = tmp_path / "audit"
        stored_at_start = demo.gateway_status(r.gw).transactions_stored
        # No --public-key: the command reads the log's key from the HSM the config names.
        res = cli("export", "--config", str(r.d.config), "--out", str(out))
    finally:
        load.join(120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("\n") == 1 and res.stdout.startswith(f"exported {out}: ")
    # The export started while devices were still publishing, and the log grew past it.
    assert stored_at_start < 1200
    demo.wait_drained(r.gw, 1200, timeout=90)

    report = auditdir.audit(out, witness_quorum=2, origin=r.origin, min_proofs=100)
    assert report.ok, report.failures
    assert report.witnesses == 3 and report.proofs == 100
    # Every committed checkpoint up to the exported one, and a proof between each pair.
    sizes = committed_sizes(r.gw.spool, report.latest_size)
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == sizes
    assert report.checkpoints == len(sizes) >= 4 and report.consistency_proofs == len(sizes) - 1
    assert committed_size(r.gw.spool) == 1200 > report.latest_size
    assert (out / "checkpoint").read_bytes() == (
        out / "checkpoints" / str(report.latest_size)
    ).read_bytes()
    assert (out / "gateway.pem").read_bytes() == r.d.public_key.read_bytes()
    assert sorted(p.name for p in (out / "witnesses").iterdir()) == [
        "ledger-1.vkey",
        "ledger-2.vkey",
        "ledger-3.vkey",
    ]
    assert not [p for p in out.rglob(".*")], "a temporary file was left behind"

    # sigstore-python's checkpoint code verifies every checkpoint of the directory.
    for path in sorted((out / "checkpoints").iterdir()):
        parsed = sigstore_verify(path.read_bytes(), r.key)
        assert parsed.checkpoint.log_size == int(path.name)
        assert parsed.checkpoint.origin == r.origin
    assert sigstore_verify((out / "checkpoint").read_bytes(), r.key)

    # The sample spans the log: its first leaf and the last the checkpoint covers.
    indices = {tlogproof.parse_tlog_proof(p.read_bytes()).index for p in (out / "proofs").iterdir()}
    assert {0, report.latest_size - 1} <= indices and len(indices) == 100

    # The command line verifier agrees, and a changed leaf is found.
    ok = subprocess.run(
        [sys.executable, "-m", "gateway.formats.auditdir", str(out), "--min-proofs", "100"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0 and ": OK: " in ok.stdout, ok.stdout + ok.stderr
    leaf = sorted((out / "leaves").iterdir())[3]
    leaf.write_bytes(leaf.read_bytes()[:-1] + bytes([leaf.read_bytes()[-1] ^ 1]))
    assert not auditdir.audit(out).ok


@pytest.mark.integration
def test_since_and_sample_bound_the_export_and_force_replaces_an_earlier_one(
    running: Running, tmp_path: Path
) -> None:
    r = running
    ensure_loaded(r)
    out = tmp_path / "audit"
    pem = ["--public-key", str(r.d.public_key)]
    first = cli("export", "--config", str(r.d.config), "--out", str(out), *pem)
    assert first.returncode == 0, first.stderr
    before = files(out)

    # A non-empty directory is refused, one line, and left as it was.
    again = cli("export", "--config", str(r.d.config), "--out", str(out), *pem, "--sample", "5")
    assert again.returncode == 73 and "not empty" in again.stderr and "--force" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert files(out) == before

    latest = committed_size(r.gw.spool)
    sizes = committed_sizes(r.gw.spool, latest)
    since = sizes[len(sizes) // 2]
    res = cli(
        "export",
        "--config",
        str(r.d.config),
        "--out",
        str(out),
        *pem,
        "--sample",
        "5",
        "--since",
        str(since),
        "--force",
    )
    assert res.returncode == 0, res.stderr
    report = auditdir.audit(out, witness_quorum=2, origin=r.origin)
    assert report.ok, report.failures
    kept = [s for s in sizes if s >= since]
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == kept
    assert report.consistency_proofs == len(kept) - 1 and report.proofs == 5
    assert len(list((out / "leaves").iterdir())) == 5  # the earlier export's are gone
    indices = sorted(
        tlogproof.parse_tlog_proof(p.read_bytes()).index for p in (out / "proofs").iterdir()
    )
    assert indices[0] == 0 and indices[-1] == latest - 1
    # Each leaf file is the transaction its proof names.
    for p in (out / "leaves").iterdir():
        assert merkle.leaf_hash(p.read_bytes()).hex() == p.name.removesuffix(".bin")

    beyond = cli(
        "export",
        "--config",
        str(r.d.config),
        "--out",
        str(tmp_path / "x"),
        *pem,
        "--since",
        str(latest + 1),
    )
    assert beyond.returncode == 65 and "beyond the latest committed" in beyond.stderr


@pytest.mark.integration
def test_an_export_with_the_wrong_key_or_no_witnesses_is_refused(
    running: Running, tmp_path: Path
) -> None:
    r = running
    ensure_loaded(r)
    other = tmp_path / "other.pem"
    other.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    out = tmp_path / "audit"
    res = cli("export", "--config", str(r.d.config), "--out", str(out), "--public-key", str(other))
    assert res.returncode == 65 and "does not verify under the public key" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert not out.exists() or not any(out.iterdir())

    bare = tmp_path / "bare.toml"
    bare.write_text(r.d.config.read_text().split("\n[log.witnesses]\n")[0])
    res = cli("export", "--config", str(bare), "--out", str(out), "--public-key", str(other))
    assert res.returncode == 78 and "[log] witnesses" in res.stderr
    # A witness given on the command line is enough.
    res = cli(
        "export",
        "--config",
        str(bare),
        "--out",
        str(out),
        "--public-key",
        str(r.d.public_key),
        "--witness",
        r.d.ledgers[0].witness_vkey,
    )
    assert res.returncode == 0, res.stderr
    assert auditdir.audit(out, witness_quorum=1).ok
    assert [p.name for p in (out / "witnesses").iterdir()] == ["ledger-1.vkey"]


@pytest.mark.integration
def test_a_spool_this_user_may_not_read_is_one_line_and_exit_77(running: Running) -> None:
    """Run as `nobody` against a copy of the spool only root may read."""
    r = running
    ensure_loaded(r)
    work = Path(tempfile.mkdtemp(prefix="export-perm-"))
    try:
        work.chmod(0o755)
        spool = work / "spool.db"
        src = sqlite3.connect(f"file:{r.gw.spool}?mode=ro", uri=True)
        dst = sqlite3.connect(spool)
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()
        spool.chmod(0o600)
        sb = Sandbox(work / "sb", tls=False)
        hsm = Hsm(conf=work / "none", token_label="none", pin_file=work / "pin")
        cfg = sb.gateway_config(r.d.gateway_id, hsm, 1883, [("ledger-1", "127.0.0.1:1")], quorum=1)
        text = cfg.read_text()
        start = text.index('path = "', text.index("[spool]")) + len('path = "')
        cfg.write_text(text[:start] + str(spool) + text[text.index('"', start) :])
        pem = work / "gateway.pem"
        shutil.copy(r.d.public_key, pem)
        for p in (work / "sb", cfg.parent, cfg, pem):
            p.chmod(0o755 if p.is_dir() else 0o644)
        argv = [
            "export",
            "--config",
            str(cfg),
            "--out",
            str(work / "out"),
            "--public-key",
            str(pem),
            "--witness",
            r.d.ledgers[0].witness_vkey,
        ]
        code, stderr = run_cli_as_nobody(argv, work)
        res = subprocess.CompletedProcess(argv, code, "", stderr)
        assert res.returncode == 77, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and str(spool) in res.stderr
        assert "Permission denied" in res.stderr and "Traceback" not in res.stderr
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_cli_as_nobody(argv: list[str], work: Path) -> tuple[int, str]:
    """`edge-gateway ARGV` as the user nobody, in a forked child that drops its privileges
    after the modules are loaded (as `--user` does for an operator running as root), so the
    checkout need not be readable by nobody. Returns (exit code, stderr)."""
    import pwd

    import gateway.edge.export  # noqa: F401  (loaded before the privileges go)
    from gateway import cli as gateway_cli

    gateway_cli.parser().parse_args(argv)  # loads what building the parser imports

    err = work / "stderr"
    err.touch(mode=0o666)
    err.chmod(0o666)
    nobody = pwd.getpwnam("nobody")
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            fd = os.open(err, os.O_WRONLY)
            os.dup2(fd, 2)
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            os.chdir(work)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            code = gateway_cli.main(argv)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), err.read_text()
        time.sleep(0.1)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError("export as nobody did not finish within 60 s")


# --------------------------------------------------------------------------
# The demo's export.
# --------------------------------------------------------------------------


@pytest.mark.integration
def test_the_demo_exports_a_directory_that_verifies(tmp_path: Path) -> None:
    out = tmp_path / "audit"
    res = cli(
        "demo",
        "--seconds",
        "8",
        "--devices",
        "200",
        "--rate",
        "1000",
        "--workdir",
        str(tmp_path / "demo"),
        "--export",
        str(out),
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    line = next(ln for ln in res.stdout.splitlines() if "export (auditdir)" in ln)
    # The sample of 100, and the rotation entry's proof (an export always carries those).
    assert ": OK: " in line and "101 inclusion proofs" in line
    report = auditdir.audit(out, witness_quorum=3, min_proofs=100)
    assert report.ok, report.failures
    # The demo rotated the log key a third of the way: gateway.pem holds both keys, and
    # every checkpoint verifies under the key (or one of the keys) that signed it.
    assert "rotation 1 done" in res.stdout
    keys = batchformat.load_public_keys((out / "gateway.pem").read_bytes())
    assert len(keys) == 2
    for path in (out / "checkpoints").iterdir():
        verified = []
        for key in keys:
            with contextlib.suppress(VerificationError):
                verified.append(sigstore_verify(path.read_bytes(), key).checkpoint.log_size)
        assert verified and set(verified) == {int(path.name)}, path.name
    # A directory the demo would write into must be empty: refused before the demo runs.
    again = cli("demo", "--seconds", "1", "--export", str(out), timeout=60)
    assert again.returncode == 73 and "not empty" in again.stderr


def test_the_export_refuses_a_sample_or_size_out_of_range(tmp_path: Path) -> None:
    with pytest.raises(export.ExportUsage, match="--sample"):
        export.export(
            tmp_path / "spool.db",
            tmp_path / "out",
            gateway_id="g",
            origin="o",
            public_pems=[],
            witnesses={},
            sample=-1,
        )
    with pytest.raises(export.ExportUsage, match="--since"):
        export.export(
            tmp_path / "spool.db",
            tmp_path / "out",
            gateway_id="g",
            origin="o",
            public_pems=[],
            witnesses={},
            since=-1,
        )
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------
# A spool written here (real SQLite, the spool's schema): a log whose key rotated.
# --------------------------------------------------------------------------

GW = "gw-01"


def spool_with_rotation(path: Path) -> tuple[list[Cosigner], ec.EllipticCurvePrivateKey, int]:
    """Three batches: the second holds a key rotation entry and its checkpoint is signed by
    the old and the new key, the third by the new key only. Every checkpoint committed
    and cosigned by three witnesses. Returns the witnesses, the old key, the entry's index."""
    old, new = ecdsa_signer(ORIGIN, "old log key"), ecdsa_signer(ORIGIN, "new log key")
    old_key = p256_key("old log key")
    witnesses = [
        Cosigner(checkpoint.witness_name("ledger.carrier.example", f"ledger-{i}"), ed_key(str(i)))
        for i in (1, 2, 3)
    ]
    entry = keyrotation.RotationEntry(
        origin=ORIGIN,
        gateway_id=GW,
        rotation=1,
        old_key_id=hashlib.sha256(note.spki_der(old_key.public_key())).digest(),
        new_spki=note.spki_der(p256_key("new log key").public_key()),
        overlap_checkpoints=1,
        overlap_seconds=0,
        created_ms=1_700_000_000_000,
    )
    batches = [
        [f"tx {i}".encode() for i in range(10)],
        [f"tx {i}".encode() for i in range(10, 14)] + [entry.leaf()],
        [f"tx {i}".encode() for i in range(14, 30)],
    ]
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(spool_mod.SCHEMA + spool_mod.TX_KEY_SCHEMA + spool_mod.DEV_KEY_SCHEMA)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executemany(
        "INSERT INTO meta VALUES (?, ?)",
        [("schema_version", str(spool_mod.SCHEMA_VERSION)), ("gateway_id", GW)],
    )
    edge, rowid, entry_index = tlog.LogEdge(0), 0, -1
    for seq, (leaves, signers) in enumerate(zip(batches, ([old], [old, new], [new]), strict=True)):
        first_index, first_rowid = edge.size, rowid + 1
        for leaf in leaves:
            rowid += 1
            device = keyrotation.RESERVED_DEVICE if leaf == entry.leaf() else "dev-1"
            if device != "dev-1":
                entry_index = edge.size + leaves.index(leaf)
            conn.execute(
                "INSERT INTO tx (rowid, device_id, device_seq, payload_sha256, tx_id, leaf,"
                " size, received_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (rowid, device, rowid, b"", merkle.leaf_hash(leaf), leaf, len(leaf), 0),
            )
        edge, writes = edge.append([merkle.leaf_hash(x) for x in leaves])
        tlog.write_tiles(conn, writes)
        signed = checkpoint.sign_checkpoint(Checkpoint(ORIGIN, edge.size, edge.root()), signers)
        conn.execute(
            "INSERT INTO log_checkpoint VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (edge.size, seq, first_index, first_rowid, rowid, edge.root(), signed, 0, 1),
        )
        body = note.parse_note(signed).text
        for w in witnesses:
            line = w.signature(body, 1_700_000_000 + seq).line().rstrip("\n")
            conn.execute(
                "INSERT INTO log_cosignature VALUES (?, ?, ?, ?)",
                (edge.size, w.name.rsplit("/", 1)[-1], line, 0),
            )
    conn.close()
    return witnesses, old_key, entry_index


def test_keys_a_rotation_entry_introduces_are_exported_with_the_entry_s_proof(
    tmp_path: Path,
) -> None:
    spool = tmp_path / "spool.db"
    witnesses, old_key, entry_index = spool_with_rotation(spool)
    pem = old_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    out = tmp_path / "audit"
    done = export.export(
        spool,
        out,
        gateway_id=GW,
        origin=ORIGIN,
        public_pems=[pem],  # the original key only: the entry in the log names the next
        witnesses={w.name.rsplit("/", 1)[-1]: w.verifier().vkey() for w in witnesses},
        sample=3,
    )
    assert (done.checkpoints, done.consistency_proofs, done.latest_size) == (3, 2, 31)
    report = auditdir.audit(out, witness_quorum=3, origin=ORIGIN)
    assert report.ok, report.failures
    assert (out / "gateway.pem").read_bytes().count(b"BEGIN PUBLIC KEY") == 2
    indices = {tlogproof.parse_tlog_proof(p.read_bytes()).index for p in (out / "proofs").iterdir()}
    assert indices == {0, 15, 30, entry_index} and entry_index == 14  # the sample, the entry
    # The last checkpoint carries the new key's signature only: sigstore-python verifies
    # it with the key the entry introduced, and not with the old one.
    new_key = p256_key("new log key").public_key()
    assert sigstore_verify((out / "checkpoint").read_bytes(), new_key)
    with pytest.raises(VerificationError):
        sigstore_verify((out / "checkpoint").read_bytes(), old_key.public_key())
    # Without the entry's key an auditor could not check it: the export would not verify.
    (out / "gateway.pem").write_bytes(pem)
    assert not auditdir.audit(out, witness_quorum=3, origin=ORIGIN).ok


def test_a_pem_file_holding_several_keys_gives_each_key() -> None:
    """After a rotation the gateway's PEM file holds both keys: each is a key of the log
    (before, only the file's first was read and the rotated key's checkpoints failed)."""
    a, b = (
        p256_key(label)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        for label in ("old log key", "new log key")
    )
    assert export._each_key([a + b, a]) == [a, b, a]
    with pytest.raises(export.ExportError, match="not a PEM public key"):
        export._each_key([b"-----BEGIN CERTIFICATE-----\n"])
