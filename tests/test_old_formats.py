"""Spools and ledger databases of the format before the log (one Merkle tree per batch,
chained by header hashes), and spools and ledger databases of schema 2 (the log with the
header chain beside it), are refused at start with one line and exit 65, and left byte for
byte as they were:
nothing misreads them, nothing upgrades them."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.lab.sandbox import Sandbox, free_port
from gateway.ledger import witness
from tests.test_one_line_errors import gateway_with_key, one_line

# The tables of schema 1 that matter here, as that version created them.
OLD_SPOOL = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE tx (
    rowid INTEGER PRIMARY KEY AUTOINCREMENT, device_id TEXT NOT NULL,
    device_seq INTEGER NOT NULL, payload_sha256 BLOB NOT NULL, tx_id BLOB NOT NULL,
    leaf BLOB NOT NULL, size INTEGER NOT NULL, received_ms INTEGER NOT NULL,
    UNIQUE (device_id, device_seq)
);
CREATE TABLE batch (
    seq INTEGER PRIMARY KEY, header BLOB NOT NULL, signature BLOB NOT NULL,
    header_hash BLOB NOT NULL, first_rowid INTEGER NOT NULL, last_rowid INTEGER NOT NULL,
    tx_count INTEGER NOT NULL, created_ms INTEGER NOT NULL, committed_ms INTEGER
);
"""

# Schema 2: the log's tables beside the header chain's batch and receipt tables (a
# transaction, its signed batch and checkpoint, and a receipt).
OLD_SPOOL_2 = (
    OLD_SPOOL
    + """
CREATE TABLE receipt (
    seq INTEGER NOT NULL, node_id TEXT NOT NULL, receipt BLOB NOT NULL,
    received_ms INTEGER NOT NULL, PRIMARY KEY (seq, node_id)
) WITHOUT ROWID;
CREATE TABLE log_tile (
    level INTEGER NOT NULL, idx INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (level, idx)
) WITHOUT ROWID;
CREATE TABLE log_checkpoint (
    size INTEGER PRIMARY KEY, seq INTEGER NOT NULL UNIQUE, first_index INTEGER NOT NULL,
    first_rowid INTEGER NOT NULL, last_rowid INTEGER NOT NULL, root BLOB NOT NULL,
    note BLOB NOT NULL, created_ms INTEGER NOT NULL, committed_ms INTEGER
);
CREATE TABLE log_cosignature (
    size INTEGER NOT NULL, node_id TEXT NOT NULL, line TEXT NOT NULL,
    received_ms INTEGER NOT NULL, PRIMARY KEY (size, node_id)
) WITHOUT ROWID;
INSERT INTO tx VALUES (1, 'meter-1', 1, x'00', x'00', x'00', 1, 0);
INSERT INTO batch VALUES (0, x'08', x'30', x'00', 1, 1, 1, 0, NULL);
INSERT INTO log_checkpoint VALUES (1, 0, 0, 1, 1, x'00', x'00', 0, NULL);
INSERT INTO receipt VALUES (0, 'ledger-1', x'00', 0);
"""
)

OLD_LEDGER = """
CREATE TABLE batches (
    gateway_id TEXT NOT NULL, seq INTEGER NOT NULL, header BLOB NOT NULL,
    header_hash BLOB NOT NULL, signature BLOB NOT NULL, batch BLOB NOT NULL,
    receipt BLOB NOT NULL, committed_ms INTEGER NOT NULL, PRIMARY KEY (gateway_id, seq)
) WITHOUT ROWID;
INSERT INTO batches VALUES ('edge-01', 0, x'00', x'00', x'00', x'00', x'00', 0);
"""

