"""The export for auditors: a directory, written from the spool, from which anyone can check
the gateway's log with nothing else (gateway.formats.auditdir reads it).

    DIR/checkpoint                   the latest committed checkpoint, cosignatures appended
    DIR/gateway.pem                  the log's public key(s): those given, and each key a key
                                     rotation entry of the exported log introduces
    DIR/witnesses/<node id>.vkey     each ledger node's cosignature vkey, one line
    DIR/checkpoints/<tree size>      every committed checkpoint exported, cosignatures appended
    DIR/consistency/<old>-<new>.txt  RFC 9162 consistency proof between successive ones
    DIR/proofs/<tx_id>.tlog-proof    c2sp.org/tlog-proof@v1 bundles against DIR/checkpoint for
    DIR/leaves/<tx_id>.bin           a sample of transactions and every key rotation entry,
                                     and their leaf bytes

The spool is read through a read-only connection inside one read transaction (a WAL
snapshot), so the export is safe beside the running service and consistent with itself;
nothing is ever written to the spool. Each file is written to a temporary name beside it
and renamed, so a reader never sees half a file; DIR/checkpoint is written last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.common.errors import (
    EXIT_DATAERR,
    EXIT_USAGE,
    ConfigError,
    GatewayError,
    OutputFileError,
    SpoolError,
)
from gateway.edge import spool as spool_mod
from gateway.edge import tlog
from gateway.edge.spool import Spool, StoredCheckpoint
from gateway.formats import checkpoint, cosignature, keyrotation, merkle, note, tlogproof

DEFAULT_SAMPLE = 100
MAX_SAMPLE = 1_000_000
# What DIR holds: only these are replaced (or cleared) by --force; anything else is left.
ENTRIES = (
    "checkpoint",
    "gateway.pem",
    "witnesses",
    "checkpoints",
    "consistency",
    "proofs",
    "leaves",
)
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}", re.ASCII)
_PAGE = 1000  # checkpoints read per query
_CHECKPOINT_COLS = ", ".join(f.name for f in dataclasses.fields(StoredCheckpoint))


class ExportError(GatewayError):
    """The spool does not hold what an export needs, or not as this configuration says."""

    exit_code = EXIT_DATAERR


class ExportUsage(GatewayError):
    """An argument out of range."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True, slots=True)
class ExportResult:
    directory: Path
    origin: str
    latest_size: int
    checkpoints: int
    consistency_proofs: int
    proofs: int
    witnesses: int

    def line(self) -> str:
        return (
            f"exported {self.directory}: {self.origin}: {self.checkpoints} committed checkpoints "
            f"up to size {self.latest_size}, {self.consistency_proofs} consistency proofs, "
            f"{self.proofs} inclusion proofs, {self.witnesses} witnesses; check it with "
            f"`python -m gateway.formats.auditdir {self.directory}`"
        )


