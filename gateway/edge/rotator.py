"""The service's side of a key rotation: which HSM keys to open at start, and taking up the
request `edge-gateway hsm rotate` left in the spool (at start and on SIGHUP).

Taking it up opens the new key, tells the batcher, then appends the rotation entry
(gateway.formats.keyrotation) to the spool as a transaction; the entry's bytes follow from
the request and the state alone, so a restart before a checkpoint covered it appends the
same bytes again (a duplicate) instead of a second entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from gateway.common.errors import HsmError, SpoolError
from gateway.edge import rotation
from gateway.edge import signer as hsm
from gateway.edge.batcher import Batcher
from gateway.edge.config import GatewayConfig
from gateway.edge.signer import KeyInfo, Signer
from gateway.edge.spool import Incoming, Outcome, Spool, now_ms
from gateway.formats import keyrotation, merkle

log = logging.getLogger("gateway.edge.rotator")


def signer_keys(cfg: GatewayConfig, state: rotation.KeyState) -> list[tuple[str, bytes]]:
    """(label, CKA_ID) of the keys the signer opens: the keys the next checkpoint is
    signed with, in order, and a rotation's new key."""
    default = rotation.TokenKey(cfg.hsm.key_label, cfg.hsm.key_id)
    keys = [k or default for k in rotation.plan(state).checkpoint]
    if state.in_progress():
        assert state.rotation is not None
        keys.append(state.rotation.new)
    out: list[tuple[str, bytes]] = []
    for k in keys:
        if (k.label, k.cka_id) not in out:
            out.append((k.label, k.cka_id))
    return out


def _entry(
    cfg: GatewayConfig,
    req: rotation.Request,
    old_key_id: bytes,
    overlap_checkpoints: int,
    overlap_s: int,
) -> keyrotation.RotationEntry:
    return keyrotation.RotationEntry(
        origin=cfg.log_origin,
        gateway_id=cfg.gateway_id,
        rotation=req.number,
        old_key_id=old_key_id,
        new_spki=req.new_spki,
        overlap_checkpoints=overlap_checkpoints,
        overlap_seconds=overlap_s,
        created_ms=req.created_ms,
    )


async def take_request(cfg: GatewayConfig, spool: Spool, signer: Signer, batcher: Batcher) -> None:
    """Start the rotation `hsm rotate` asked for, if any (idempotent). Errors are logged:
    the log goes on with the keys it has."""
    req = await asyncio.wrap_future(spool.read(rotation.read_request))
    if req is None:
        return
    state = batcher.keys
    r = state.rotation
    if r is not None and r.number >= req.number and r.stage != "spooled":
        return  # taken up already; the batcher removes the request with its next state
    if state.in_progress() and (r is None or r.number != req.number):
        log.warning("key rotation %d waits: rotation %s is under way", req.number, r)
        return
    try:
        info = await asyncio.wrap_future(signer.load_key(req.new.label, req.new.cka_id))
    except HsmError as e:
        log.error("key rotation %d not started: %s", req.number, e)
        return
    spki = serialization.load_pem_public_key(info.public_pem).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if spki != req.new_spki:
        log.error(
            "key rotation %d not started: key %r on the token is not the one hsm rotate "
            "recorded; run edge-gateway hsm rotate again",
            req.number,
            req.new.label,
        )
        return
    if r is not None and r.number == req.number:  # spooled before a restart: same entry
        old = r.old
        terms = (r.overlap_checkpoints, r.overlap_seconds)
    else:
        old = batcher.key(state.active)
        assert cfg.log is not None
        terms = (cfg.log.rotation_overlap_checkpoints, cfg.log.rotation_overlap_s)
    old_info = signer.infos.get(old.cka_id)
    if old_info is None:
        log.error("key rotation %d not started: the old key %r is not held", req.number, old.label)
        return
    entry = _entry(cfg, req, old_info.key_id, *terms)
    leaf = entry.leaf()
    tx_id = merkle.leaf_hash(leaf)
    if r is None or r.number != req.number:
        started = batcher.begin_rotation(
            rotation.Rotation(
                number=req.number,
                old=old,
                new=req.new,
                entry_tx_id=tx_id,
                overlap_checkpoints=terms[0],
                overlap_seconds=terms[1],
                stage="spooled",
            )
        )
        if not started:
            return
    # Before the append: the batcher must know the entry when it cuts the batch holding it.
    res = await asyncio.wrap_future(
        spool.append(
            Incoming(
                device_id=keyrotation.RESERVED_DEVICE,
                device_seq=req.number,
                payload_sha256=hashlib.sha256(entry.fields()).digest(),
                tx_id=tx_id,
                leaf=leaf,
                received_ms=req.created_ms,
            )
        )
    )
    if res.outcome not in (Outcome.STORED, Outcome.DUPLICATE) or res.tx_id != tx_id:
        log.error("key rotation %d: the entry was not spooled (%s)", req.number, res.outcome)
        return
    log.info(
        "key rotation %d: entry %s spooled; new key %r (key_id %s) signs beside the old one "
        "from the checkpoint after it",
        req.number,
        tx_id.hex()[:16],
        req.new.label,
        info.key_id.hex()[:16],
    )