# The ledger node's schema 2: the log's tables beside the batches of the header chain.
SCHEMA_2_LEDGER = (
    """
CREATE TABLE ledger_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
INSERT INTO ledger_meta VALUES ('schema_version', '2');
CREATE TABLE log_leaf (
    gateway_id TEXT NOT NULL, idx INTEGER NOT NULL, leaf BLOB NOT NULL,
    PRIMARY KEY (gateway_id, idx)
) WITHOUT ROWID;
CREATE TABLE log_tile (
    gateway_id TEXT NOT NULL, level INTEGER NOT NULL, idx INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (gateway_id, level, idx)
) WITHOUT ROWID;
INSERT INTO log_leaf VALUES ('edge-01', 0, x'0a');
"""
    + OLD_LEDGER
)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tables(path: Path) -> set[str]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("schema", "script"), [(1, OLD_SPOOL), (2, OLD_SPOOL_2)], ids=["per-batch", "header-chain"]
)
def test_a_spool_of_an_earlier_schema_is_refused_with_exit_65(
    sandbox: Sandbox, schema: int, script: str
) -> None:
    cfg = gateway_with_key(sandbox)
    import tomllib

    spool = Path(tomllib.loads(cfg.read_text())["spool"]["path"])
    spool.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(spool)
    conn.executescript(script)
    conn.executemany(
        "INSERT INTO meta VALUES (?, ?)",
        [("schema_version", str(schema)), ("gateway_id", "edge-once")],
    )
    conn.commit()
    conn.close()
    before = digest(spool)
    out = sandbox.run_gateway_once(cfg)
    assert out.returncode == 65, out.stdout[-2000:] + out.stderr[-2000:]
    line = one_line(out)
    assert f"schema {schema}" in line and "reads 3" in line and "left untouched" in line, line
    assert digest(spool) == before
    assert "tx_key" not in tables(spool)  # nothing of schema 3 was created in it


def _start_ledger_node(tmp_path: Path, db: Path) -> subprocess.CompletedProcess[str]:
    """`edge-gateway ledger-node` over `db`, as an operator starts it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = tmp_path / "edge-01.pem"
    pem.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    key = tmp_path / "witness.key"
    witness.keygen("ledger.test.invalid/ledger-witness/n1", key)
    cfg = tmp_path / "ledger-node.toml"
    cfg.write_text(
        f'[node]\nid = "n1"\nlisten = "127.0.0.1:{free_port()}"\ndb_path = "{db}"\n'
        f'plaintext = true\n\n[gateways]\n"edge-01" = "{pem}"\n\n[witness]\nkey_file = "{key}"\n'
    )
    return subprocess.run(
        [sys.executable, "-m", "gateway", "ledger-node", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_ledger_database_of_the_per_batch_format_is_refused_with_exit_65(
    tmp_path: Path,
) -> None:
    db = tmp_path / "ledger.db"
    conn = sqlite3.connect(db)
    conn.executescript(OLD_LEDGER)
    conn.commit()
    conn.close()
    before = digest(db)
    out = _start_ledger_node(tmp_path, db)
    assert out.returncode == 65, out.stdout[-2000:] + out.stderr[-2000:]
    line = one_line(out)
    assert "per-batch chain format" in line and "left untouched" in line, line
    assert digest(db) == before
    assert tables(db) == {"batches"}


def test_a_ledger_database_of_schema_2_is_refused_with_exit_65(tmp_path: Path) -> None:
    """Schema 2 held each gateway's log beside the batch header chain: a node of schema 4
    neither reads nor upgrades it."""
    db = tmp_path / "ledger.db"
    conn = sqlite3.connect(db)
    conn.executescript(SCHEMA_2_LEDGER)
    conn.commit()
    conn.close()
    before = digest(db)
    out = _start_ledger_node(tmp_path, db)
    assert out.returncode == 65, out.stdout[-2000:] + out.stderr[-2000:]
    line = one_line(out)
    assert "schema 2 (the log beside the batch header chain)" in line, line
    assert "reads schemas 3 and 4" in line and "left untouched" in line, line
    assert digest(db) == before
    assert tables(db) == {"ledger_meta", "log_leaf", "log_tile", "batches"}
