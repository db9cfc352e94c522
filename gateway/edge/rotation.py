"""Rotation of the log's key: which HSM keys sign the next checkpoint (a batch's signature).

`edge-gateway hsm rotate` creates the new key on the token and leaves a request in the
spool's meta table (`log_key_request`); the service picks it up at start or on SIGHUP,
appends the rotation entry (gateway.formats.keyrotation) to the spool as a transaction,
and the batcher moves the state (`log_keys`, written only by the batcher, in the spool
transaction of the checkpoint it concerns) through its stages:

    spooled   the entry waits in the spool; checkpoints: the old key
    overlap   a checkpoint signed by the old key covered the entry; checkpoints carry
              the old and the new signature, for the overlap's checkpoints and seconds
    done      the new key alone; the old key is retired on the token (CKA_SIGN false)

The pure part (`plan`, `after_checkpoint`) decides; the batcher and the service act.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, replace

from gateway.common.errors import GatewayError
from gateway.edge.spool import Spool
from gateway.formats import keyrotation

STATE_KEY = "log_keys"
REQUEST_KEY = "log_key_request"


class RotationError(GatewayError):
    """A rotation that cannot start or go on; str() says why and what to do."""


@dataclass(frozen=True, slots=True)
class TokenKey:
    """A key pair on the token, found by label and CKA_ID."""

    label: str
    cka_id: bytes

    def to_json(self) -> dict[str, str]:
        return {"label": self.label, "cka_id": self.cka_id.hex()}

    @classmethod
    def from_json(cls, d: dict[str, str]) -> TokenKey:
        return cls(str(d["label"]), bytes.fromhex(d["cka_id"]))


@dataclass(frozen=True, slots=True)
class Request:
    """What `hsm rotate` leaves for the service: rotation `number` to the key `new`."""

    number: int
    new: TokenKey
    new_spki: bytes
    created_ms: int

    def to_text(self) -> str:
        return json.dumps(
            {
                "number": self.number,
                "new": self.new.to_json(),
                "new_spki": self.new_spki.hex(),
                "created_ms": self.created_ms,
            },
            sort_keys=True,
        )

    @classmethod
    def from_text(cls, text: str) -> Request:
        d = json.loads(text)
        return cls(
            int(d["number"]),
            TokenKey.from_json(d["new"]),
            bytes.fromhex(d["new_spki"]),
            int(d["created_ms"]),
        )


@dataclass(frozen=True, slots=True)
class Rotation:
    number: int
    old: TokenKey
    new: TokenKey
    entry_tx_id: bytes
    overlap_checkpoints: int
    overlap_seconds: int
    stage: str  # spooled | overlap | done
    entry_size: int | None = None  # the checkpoint that covered the entry
    dual_signed: int = 0  # checkpoints signed by both keys so far
    overlap_started_ms: int | None = None


@dataclass(frozen=True, slots=True)
class KeyState:
    """`active`: the key that signs alone outside an overlap (None: hsm.key_label/key_id);
    `rotation`: the latest rotation."""

    active: TokenKey | None = None
    rotation: Rotation | None = None

    def to_text(self) -> str:
        r = self.rotation
        return json.dumps(
            {
                "active": None if self.active is None else self.active.to_json(),
                "rotation": None
                if r is None
                else {
                    "number": r.number,
                    "old": r.old.to_json(),
                    "new": r.new.to_json(),
                    "entry_tx_id": r.entry_tx_id.hex(),
                    "overlap_checkpoints": r.overlap_checkpoints,
                    "overlap_seconds": r.overlap_seconds,
                    "stage": r.stage,
                    "entry_size": r.entry_size,
                    "dual_signed": r.dual_signed,
                    "overlap_started_ms": r.overlap_started_ms,
                },
            },
            sort_keys=True,
        )

    @classmethod
    def from_text(cls, text: str) -> KeyState:
        d = json.loads(text)
        r = d.get("rotation")
        return cls(
            active=None if d.get("active") is None else TokenKey.from_json(d["active"]),
            rotation=None
            if r is None
            else Rotation(
                number=int(r["number"]),
                old=TokenKey.from_json(r["old"]),
                new=TokenKey.from_json(r["new"]),
                entry_tx_id=bytes.fromhex(r["entry_tx_id"]),
                overlap_checkpoints=int(r["overlap_checkpoints"]),
                overlap_seconds=int(r["overlap_seconds"]),
                stage=str(r["stage"]),
                entry_size=r["entry_size"],
                dual_signed=int(r["dual_signed"]),
                overlap_started_ms=r["overlap_started_ms"],
            ),
        )

    def in_progress(self) -> bool:
        return self.rotation is not None and self.rotation.stage != "done"

    def next_number(self) -> int:
        return 1 if self.rotation is None else self.rotation.number + 1


@dataclass(frozen=True, slots=True)
class Plan:
    """Keys for the next batch: its checkpoint's signers, in order. None stands for the
    configured key."""

    checkpoint: tuple[TokenKey | None, ...]


def plan(state: KeyState) -> Plan:
    r = state.rotation
    if r is None or r.stage == "done":
        return Plan((state.active,))
    old = state.active
    if r.stage == "spooled":
        return Plan((old,))
    return Plan((old, r.new))  # overlap: both keys sign


def after_checkpoint(state: KeyState, tx_ids: Sequence[bytes], size: int, now_ms: int) -> KeyState:
    """The state once the checkpoint of a batch (its leaves' tx_ids, the log's new size)
    is stored."""
    r = state.rotation
    if r is None or r.stage == "done":
        return state
    if r.stage == "spooled":
        if r.entry_tx_id not in tx_ids:
            return state
        r = replace(r, stage="overlap", entry_size=size)
        if r.overlap_checkpoints == 0 and r.overlap_seconds == 0:
            return KeyState(active=r.new, rotation=replace(r, stage="done"))
        return replace(state, rotation=r)
    started = r.overlap_started_ms if r.overlap_started_ms is not None else now_ms
    r = replace(r, dual_signed=r.dual_signed + 1, overlap_started_ms=started)
    if r.dual_signed >= r.overlap_checkpoints and now_ms - started >= r.overlap_seconds * 1000:
        return KeyState(active=r.new, rotation=replace(r, stage="done"))
    return replace(state, rotation=r)


# --- the spool's meta table ---------------------------------------------------------------


def read_state(conn: sqlite3.Connection) -> KeyState:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (STATE_KEY,)).fetchone()
    return KeyState() if row is None else KeyState.from_text(str(row[0]))


def read_request(conn: sqlite3.Connection) -> Request | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (REQUEST_KEY,)).fetchone()
    return None if row is None else Request.from_text(str(row[0]))


def write_state(conn: sqlite3.Connection, state: KeyState) -> None:
    """Inside the caller's transaction. The request stays until a checkpoint covered its
    entry: until then a restart appends the entry again (the same bytes, a duplicate)."""
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (STATE_KEY, state.to_text()),
    )
    r = state.rotation
    if r is not None and r.stage != "spooled":
        req = read_request(conn)
        if req is not None and req.number <= r.number:
            conn.execute("DELETE FROM meta WHERE key = ?", (REQUEST_KEY,))


def entry_size(conn: sqlite3.Connection) -> int | None:
    """The size of the checkpoint that covered the latest rotation entry (None before)."""
    r = read_state(conn).rotation
    return None if r is None else r.entry_size


def first_entry_size_after(conn: sqlite3.Connection, size: int) -> int | None:
    """The size of the first checkpoint beyond `size` that covers a rotation entry (one
    per rotation: the log's transactions under the reserved device id), or None."""
    out: int | None = None
    for rowid in Spool.q_device_rowids(conn, keyrotation.RESERVED_DEVICE):
        row = conn.execute(
            "SELECT size FROM log_checkpoint WHERE last_rowid >= ? ORDER BY last_rowid LIMIT 1",
            (rowid,),
        ).fetchone()
        if row is not None and int(row[0]) > size and (out is None or int(row[0]) < out):
            out = int(row[0])
    # The latest rotation's, should retention have pruned its entry from the spool.
    latest = entry_size(conn)
    if latest is not None and latest > size and (out is None or latest < out):
        out = latest
    return out


def write_request(conn: sqlite3.Connection, req: Request) -> None:
    """`hsm rotate`'s request, refused while another rotation is under way."""
    state = read_state(conn)
    if state.in_progress():
        r = state.rotation
        assert r is not None
        raise RotationError(
            f"key rotation {r.number} is still under way (stage {r.stage}): wait until its "
            "overlap ends (edge-gateway hsm info shows it) before rotating again"
        )
    pending = read_request(conn)
    if pending is not None and pending.number != req.number:
        raise RotationError(
            f"key rotation {pending.number} is waiting for the service to take it up: "
            "systemctl reload edge-gateway"
        )
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (REQUEST_KEY, req.to_text()),
    )