def rotate(cfg: GatewayConfig, pin: str) -> tuple[KeyInfo, int]:
    """`edge-gateway hsm rotate`: a new P-256 key on the token (sensitive, not extractable,
    label `<key_label>.<n>`), recorded as rotation n's request in the spool. The running
    service takes it up on SIGHUP (systemctl reload) or at its next start."""
    path = cfg.spool.path
    if not path.exists():
        raise SpoolError(
            f"spool {path} does not exist: start the gateway once before rotating its log key"
        )
    try:
        conn = sqlite3.connect(path, timeout=10.0, isolation_level=None)
    except sqlite3.Error as e:
        raise SpoolError(f"spool {path} cannot be opened: {e}") from None
    try:
        with _spool_errors(path):
            state = rotation.read_state(conn)
            pending = rotation.read_request(conn)
        if state.in_progress():
            r = state.rotation
            assert r is not None
            raise rotation.RotationError(
                f"key rotation {r.number} is still under way (stage {r.stage}): wait until "
                "its overlap ends before rotating again"
            )
        number = pending.number if pending is not None else state.next_number()
        info = hsm.init_key(hsm.rotation_key(cfg.hsm, number), pin)
        if info.extractable or not info.sensitive:
            raise HsmError(f"hsm key {info.key_label!r} is extractable or not sensitive")
        spki = serialization.load_pem_public_key(info.public_pem).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        req = rotation.Request(
            number, rotation.TokenKey(info.key_label, info.cka_id), spki, now_ms()
        )
        if pending is not None and pending.new_spki == spki:
            req = pending  # the same request again: same entry bytes
        with _spool_errors(path):
            conn.execute("BEGIN IMMEDIATE")
            try:
                rotation.write_request(conn, req)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return info, number
    finally:
        conn.close()


@contextlib.contextmanager
def _spool_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as e:
        raise SpoolError(
            f"spool {path}: {e}: is it a gateway spool, readable and writable by this user?"
        ) from None


def log_public_pems(cfg: GatewayConfig, pin: str) -> list[bytes]:
    """Every key the log has been signed with, oldest first, read from the token: the
    configured key and each rotation's (what an export's gateway.pem lists)."""
    number = 0
    path = cfg.spool.path
    if path.exists():
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            with _spool_errors(path):
                r = rotation.read_state(conn).rotation
                number = 0 if r is None else r.number
        finally:
            conn.close()
    pems = [hsm.key_info(cfg.hsm, pin).public_pem]
    pems += [
        hsm.key_info(hsm.rotation_key(cfg.hsm, n), pin).public_pem for n in range(1, number + 1)
    ]
    return pems
