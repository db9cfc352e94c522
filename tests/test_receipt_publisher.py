"""What the receipt publisher (gateway.edge.receipts) reads from a spool: the receipts of
committed transactions of opted-in profiles only, against the latest committed checkpoint,
a chunk at a time within one batch, each verifying with the reference device verifier; the
mark it keeps in the spool. The spool here is a real SQLite spool holding a log built with a
software P-256 key and three Ed25519 witnesses; the broker side runs in
tests/test_receipts.py."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway._pb.edgegateway.v1 import transaction_pb2
from gateway.edge import receipts, tlog
from gateway.edge.config import SpoolConfig
from gateway.edge.profiles.spec import ReceiptSpec
from gateway.edge.spool import Spool
from gateway.formats import checkpoint, device_verifier, merkle, note, receipt
from gateway.formats.cosignature import Cosigner
from gateway.formats.logtree import LogEdge
from tests.test_witness import ecdsa_signer

ORIGIN = checkpoint.gateway_origin("ledger.carrier.example", "gw-rx")
LOG_KEY = ecdsa_signer(ORIGIN, "receipt-publisher")
WITNESSES = [
    Cosigner(
        checkpoint.witness_name("ledger.carrier.example", f"ledger-{i}"),
        ed25519.Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"rx%d" % i).digest()),
    )
    for i in (1, 2, 3)
]
TRUST = device_verifier.Trust.of(
    ORIGIN, [LOG_KEY.public_key_der], [w.verifier().vkey() for w in WITNESSES], 2
)
SPECS = {"lte-m-tracker@1": ReceiptSpec("receipts/{device}")}


def leaf(device: str, seq: int, profile: str) -> bytes:
    tx = transaction_pb2.Transaction(
        device_id=device, device_seq=seq, profile=profile, kind="k", gateway_id="gw-rx"
    )
    return tx.SerializeToString(deterministic=True)


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(
        SpoolConfig(
            path=tmp_path / "spool.db",
            group_commit_max=1000,
            group_commit_wait_ms=5,
            max_depth=100_000,
            min_free_bytes=0,
            max_pending_age_s=600,
            retention_batches=0,
        ),
        "gw-rx",
    )
    s.open()
    yield s
    s.close()


def add_batches(spool: Spool, batches: list[list[tuple[str, str]]], committed: int) -> None:
    """Batches of (device, profile) transactions, one checkpoint each (signed by the log
    key, cosigned by every witness); the first `committed` checkpoints committed."""

    def op(conn: object) -> None:
        import sqlite3

        assert isinstance(conn, sqlite3.Connection)
        edge = LogEdge(0)
        seq_of: dict[str, int] = {}
        for b, txs in enumerate(batches):
            first_index = edge.size
            rowids = []
            hashes = []
            for device, profile in txs:
                seq_of[device] = seq_of.get(device, 0) + 1
                data = leaf(device, seq_of[device], profile)
                h = merkle.leaf_hash(data)
                cur = conn.execute(
                    "INSERT INTO tx (device_id, device_seq, payload_sha256, tx_id, leaf, size,"
                    " received_ms) VALUES (?, ?, ?, ?, ?, ?, 0)",
                    (device, seq_of[device], h, h, data, len(data)),
                )
                rowids.append(cur.lastrowid)
                hashes.append(h)
            edge, writes = edge.append(hashes)
            tlog.write_tiles(conn, writes)
            body = checkpoint.Checkpoint(ORIGIN, edge.size, edge.root()).body()
            signed = note.sign_note(body, [LOG_KEY])
            conn.execute(
                "INSERT INTO log_checkpoint (size, seq, first_index, first_rowid, last_rowid,"
                " root, note, created_ms, committed_ms) VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?)",
                (
                    edge.size,
                    b,
                    first_index,
                    rowids[0],
                    rowids[-1],
                    edge.root(),
                    signed.serialise(),
                    1 if b < committed else None,
                ),
            )
            for i, w in enumerate(WITNESSES):
                line = w.signature(body, 1_790_000_000).line().rstrip("\n")
                conn.execute(
                    "INSERT INTO log_cosignature (size, node_id, line, received_ms)"
                    " VALUES (?, ?, ?, 0)",
                    (edge.size, f"ledger-{i + 1}", line),
                )

    spool.write(op).result()


def read(spool: Spool, mark: int, limit: int = receipts.CHUNK) -> receipts.Chunk | None:
    return spool.read(lambda c: receipts.load_chunk(c, mark, SPECS, limit)).result()


def test_receipts_of_opted_in_profiles_verify_against_the_latest_committed_checkpoint(
    spool: Spool,
) -> None:
    tracker, meter = "lte-m-tracker@1", "nbiot-meter@1"
    add_batches(
        spool,
        [
            [("trk-1", tracker), ("m-1", meter), ("trk-2", tracker)],
            [("trk-1", tracker)] * 5,
            [("trk-3", tracker)] * 2,
        ],
        committed=2,
    )
    assert read(spool, 8) is None  # the third batch is not committed
    chunk = read(spool, 0)
    assert chunk is not None and (chunk.start, chunk.end, chunk.size) == (0, 3, 8)
    assert [o.topic for o in chunk.receipts] == ["receipts/trk-1", "receipts/trk-2"]
    for o in chunk.receipts:
        v = device_verifier.verify_receipt(o.payload, TRUST)
        assert v.size == 8 and len(v.cosigned_by) == 3
        assert len(o.payload) <= receipt.max_size(8, witnesses=3)
    # At most `limit` leaves, and never across a batch.
    small = read(spool, 3, limit=2)
    assert small is not None and (small.start, small.end) == (3, 5)
    rest = read(spool, 5)
    assert rest is not None and (rest.start, rest.end) == (5, 8) and len(rest.receipts) == 3
    indexes = [device_verifier.parse_receipt(o.payload).index for o in rest.receipts]
    assert indexes == [5, 6, 7]


def test_pruned_transactions_are_skipped_and_counted(spool: Spool) -> None:
    add_batches(spool, [[("trk-1", "lte-m-tracker@1")] * 4, [("trk-2", "lte-m-tracker@1")]], 2)
    spool.write(lambda c: c.execute("DELETE FROM tx WHERE rowid <= 4")).result()
    chunk = read(spool, 0)
    assert chunk is not None and chunk.receipts == [] and chunk.skipped == {"pruned": 4}
    after = read(spool, chunk.end)
    assert after is not None and [o.topic for o in after.receipts] == ["receipts/trk-2"]


def test_the_mark_is_kept_in_the_spool(spool: Spool) -> None:
    assert spool.read(receipts.read_mark).result() is None
    spool.write(lambda c: receipts.write_mark(c, 42)).result()
    spool.write(lambda c: receipts.write_mark(c, 43)).result()
    assert spool.read(receipts.read_mark).result() == 43
    assert spool.read(receipts.committed_size).result() == 0
