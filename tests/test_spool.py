"""The spool on a real SQLite file: durability rules, dedup, batches (the log's
checkpoints) and their cosignatures."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.common.errors import SpoolError, SpoolIntegrityError
from gateway.edge import spool as spoolmod
from gateway.edge.batcher import decide_cut
from gateway.edge.config import BatchConfig, SpoolConfig
from gateway.edge.spool import (
    Incoming,
    NewlyCommitted,
    Outcome,
    PendingTx,
    RejectRecord,
    Spool,
    StoredCheckpoint,
    prune,
)


def batch(
    seq: int, first_rowid: int, last_rowid: int, committed_ms: int | None = None
) -> StoredCheckpoint:
    """Batch `seq` over spool rowids first..last, the log's leaves [first - 1, last) when
    every row since the first is batched (as in these tests)."""
    return StoredCheckpoint(
        last_rowid,
        seq,
        first_rowid - 1,
        first_rowid,
        last_rowid,
        bytes(32),
        b"note",
        0,
        committed_ms,
    )


def store(spool: Spool, b: StoredCheckpoint) -> None:
    spool.write(lambda c: Spool.w_store_checkpoint(c, b, [])).result()


def cfg(path: Path) -> SpoolConfig:
    return SpoolConfig(
        path=path,
        group_commit_max=1000,
        group_commit_wait_ms=0,
        max_depth=1000,
        min_free_bytes=0,
        max_pending_age_s=600,
        retention_batches=0,
    )


def tx(device: str, seq: int, content: bytes = b"x") -> Incoming:
    leaf = device.encode() + seq.to_bytes(8, "big") + content
    return Incoming(
        device_id=device,
        device_seq=seq,
        payload_sha256=hashlib.sha256(content).digest(),
        tx_id=hashlib.sha256(b"\x00" + leaf).digest(),
        leaf=leaf,
        received_ms=1_700_000_000_000 + seq,
    )


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(cfg(tmp_path / "spool.db"), "gw-1")
    s.open()
    yield s
    s.close()


def test_wal_and_full_sync_are_on(spool: Spool) -> None:
    mode = spool.read(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0]).result()
    assert mode == "wal"
    assert spool.write(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]).result() == 2


def test_same_content_is_a_duplicate_other_content_a_conflict(spool: Spool) -> None:
    first = spool.append(tx("d1", 1, b"a")).result()
    again = spool.append(tx("d1", 1, b"a")).result()
    other = spool.append(tx("d1", 1, b"b")).result()
    assert first.outcome is Outcome.STORED
    assert again.outcome is Outcome.DUPLICATE and again.tx_id == first.tx_id
    assert other.outcome is Outcome.CONFLICT
    assert spool.read(lambda c: c.execute("SELECT count(*) FROM tx").fetchone()[0]).result() == 1


def test_a_group_commit_resolves_every_future_after_commit(spool: Spool) -> None:
    futures = [spool.append(tx(f"d{i % 7}", i)) for i in range(500)]
    assert all(f.result(10).outcome is Outcome.STORED for f in futures)
    assert spool.stored == 500 and spool.max_rowid == 500
    last = spool.read(
        lambda c: c.execute("SELECT last_seq FROM device WHERE device_id='d0'")
    ).result()
    assert last.fetchone()[0] == 497


def test_rejects_are_recorded_for_the_dead_letter_topic(spool: Spool) -> None:
    r = spool.append(RejectRecord("not_decodable", "d1", "devices/rejected/d1", b"{}", 1)).result()
    assert r.outcome is Outcome.REJECT_RECORDED and r.reject_id == 1
    rows = spool.read(lambda c: Spool.q_unpublished_rejects(c, 10)).result()
    assert rows == [(1, "devices/rejected/d1", b"{}")]
    spool.write(lambda c: Spool.w_mark_published(c, [1])).result()
    assert spool.read(lambda c: Spool.q_unpublished_rejects(c, 10)).result() == []


def test_batches_must_come_in_order_and_not_overlap(spool: Spool) -> None:
    for i in range(10):
        spool.append(tx("d", i)).result()

    store(spool, batch(0, 1, 5))
    with pytest.raises(SpoolError, match="out of order"):
        store(spool, batch(2, 6, 10))
    with pytest.raises(SpoolError, match="overlaps"):
        overlap = StoredCheckpoint(10, 1, 5, 5, 10, bytes(32), b"note", 0, None)
        store(spool, overlap)
    with pytest.raises(SpoolError, match="starts the log at 4"):
        store(spool, StoredCheckpoint(10, 1, 4, 6, 10, bytes(32), b"note", 0, None))
    store(spool, batch(1, 6, 10))
    found = spool.read(lambda c: Spool.q_leaf_index(c, 6)).result()
    assert found is not None and found[0] == 5 and found[1].seq == 1
    assert found[1].tx_count == 5
    assert spool.read(lambda c: Spool.q_pending(c, 10, 100)).result() == []
    assert spool.read(Spool.q_last_committed_seq).result() == -1

    # A quorum of 2 distinct nodes cosigning a checkpoint commits it and every batch it
    # covers, at the second cosignature, not the first.
    assert spool.write(lambda c: Spool.w_store_cosignature(c, 10, "n1", "l1", 2)).result() == (
        NewlyCommitted()
    )
    again = spool.write(lambda c: Spool.w_store_cosignature(c, 10, "n1", "l1", 2)).result()
    assert again.batches == 0
    new = spool.write(lambda c: Spool.w_store_cosignature(c, 10, "n2", "l2", 2)).result()
    assert (new.batches, new.last_seq, len(new.received_ms)) == (2, 1, 10)
    assert spool.read(Spool.q_last_committed_seq).result() == 1
    assert spool.read(lambda c: Spool.q_committed(c, 5)).result()
    view = "SELECT seq, tx_count, committed_ms IS NOT NULL FROM batch ORDER BY seq"
    assert spool.read(lambda c: c.execute(view).fetchall()).result() == [(0, 5, 1), (1, 5, 1)]
    last = spool.read(Spool.q_last_committed_checkpoint).result()
    assert last is not None and last.size == 10
    lines = spool.read(lambda c: Spool.q_cosignatures(c, 10)).result()
    assert lines == [("n1", "l1"), ("n2", "l2")]


def test_spool_of_another_gateway_is_refused(tmp_path: Path) -> None:
    s = Spool(cfg(tmp_path / "s.db"), "gw-1")
    s.open()
    s.close()
    with pytest.raises(SpoolError, match="belongs to gateway 'gw-1'"):
        Spool(cfg(tmp_path / "s.db"), "gw-2").open()


def test_corrupt_spool_stops_the_start_and_is_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    s = Spool(cfg(path), "gw-1")
    s.open()
    for i in range(2000):
        s.append(tx("d", i, os.urandom(64)))
    s.append(tx("d", 99999)).result()
    s.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = bytearray(path.read_bytes())
    for off in range(8192, min(len(data), 40960), 97):  # scribble over b-tree pages
        data[off] ^= 0xA5
    path.write_bytes(bytes(data))
    before = path.read_bytes()
    with pytest.raises(SpoolIntegrityError, match="left untouched"):
        Spool(cfg(path), "gw-1").open()
    assert path.read_bytes() == before


def test_unwritable_spool_directory_is_a_clear_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root writes anywhere; a read-only bind is what stops it on a real box.
        target = Path("/proc/edge-gateway-spool/s.db")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = ro / "s.db"
    with pytest.raises(SpoolError, match=r"spool\.path directory"):
        Spool(cfg(target), "gw-1").open()


def test_cut_rule_count_bytes_age_and_flush() -> None:
    c = BatchConfig(max_tx=3, max_bytes=1000, max_age_s=1.0)
    rows = [PendingTx(i, b"", 100, 1000) for i in range(1, 6)]
    assert decide_cut(rows, c, now=1000).count == 3
    assert decide_cut(rows[:2], c, now=1500).reason == "waiting"
    assert decide_cut(rows[:2], c, now=2000).count == 2
    assert decide_cut(rows[:2], c, now=1500, force=True).count == 2
    big = [PendingTx(i, b"", 600, 1000) for i in range(1, 4)]
    assert decide_cut(big, c, now=1000) == decide_cut(big[:2], c, now=1000)
    assert decide_cut(big, c, now=1000).count == 1  # the second would pass max_bytes
    huge = [PendingTx(1, b"", 5000, 1000)]
    assert decide_cut(huge, c, now=1000).count == 1  # one oversize tx still makes a batch
    assert decide_cut([], c, now=99999).count == 0


def test_retention_prunes_old_batches_and_refuses_their_seqs(tmp_path: Path) -> None:
    s = Spool(cfg(tmp_path / "s.db"), "gw-1")
    s.open()
    for i in range(1, 101):
        s.append(tx("d", i)).result()
    for seq in range(10):
        first, last = seq * 10 + 1, seq * 10 + 10
        store(s, batch(seq, first, last, committed_ms=1))
    assert prune(s, keep_from_seq=5) == 5
    assert prune(s, keep_from_seq=5) == 0  # their transactions are gone already
    assert s.read(lambda c: c.execute("SELECT min(rowid) FROM tx").fetchone()[0]).result() == 51
    # The log's checkpoints outlive their transactions: the log's history stays whole.
    assert s.read(lambda c: c.execute("SELECT min(seq) FROM batch").fetchone()[0]).result() == 0
    assert s.append(tx("d", 50)).result().outcome is Outcome.BEYOND_RETENTION
    assert s.append(tx("d", 51)).result().outcome is Outcome.DUPLICATE
    assert s.append(tx("d", 101)).result().outcome is Outcome.STORED
    s.close()
    again = Spool(cfg(tmp_path / "s.db"), "gw-1")
    again.open()
    assert again.append(tx("d", 7)).result().outcome is Outcome.BEYOND_RETENTION
    assert again.read(Spool.q_last_checkpoint).result().seq == 9  # type: ignore[union-attr]
    assert prune(again, keep_from_seq=7) == 2
    again.close()


def test_a_second_writer_refuses_seqs_another_process_pruned(tmp_path: Path) -> None:
    """Intake processes write the spool the gateway prunes: a writer opened before the
    prune (its in-memory watermarks stale) still refuses the pruned seqs."""
    s = Spool(cfg(tmp_path / "s.db"), "gw-1", write_priority=True)
    s.open()
    other = Spool(cfg(tmp_path / "s.db"), "gw-1")
    other.open(check_integrity=False)
    for i in range(1, 21):
        other.append(tx("d", i)).result()
    for seq in range(2):
        store(s, batch(seq, seq * 10 + 1, seq * 10 + 10, committed_ms=1))
    assert prune(s, keep_from_seq=1) == 1
    # Alone (slow path) and in a group of new transactions (executemany path).
    assert other.append(tx("d", 3)).result().outcome is Outcome.BEYOND_RETENTION
    futs = [other.append(tx("d", 5)), other.append(tx("d", 21)), other.append(tx("d", 22))]
    outcomes = [f.result().outcome for f in futs]
    assert outcomes == [Outcome.BEYOND_RETENTION, Outcome.STORED, Outcome.STORED]
    assert other.append(tx("d", 11)).result().outcome is Outcome.DUPLICATE
    q = "SELECT count(*) FROM tx WHERE device_seq = 3"
    assert s.read(lambda c: c.execute(q).fetchone()[0]).result() == 0
    other.close(checkpoint=False)
    s.close()


def _with_tx_id(item: Incoming, tx_id: bytes) -> Incoming:
    return Incoming(
        item.device_id, item.device_seq, item.payload_sha256, tx_id, item.leaf, item.received_ms
    )


def test_a_transaction_is_found_by_tx_id_before_and_after_its_batch(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows not keyed yet through the tail scan, keyed ones through tx_key (keyed when a
    batch brings TX_KEY_CHUNK_ROWS of them); two tx_ids sharing their first 8 bytes (one
    key) are told apart by the full tx_id."""
    monkeypatch.setattr(spoolmod, "TX_KEY_CHUNK_ROWS", 6)
    items = [tx("d", i) for i in range(1, 9)]
    twin = _with_tx_id(tx("e", 1), items[2].tx_id[:8] + bytes(24))
    for item in [*items, twin]:
        assert spool.append(item).result().outcome is Outcome.STORED
    count_keys = "SELECT count(*) FROM tx_key"

    def find(tx_id: bytes) -> int | None:
        rec = spool.read(lambda c: Spool.q_tx(c, tx_id)).result()
        return None if rec is None else rec.rowid

    assert [find(i.tx_id) for i in items] == list(range(1, 9))
    assert find(twin.tx_id) == 9
    store(spool, batch(0, 1, 4))
    assert spool.read(lambda c: c.execute(count_keys).fetchone()[0]).result() == 0
    store(spool, batch(1, 5, 9))
    assert spool.read(lambda c: c.execute(count_keys).fetchone()[0]).result() == 9
    assert [find(i.tx_id) for i in items] == list(range(1, 9))
    assert find(twin.tx_id) == 9
    assert find(items[2].tx_id[:8] + b"\xff" * 24) is None
    # A row after the batch is found in the tail again.
    late = tx("d", 9)
    spool.append(late).result()
    assert find(late.tx_id) == 10
    # Pruning a batch takes its keys with it.
    spool.write(lambda c: c.execute("UPDATE log_checkpoint SET committed_ms = 1")).result()
    store(spool, batch(2, 10, 10, committed_ms=1))
    assert prune(spool, keep_from_seq=1) == 1
    assert spool.read(lambda c: c.execute(count_keys).fetchone()[0]).result() == 5
    assert find(items[0].tx_id) is None and find(twin.tx_id) == 9 and find(late.tx_id) == 10