def sample_indices(lo: int, hi: int, n: int) -> list[int]:
    """`n` leaf indices of [lo, hi) spread over it: the first, the last and evenly between;
    all of them when there are no more than `n`."""
    count = hi - lo
    if count <= 0 or n <= 0:
        return []
    if count <= n:
        return list(range(lo, hi))
    if n == 1:
        return [hi - 1]
    return [lo + (k * (count - 1)) // (n - 1) for k in range(n)]


def check_arguments(sample: int, since: int) -> None:
    if not 0 <= sample <= MAX_SAMPLE:
        raise ExportUsage(f"--sample {sample}: expected 0 to {MAX_SAMPLE}")
    if since < 0:
        raise ExportUsage(f"--since {since}: expected a tree size, 0 or more")


def check_out_dir(out: Path, force: bool) -> None:
    """The export directory must be empty or new, unless `force`."""
    if out.exists() and not out.is_dir():
        raise OutputFileError(f"--out {out} exists and is not a directory: choose another path")
    if out.is_dir() and not force:
        try:
            busy = next(iter(out.iterdir()), None) is not None
        except OSError as e:
            raise OutputFileError(f"--out {out} cannot be read: {e.strerror or e}") from None
        if busy:
            raise OutputFileError(
                f"--out {out} is not empty: choose an empty directory, or pass --force to "
                "replace an earlier export in it"
            )


def export(
    spool_path: Path,
    out: Path,
    *,
    gateway_id: str,
    origin: str,
    public_pems: Sequence[bytes],
    witnesses: Mapping[str, str],
    sample: int = DEFAULT_SAMPLE,
    since: int = 0,
    force: bool = False,
) -> ExportResult:
    """Write the export of the log in `spool_path` to `out`. `witnesses` maps ledger node
    id to cosignature vkey; `since` leaves out checkpoints of smaller trees."""
    check_arguments(sample, since)
    public_pems = _each_key(public_pems)
    keys = _log_keys(public_pems, origin)
    vkeys = _witness_vkeys(witnesses)
    check_out_dir(out, force)
    with _read_only(spool_path) as conn:
        try:
            return _write(
                conn,
                spool_path,
                out,
                gateway_id,
                origin,
                public_pems,
                keys,
                vkeys,
                sample,
                since,
                force,
            )
        except (tlog.LogStateError, tlogproof.ProofError) as e:
            raise ExportError(
                f"spool {spool_path}: the log's tiles do not give its checkpoints ({e}): "
                "the spool is damaged; keep it for analysis"
            ) from None


def _write(
    conn: sqlite3.Connection,
    spool_path: Path,
    out: Path,
    gateway_id: str,
    origin: str,
    public_pems: Sequence[bytes],
    keys: Sequence[note.EcdsaVerifier],
    vkeys: Mapping[str, str],
    sample: int,
    since: int,
    force: bool,
) -> ExportResult:
    _check_spool(conn, spool_path, gateway_id)
    latest = Spool.q_last_committed_checkpoint(conn)
    if latest is None:
        raise ExportError(
            f"spool {spool_path} holds no committed checkpoint yet: export once the "
            "ledger nodes have cosigned one (edge-gateway status shows last_committed_seq)"
        )
    if since > latest.size:
        raise ExportError(
            f"--since {since} is beyond the latest committed checkpoint (size {latest.size})"
        )
    latest_note = _cosigned(conn, latest)
    rotations = _rotation_entries(conn, origin, latest.size)
    for entry in rotations.values():
        pem = serialization.load_der_public_key(entry.new_spki).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        public_pems = [*public_pems, pem]
        keys = [*keys, entry.verifier()]
    _check_signed(latest_note, keys, origin)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputFileError(f"--out {out} cannot be created: {e.strerror or e}") from None
    w = _Writer(out, force)
    pems = dict.fromkeys(p if p.endswith(b"\n") else p + b"\n" for p in public_pems)
    w.put("gateway.pem", b"".join(pems))
    for name, vkey in vkeys.items():
        w.put(f"witnesses/{name}.vkey", (vkey + "\n").encode())
    fetch = tlog.sqlite_fetch(conn)
    n_cps = n_cons = 0
    prev: StoredCheckpoint | None = None
    for cp in _committed_checkpoints(conn, since, latest.size):
        w.put(f"checkpoints/{cp.size}", _cosigned(conn, cp))
        n_cps += 1
        if prev is not None:
            proof = tlog.TileReader(cp.size, fetch).consistency_proof(prev.size)
            if not merkle.verify_consistency(prev.size, cp.size, proof, prev.root, cp.root):
                raise ExportError(
                    f"spool {spool_path}: checkpoints {prev.size} and {cp.size} are not "
                    "consistent by the stored tiles: the spool is damaged; keep it for analysis"
                )
            w.put(
                f"consistency/{prev.size}-{cp.size}.txt",
                "".join(note.b64encode(h) + "\n" for h in proof).encode(),
            )
            n_cons += 1
        prev = cp
    reader = tlog.TileReader(latest.size, fetch)
    n_proofs = 0
    indices = sample_indices(_first_held_index(conn), latest.size, sample)
    for index in sorted(set(indices) | set(rotations)):
        found = _leaf_at(conn, index)
        if found is None:
            continue  # not held: retention prunes whole batches, oldest first
        tx_id, leaf = found
        if merkle.leaf_hash(leaf) != tx_id or reader(0, index) != tx_id:
            raise ExportError(
                f"spool {spool_path}: leaf {index} does not hash to its tx_id "
                f"{tx_id.hex()} in the log: the spool is damaged; keep it for analysis"
            )
        bundle = tlogproof.make_tlog_proof(index, reader, latest_note)
        w.put(f"leaves/{tx_id.hex()}.bin", leaf)
        w.put(f"proofs/{tx_id.hex()}.tlog-proof", bundle.serialise())
        n_proofs += 1
    w.remove_stale()
    w.put("checkpoint", latest_note)
    return ExportResult(out, origin, latest.size, n_cps, n_cons, n_proofs, len(vkeys))


# ---- reading the spool ----------------------------------------------------------------


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection holding one snapshot of the spool for the whole export. The
    spool (and its WAL, if there is one) must be readable by this user: a PermissionError
    names the file (the command line's exit 77)."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    except FileNotFoundError:
        raise SpoolError(
            f"spool.path {path} does not exist: is this the gateway's configuration?"
        ) from None
    with contextlib.suppress(FileNotFoundError):
        os.close(os.open(f"{path}-wal", os.O_RDONLY | os.O_CLOEXEC))
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=30)
    except sqlite3.Error as e:
        raise SpoolError(f"spool {path} cannot be opened read-only: {e}") from None
    try:
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("BEGIN")
        yield conn
    except sqlite3.Error as e:
        raise SpoolError(f"spool {path} cannot be read: {e}") from None
    finally:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("COMMIT")
        conn.close()


def _check_spool(conn: sqlite3.Connection, path: Path, gateway_id: str) -> None:
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError as e:
        raise ExportError(f"spool {path} is not a gateway spool: {e}") from None
    if meta.get("schema_version") != str(spool_mod.SCHEMA_VERSION):
        raise ExportError(
            f"spool {path} has schema {meta.get('schema_version')}, this gateway exports "
            f"{spool_mod.SCHEMA_VERSION} (one append-only log per gateway)"
        )
    if meta.get("gateway_id") != gateway_id:
        raise ExportError(
            f"spool {path} belongs to gateway {meta.get('gateway_id')!r}, not {gateway_id!r}: "
            "use that gateway's configuration"
        )


def _cosigned(conn: sqlite3.Connection, cp: StoredCheckpoint) -> bytes:
    """The signed note with the witnesses' cosignature lines the gateway stored."""
    lines = "".join(line + "\n" for _node, line in Spool.q_cosignatures(conn, cp.size))
    return bytes(cp.note) + lines.encode()


def _committed_checkpoints(
    conn: sqlite3.Connection, since: int, upto: int
) -> Iterator[StoredCheckpoint]:
    """Committed checkpoints of sizes [since, upto], smallest first, a page at a time."""
    after = since - 1
    while True:
        rows = conn.execute(
            f"SELECT {_CHECKPOINT_COLS} FROM log_checkpoint"
            " WHERE committed_ms IS NOT NULL AND size > ? AND size <= ? ORDER BY size LIMIT ?",
            (after, upto, _PAGE),
        ).fetchall()
        for row in rows:
            yield StoredCheckpoint(*row)
        if len(rows) < _PAGE:
            return
        after = int(rows[-1][0])


def _rotation_entries(
    conn: sqlite3.Connection, origin: str, size: int
) -> dict[int, keyrotation.RotationEntry]:
    """Log index -> the key rotation entries of this log among its first `size` leaves
    that the spool still holds: each names a key that signs checkpoints from then on."""
    out: dict[int, keyrotation.RotationEntry] = {}
    for rowid in Spool.q_device_rowids(conn, keyrotation.RESERVED_DEVICE):
        row = conn.execute("SELECT leaf FROM tx WHERE rowid = ?", (rowid,)).fetchone()
        if row is None:
            continue  # pruned meanwhile
        leaf = row[0]
        found = Spool.q_leaf_index(conn, int(rowid))
        if found is None or found[0] >= size:
            break
        try:
            entry = keyrotation.parse_entry(bytes(leaf))
        except keyrotation.RotationEntryError:
            continue  # not an entry: it introduces no key (and is not exported as one)
        if entry.origin == origin:
            out[found[0]] = entry
    return out


def _first_held_index(conn: sqlite3.Connection) -> int:
    """The log index of the oldest transaction retention has kept."""
    row = conn.execute("SELECT min(rowid) FROM tx").fetchone()
    if row is None or row[0] is None:
        return 0
    found = Spool.q_leaf_index(conn, int(row[0]))
    return 0 if found is None else found[0]


def _leaf_at(conn: sqlite3.Connection, index: int) -> tuple[bytes, bytes] | None:
    """(tx_id, leaf bytes) of log leaf `index`, if the spool still holds it."""
    cp = Spool.q_checkpoint_covering_index(conn, index)
    if cp is None:
        return None
    row = conn.execute(
        "SELECT tx_id, leaf FROM tx WHERE rowid BETWEEN ? AND ? ORDER BY rowid LIMIT 1 OFFSET ?",
        (cp.first_rowid, cp.last_rowid, index - cp.first_index),
    ).fetchone()
    return None if row is None else (bytes(row[0]), bytes(row[1]))


# ---- keys -----------------------------------------------------------------------------


def _each_key(pems: Sequence[bytes]) -> list[bytes]:
    """One PEM per key: a file given may hold several (a gateway's keys after a rotation),
    and each must be a key an auditor is told about, not only the file's first."""
    out: list[bytes] = []
    for pem in pems:
        blocks = _PEM_BLOCK.findall(pem)
        if not blocks:
            raise ExportError("the log's public key is not a PEM public key")
        for block in blocks:
            try:
                key = serialization.load_pem_public_key(block)
            except ValueError:
                raise ExportError("the log's public key is not a PEM public key") from None
            # Re-encoded, so the same key given twice (or named by a rotation entry) is
            # written once.
            out.append(
                key.public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
    return out


_PEM_BLOCK = re.compile(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.S)


def _log_keys(pems: Sequence[bytes], origin: str) -> list[note.EcdsaVerifier]:
    if not pems:
        raise ExportError("no public key of the log to export: pass --public-key PEM")
    out = []
    for pem in pems:
        try:
            key = serialization.load_pem_public_key(pem)
        except ValueError:
            raise ExportError("the log's public key is not a PEM public key") from None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ExportError("the log's public key is not an EC key")
        out.append(note.EcdsaVerifier.from_public_key(origin, key))
    return out


def _witness_vkeys(witnesses: Mapping[str, str]) -> dict[str, str]:
    """File name -> vkey; each vkey parsed, so the export never carries one that is not."""
    if not witnesses:
        raise ConfigError(
            "no witness vkeys to export: list each ledger node's vkey in [log] witnesses "
            "(or pass --witness VKEY), since an auditor checks cosignatures against them"
        )
    out: dict[str, str] = {}
    for i, (node_id, vkey) in enumerate(sorted(witnesses.items())):
        try:
            cosignature.parse_cosigner_vkey(vkey)
        except note.NoteError as e:
            raise ConfigError(f"witness {node_id}: not a cosignature vkey ({e.detail})") from None
        name = node_id if _SAFE_NAME.fullmatch(node_id) else f"witness-{i + 1}"
        out[name] = vkey.strip()
    return out


def _check_signed(data: bytes, keys: Sequence[note.EcdsaVerifier], origin: str) -> None:
    """The latest checkpoint must carry a signature of a key exported, under the origin
    the configuration names: an export an auditor cannot verify is refused here."""
    try:
        opened = checkpoint.open_checkpoint(data, keys, origin)
    except note.NoteError as e:
        raise ExportError(
            f"the latest committed checkpoint does not verify under the public key(s) given "
            f"and origin {origin!r} ({e.detail}): export with the gateway's own key"
        ) from None
    if not opened.note.verified:
        raise ExportError("the latest committed checkpoint is not signed by the key(s) given")


# ---- writing the directory ------------------------------------------------------------


class _Writer:
    """Files written atomically (temporary name, then rename) under the export directory;
    with `force`, files of an earlier export that this one did not write are removed."""

    def __init__(self, root: Path, force: bool) -> None:
        self.root = root
        self.force = force
        self.written: set[str] = set()
        self._dirs: set[str] = set()

    def put(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        parent = path.parent
        if str(parent) not in self._dirs:
            self._mkdir(parent)
            self._dirs.add(str(parent))
        tmp = parent / f".{path.name}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise OutputFileError(f"{path} cannot be written: {e.strerror or e}") from None
        self.written.add(rel)

    def _mkdir(self, d: Path) -> None:
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputFileError(f"{d} cannot be created: {e.strerror or e}") from None

    def remove_stale(self) -> None:
        """An earlier export's files that this one did not write (other proofs, older
        checkpoints), so the directory holds one export only."""
        if not self.force:
            return
        for sub in ENTRIES:
            d = self.root / sub
            if not d.is_dir() or d.is_symlink():
                continue
            for p in d.iterdir():
                if p.is_file() and f"{sub}/{p.name}" not in self.written:
                    try:
                        p.unlink()
                    except OSError as e:
                        raise OutputFileError(
                            f"{p} (from an earlier export) cannot be removed: {e.strerror or e}"
                        ) from None
