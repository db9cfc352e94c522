"""The gateway's append-only log in the spool: one RFC 9162 tree over every stored
transaction.

Leaf i is the i-th transaction in spool order (its leaf hash is its tx_id). The tree's
interior is kept as tiles (gateway.formats.logtree) in the spool's `log_tile` table,
written by the main process when a batch is cut, in the same spool transaction as the
batch and its checkpoint.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from gateway.formats.logtree import (
    LogEdge,
    LogStateError,
    TileFetch,
    TileReader,
    TileWrite,
    load_edge,
)

__all__ = [
    "LogEdge",
    "LogStateError",
    "TileFetch",
    "TileReader",
    "TileWrite",
    "load_edge",
    "sqlite_fetch",
    "write_tiles",
]


def sqlite_fetch(conn: sqlite3.Connection) -> TileFetch:
    """Tiles from the spool's log_tile table."""

    def fetch(level: int, index: int) -> bytes | None:
        row = conn.execute(
            "SELECT data FROM log_tile WHERE level = ? AND idx = ?", (level, index)
        ).fetchone()
        return None if row is None else bytes(row[0])

    return fetch


def write_tiles(conn: sqlite3.Connection, writes: Sequence[TileWrite]) -> None:
    """Store tiles (a partial tile is replaced by its wider self); inside the caller's
    transaction."""
    conn.executemany(
        "INSERT INTO log_tile (level, idx, data) VALUES (?, ?, ?)"
        " ON CONFLICT (level, idx) DO UPDATE SET data = excluded.data"
        " WHERE length(excluded.data) > length(data)",
        [(w.level, w.index, w.data) for w in writes],
    )