def test_a_spool_with_the_tx_id_index_is_converted_at_open(tmp_path: Path) -> None:
    """A spool written before tx_key (an index on tx (tx_id), no tx_key table) gets its
    rows keyed and the index dropped when it is opened."""
    path = tmp_path / "s.db"
    s = Spool(cfg(path), "gw-1")
    s.open()
    items = [tx("d", i) for i in range(1, 11)]
    for item in items:
        s.append(item).result()
    store(s, batch(0, 1, 6))
    s.close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE tx_key")
    conn.execute("DELETE FROM meta WHERE key = 'tx_keyed_upto'")
    conn.execute("CREATE INDEX tx_by_id ON tx (tx_id)")
    conn.commit()
    conn.close()
    again = Spool(cfg(path), "gw-1")
    again.open()
    q = "SELECT count(*) FROM sqlite_master WHERE name = 'tx_by_id'"
    assert again.read(lambda c: c.execute(q).fetchone()[0]).result() == 0
    keyed = again.read(lambda c: c.execute("SELECT count(*) FROM tx_key").fetchone()[0]).result()
    assert keyed == 10
    rowids = [again.read(lambda c, i=i: Spool.q_tx(c, i.tx_id)).result() for i in items]
    assert [r.rowid if r else None for r in rowids] == list(range(1, 11))
    again.close()


def _pairs_twice(s: Spool) -> int:
    q = "SELECT count(*) FROM (SELECT 1 FROM tx GROUP BY device_id, device_seq HAVING count(*) > 1)"
    return int(s.read(lambda c: c.execute(q).fetchone()[0]).result())


def _count(s: Spool, table: str) -> int:
    return int(s.read(lambda c: c.execute(f"SELECT count(*) FROM {table}").fetchone()[0]).result())


def test_redeliveries_are_found_in_the_tail_in_tx_dev_and_after_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(device, seq) is stored once whether its first copy is in the unkeyed tail, keyed in
    tx_dev, arrived out of order, or was stored before the writer restarted."""
    monkeypatch.setattr(spoolmod, "DEV_KEY_CHUNK_ROWS", 8)
    path = tmp_path / "s.db"
    s = Spool(cfg(path), "gw-1")
    s.open()
    first = [s.append(tx(f"d{i % 3}", 10 + i)) for i in range(20)]
    assert all(f.result().outcome is Outcome.STORED for f in first)
    assert _count(s, "tx_dev") >= 16  # keyed in chunks of at least 8
    # Out of order: a seq below its device's highest, never stored, is new.
    assert s.append(tx("d0", 1)).result().outcome is Outcome.STORED
    group = [s.append(tx(f"d{i % 3}", 10 + i)) for i in range(20)]
    group += [s.append(tx("d0", 1)), s.append(tx("d0", 1, b"other"))]
    outcomes = [f.result().outcome for f in group]
    assert outcomes == [Outcome.DUPLICATE] * 21 + [Outcome.CONFLICT]
    assert [f.result().tx_id for f in group[:20]] == [f.result().tx_id for f in first]
    # Twice within one group: the second is a duplicate of the first.
    same = [s.append(tx("d9", 5)), s.append(tx("d9", 5))]
    assert [f.result().outcome for f in same] == [Outcome.STORED, Outcome.DUPLICATE]
    s.close()
    again = Spool(cfg(path), "gw-1")
    again.open()
    redo = [again.append(tx(f"d{i % 3}", 10 + i)) for i in range(20)]
    redo += [again.append(tx("d0", 1)), again.append(tx("d9", 5))]
    assert all(f.result().outcome is Outcome.DUPLICATE for f in redo)
    assert again.append(tx("d0", 2)).result().outcome is Outcome.STORED
    assert _count(again, "tx") == 23 and _pairs_twice(again) == 0
    again.close()


def test_two_writers_see_each_others_transactions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway and an intake process write one spool: what one stored, the other
    answers as a duplicate, in its tail and once the other keyed it."""
    monkeypatch.setattr(spoolmod, "DEV_KEY_CHUNK_ROWS", 4)
    a = Spool(cfg(tmp_path / "s.db"), "gw-1", write_priority=True)
    a.open()
    b = Spool(cfg(tmp_path / "s.db"), "gw-1")
    b.open(check_integrity=False)
    assert b.append(tx("d", 5)).result().outcome is Outcome.STORED
    assert a.append(tx("d", 5)).result().outcome is Outcome.DUPLICATE  # b's tail
    assert a.append(tx("d", 3)).result().outcome is Outcome.STORED  # below b's highest
    assert b.append(tx("d", 3)).result().outcome is Outcome.DUPLICATE
    for seq in range(6, 16):  # b keys them (and a's) in tx_dev
        assert b.append(tx("d", seq)).result().outcome is Outcome.STORED
    assert _count(a, "tx_dev") >= 8
    for seq in (3, 5, 6, 10, 15):
        assert a.append(tx("d", seq)).result().outcome is Outcome.DUPLICATE
    assert a.append(tx("d", 4)).result().outcome is Outcome.STORED
    assert b.append(tx("d", 4)).result().outcome is Outcome.DUPLICATE
    assert _pairs_twice(a) == 0 and _count(a, "tx") == 13
    b.close(checkpoint=False)
    a.close()


# Schema 3's tx table: the unique index this schema replaced with tx_dev.
SCHEMA_3_TX = """
CREATE TABLE tx (
    rowid INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    device_seq INTEGER NOT NULL,
    payload_sha256 BLOB NOT NULL,
    tx_id BLOB NOT NULL,
    leaf BLOB NOT NULL,
    size INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    UNIQUE (device_id, device_seq)
);
"""


def test_a_spool_of_schema_3_is_converted_at_open(tmp_path: Path) -> None:
    """Schema 3 kept a unique index on tx (device_id, device_seq): opening it rebuilds tx
    without it (rowids, AUTOINCREMENT's counter and the retention trigger kept) and keys
    every row in tx_dev; its transactions are still found as duplicates."""
    path = tmp_path / "s.db"
    s = Spool(cfg(path), "gw-1")
    s.open()
    items = [tx(f"d{i % 4}", i) for i in range(1, 41)]
    for item in items:
        s.append(item).result()
    store(s, batch(0, 1, 10, committed_ms=1))
    store(s, batch(1, 11, 20, committed_ms=1))
    s.close()
    conn = sqlite3.connect(path)
    rows = conn.execute("SELECT * FROM tx ORDER BY rowid").fetchall()
    conn.executescript(
        "DROP TABLE tx; DROP TABLE tx_dev; DELETE FROM meta WHERE key = 'dev_keyed_upto';"
        + SCHEMA_3_TX
        + "UPDATE meta SET value = '3' WHERE key = 'schema_version';"
    )
    conn.executemany(f"INSERT INTO tx VALUES ({', '.join('?' * 8)})", rows[:-2])
    conn.execute("UPDATE sqlite_sequence SET seq = 40 WHERE name = 'tx'")  # two rows gone
    conn.commit()
    conn.close()
    again = Spool(cfg(path), "gw-1")
    again.open()
    assert again.read(lambda c: c.execute("SELECT * FROM tx").fetchall()).result() == (rows[:-2])
    q = "SELECT count(*) FROM sqlite_master WHERE name LIKE 'sqlite_autoindex_tx%'"
    assert again.read(lambda c: c.execute(q).fetchone()[0]).result() == 0
    meta = "SELECT value FROM meta WHERE key = 'schema_version'"
    assert again.read(lambda c: c.execute(meta).fetchone()[0]).result() == "4"
    assert _count(again, "tx_dev") == 38
    assert all(again.append(i).result().outcome is Outcome.DUPLICATE for i in items[:38])
    assert again.append(items[38]).result().outcome is Outcome.STORED
    assert again.max_rowid == 41  # after AUTOINCREMENT's 40, not the 38 rows left
    # The retention trigger came back with the table: a seq pruned here is refused.
    assert prune(again, keep_from_seq=1) == 1
    assert again.append(tx("d1", 1, b"again")).result().outcome is Outcome.BEYOND_RETENTION
    assert _count(again, "tx_dev") == 28  # the 10 pruned rows went; the new one is in the tail
    again.close()
