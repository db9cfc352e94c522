"""Key rotation of a gateway's log: the rotation entry's format, and a ledger node that
trusts the new key only once a checkpoint signed by the old key covered the entry."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway._pb.edgegateway.v1 import ledger_pb2
from gateway.edge import rotation
from gateway.edge.config import load_gateway_config
from gateway.formats import batchformat, checkpoint, keyrotation, merkle, note
from gateway.formats.checkpoint import Checkpoint
from gateway.lab import demo
from gateway.lab.sandbox import Sandbox
from gateway.ledger import witness as witness_mod
from gateway.ledger.node import LeavesRejected, LedgerStore
from gateway.ledger.witness import LogKey, Witness
from tests.conftest import Deployment, deploy, every_leaf_included
from tests.test_witness import WITNESS, ecdsa_signer, ed_key

T = TypeVar("T")
GATEWAY = "gw-01"
ORIGIN = checkpoint.gateway_origin("ledger.carrier.example", GATEWAY)


def arun(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def spki_of(signer: note.EcdsaDigestSigner) -> bytes:
    return signer.public_key_der


OLD = ecdsa_signer(ORIGIN, "old log key")
NEW = ecdsa_signer(ORIGIN, "new log key")
OTHER = ecdsa_signer(ORIGIN, "a key nobody rotated to")


def entry(
    new: note.EcdsaDigestSigner = NEW,
    old: note.EcdsaDigestSigner = OLD,
    origin: str = ORIGIN,
    gateway_id: str = GATEWAY,
) -> keyrotation.RotationEntry:
    return keyrotation.RotationEntry(
        origin=origin,
        gateway_id=gateway_id,
        rotation=1,
        old_key_id=hashlib.sha256(spki_of(old)).digest(),
        new_spki=spki_of(new),
        overlap_checkpoints=3,
        overlap_seconds=0,
        created_ms=1_790_000_000_000,
    )


# --- the entry ----------------------------------------------------------------------------


def test_a_rotation_entry_is_a_canonical_leaf_that_parses_back_and_nothing_else_does() -> None:
    e = entry()
    leaf = e.leaf()
    assert keyrotation.is_rotation_leaf(leaf)
    assert keyrotation.parse_entry(leaf) == e
    assert e.new_key_id == hashlib.sha256(spki_of(NEW)).digest()
    assert e.verifier().vkey() == NEW.verifier().vkey()
    # A device's transaction never starts with the reserved device id.
    from gateway._pb.edgegateway.v1 import transaction_pb2

    tx = transaction_pb2.Transaction(device_id="log", device_seq=1, profile="p@1")
    assert not keyrotation.is_rotation_leaf(tx.SerializeToString(deterministic=True))
    # A changed byte is refused or reads as another entry (the time of creation is a
    # plain integer), never as this one; the key and terms never change unnoticed.
    for i in range(len(leaf)):
        changed = leaf[:i] + bytes([leaf[i] ^ 0x01]) + leaf[i + 1 :]
        try:
            other = keyrotation.parse_entry(changed)
        except keyrotation.RotationEntryError:
            continue
        assert other != e and other.leaf() == changed
        assert (other.new_spki, other.overlap_checkpoints) == (e.new_spki, 3), i
    with pytest.raises(keyrotation.RotationEntryError):
        keyrotation.parse_entry(leaf + b"\x00" * 5000)


# --- a ledger node ------------------------------------------------------------------------


class Log:
    """The gateway's log in memory: leaves, and checkpoints signed by chosen keys."""

    def __init__(self) -> None:
        self.leaves: list[bytes] = []
        self.cosigned = 0  # the size the node last cosigned

    def grow(self, n: int) -> None:
        start = len(self.leaves)
        self.leaves += [f"tx-{i}".encode() for i in range(start, start + n)]

    def request(self, *signers: note.EcdsaDigestSigner) -> ledger_pb2.AddCheckpointRequest:
        size = len(self.leaves)
        cp = Checkpoint(ORIGIN, size, merkle.root(self.leaves))
        old = self.cosigned
        return ledger_pb2.AddCheckpointRequest(
            gateway_id=GATEWAY,
            old_size=old,
            consistency_proof=merkle.consistency_proof(self.leaves, old) if old else [],
            checkpoint=checkpoint.sign_checkpoint(cp, list(signers)),
            leaves=self.leaves[old:],
        )


def open_store(path: Path) -> LedgerStore:
    def make(conn: sqlite3.Connection) -> Witness:
        return Witness(conn, WITNESS, ed_key("witness"), [LogKey(ORIGIN, (OLD.verifier(),))])

    return arun(LedgerStore.open(path, make))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LedgerStore]:
    s = open_store(tmp_path / "ledger.sqlite")
    yield s
    arun(s.close())


def add(store: LedgerStore, log: Log, *signers: note.EcdsaDigestSigner) -> int:
    size, _line = arun(store.add_checkpoint(GATEWAY, log.request(*signers)))
    log.cosigned = size
    return size


def test_a_node_shown_the_new_key_without_the_entry_refuses_it(store: LedgerStore) -> None:
    log = Log()
    log.grow(4)
    assert add(store, log, OLD) == 4
    log.grow(3)
    with pytest.raises(witness_mod.BadSignature):
        add(store, log, NEW)
    # The entry inside a checkpoint that only the new key signed does not help: the node
    # trusts a key only through a checkpoint signed by a key it already trusts.
    log.leaves.append(entry().leaf())
    with pytest.raises(witness_mod.BadSignature):
        add(store, log, NEW)
    assert arun(store.log_size(ORIGIN)) == 4
    assert [v.vkey() for v in store.witness.verifiers(ORIGIN)] == [  # type: ignore[union-attr]
        OLD.verifier().vkey()
    ]


def test_the_new_key_is_trusted_after_the_old_key_signed_the_entry_and_after_a_restart(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.sqlite"
    store = open_store(path)
    log = Log()
    log.grow(4)
    add(store, log, OLD)
    log.leaves.append(entry().leaf())
    log.grow(2)
    add(store, log, OLD)  # the checkpoint that covers the entry: the old key alone
    log.grow(3)
    add(store, log, OLD, NEW)  # the overlap: both
    log.grow(3)
    assert add(store, log, NEW) == 13  # then the new key alone
    arun(store.close())

    store = open_store(path)  # the key rotated to is kept in the node's database
    try:
        log.grow(2)
        assert add(store, log, NEW) == 15
        # A key nobody rotated to is still refused.
        log.grow(1)
        with pytest.raises(witness_mod.BadSignature):
            add(store, log, OTHER)
    finally:
        arun(store.close())


def test_a_checkpoint_signed_by_both_keys_that_covers_the_entry_is_accepted(
    store: LedgerStore,
) -> None:
    log = Log()
    log.leaves.append(entry().leaf())
    log.grow(2)
    add(store, log, OLD, NEW)  # the new key's line is not checked yet: the old one is
    log.grow(1)
    assert add(store, log, NEW) == 4


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(entry(origin=checkpoint.gateway_origin("x.example", GATEWAY)), id="origin"),
        pytest.param(entry(gateway_id="gw-02"), id="gateway"),
        pytest.param(entry(old=OTHER), id="untrusted-old-key"),
    ],
)
def test_an_entry_for_another_log_or_from_an_untrusted_key_refuses_the_checkpoint(
    store: LedgerStore, bad: keyrotation.RotationEntry
) -> None:
    log = Log()
    log.grow(2)
    add(store, log, OLD)
    log.leaves.append(bad.leaf())
    with pytest.raises(LeavesRejected):
        add(store, log, OLD)
    assert arun(store.log_size(ORIGIN)) == 2
    log.leaves.pop()
    log.grow(1)
    with pytest.raises(witness_mod.BadSignature):
        add(store, log, NEW)  # and the key it named is not trusted


def test_a_malformed_leaf_under_the_reserved_device_id_refuses_the_checkpoint(
    store: LedgerStore,
) -> None:
    log = Log()
    log.leaves.append(keyrotation.LEAF_PREFIX + b"\x10\x01")
    with pytest.raises(LeavesRejected, match="not a valid key rotation entry"):
        add(store, log, OLD)
    assert arun(store.log_size(ORIGIN)) == 0


# --- the service, on a real SoftHSM2 token, under load --------------------------------------


TOKEN_PROBE = """
import sys, pkcs11
from pkcs11 import Attribute, ObjectClass
module, token_label, pin, label, cka_id = sys.argv[1:]
token = pkcs11.lib(module).get_token(token_label=token_label)
with token.open(user_pin=pin) as s:
    old = s.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label, id=bytes.fromhex(cka_id))
    new = s.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label + ".1")
    print("old", f"sign={old[Attribute.SIGN]}", "new", f"sign={new[Attribute.SIGN]}",
          f"sensitive={new[Attribute.SENSITIVE] and not new[Attribute.EXTRACTABLE]}")
"""


def hsm_rotate(d: Deployment, pem_out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            d.sandbox.python,
            "-m",
            "gateway",
            "hsm",
            "rotate",
            "--config",
            str(d.config),
            "--pem-out",
            str(pem_out),
        ],
        env=d.sandbox.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def spool_rows(spool: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def key_state(spool: Path) -> rotation.KeyState:
    conn = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
    try:
        return rotation.read_state(conn)
    finally:
        conn.close()


def wait_for(what: str, test: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if test():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s")


def signers_of(signed: bytes, keys: dict[str, note.EcdsaVerifier]) -> set[str]:
    """Which of `keys` (by a short name) signed a checkpoint note."""
    parsed = note.parse_note(signed)
    out = set()
    for name, v in keys.items():
        try:
            note.verify_note(parsed, [v])
        except note.NoteError:
            continue
        out.add(name)
    return out


@pytest.mark.integration
def test_a_key_rotation_mid_run_under_load_leaves_every_proof_verifiable(
    sandbox: Sandbox,
) -> None:
    from gateway.lab.sandbox import SOFTHSM_MODULE, TEST_PIN
    from tests.faults import harness

    d = deploy(
        sandbox,
        batch="max_tx = 200\nmax_age_s = 0.2",
        extra="[log]\nrotation_overlap_checkpoints = 20\nrotation_overlap_s = 0\n",
    )
    old_pem = d.public_key.read_bytes()
    new_pem_path = sandbox.root / "new-key.pem"
    gw = d.start_gateway()
    origin = load_gateway_config(d.config).log_origin
    pub = harness.Publisher(d.broker.port, "rotation-load", devices=50, tls=sandbox.mqtt_tls())
    t = threading.Thread(target=pub.publish, args=(12_000, 2000.0), daemon=True)
    t.start()
    time.sleep(1.5)

    # Mid-run: the new key on the token, then SIGHUP.
    out = hsm_rotate(d, new_pem_path)
    assert out.returncode == 0, out.stderr
    assert "rotation 1" in out.stdout
    # A second rotation is refused until the service took up the first.
    again = hsm_rotate(d, sandbox.root / "again.pem")
    assert again.returncode == 0, again.stderr  # the same request: same key, same number
    assert new_pem_path.read_bytes() == (sandbox.root / "again.pem").read_bytes()
    assert gw.proc.proc is not None
    gw.proc.proc.send_signal(signal.SIGHUP)
    wait_for("rotation taken up", lambda: key_state(gw.spool).rotation is not None, 30)
    # A rotation while one is under way is refused with one line.
    busy = hsm_rotate(d, sandbox.root / "busy.pem")
    assert busy.returncode != 0 and len(busy.stderr.strip().splitlines()) == 1, busy.stderr
    assert "under way" in busy.stderr
    # Killed during the rotation, the gateway picks it up where its spool says.
    time.sleep(0.6)
    gw.proc.kill()
    sandbox.start_gateway_again(gw)
    t.join(120)
    pub.close()
    acked_during = pub.acked
    both = old_pem + new_pem_path.read_bytes()
    d.public_key.write_bytes(both)  # verifiers get both keys from here on
    # Traffic until the overlap is over and after it: checkpoints by the new key alone.
    pub = harness.Publisher(
        d.broker.port, "rotation-after", devices=10, prefix="after", tls=sandbox.mqtt_tls()
    )
    t = threading.Thread(target=pub.publish, args=(4000, 1000.0), daemon=True)
    t.start()
    wait_for("rotation done", lambda: key_state(gw.spool).rotation.stage == "done", 60)  # type: ignore[union-attr]
    t.join(120)
    pub.close()
    acked_after = pub.acked
    harness.wait_committed(gw, d.ledgers, acked_after, timeout=120)
    harness.wait_all_nodes(gw, d.ledgers, acked_after, timeout=60)

    # The log: the entry, covered by a checkpoint the old key alone signed, then 20 by
    # both, then the new key alone.
    state = key_state(gw.spool)
    r = state.rotation
    assert r is not None and r.stage == "done" and r.number == 1 and r.dual_signed == 20
    entry_rows = spool_rows(gw.spool, "SELECT leaf FROM tx WHERE device_id = '_log'")
    assert len(entry_rows) == 1
    ent = keyrotation.parse_entry(bytes(entry_rows[0][0]))
    new_key = batchformat.load_public_key(new_pem_path.read_bytes())
    old_key = batchformat.load_public_key(old_pem)
    assert ent.new_spki == note.spki_der(new_key) and ent.origin == origin
    assert ent.old_key_id == batchformat.key_id_of(old_key)
    keys = {
        "old": note.EcdsaVerifier.from_public_key(origin, old_key),
        "new": note.EcdsaVerifier.from_public_key(origin, new_key),
    }
    sizes_notes = spool_rows(gw.spool, "SELECT size, note FROM log_checkpoint ORDER BY size")
    kinds = [(int(s), frozenset(signers_of(bytes(n), keys))) for s, n in sizes_notes]
    before = [k for s, k in kinds if s < r.entry_size]  # type: ignore[operator]
    at = [k for s, k in kinds if s == r.entry_size]
    after = [k for s, k in kinds if s > r.entry_size]  # type: ignore[operator]
    assert before and all(k == {"old"} for k in before)
    assert at == [{"old"}]
    assert [set(k) for k in after[:20]] == [{"old", "new"}] * 20
    assert len(after) > 20 and all(k == {"new"} for k in after[20:])

    # The old key is retired on the token: kept, but it signs nothing more. (Read in a
    # process of its own: SoftHSM reads its configuration once per process.)
    cfg = load_gateway_config(d.config)
    probe = subprocess.run(
        [
            d.sandbox.python,
            "-c",
            TOKEN_PROBE,
            str(SOFTHSM_MODULE),
            d.hsm.token_label,
            TEST_PIN,
            cfg.hsm.key_label,
            cfg.hsm.key_id.hex(),
        ],
        env=d.sandbox.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["old", "sign=False", "new", "sign=True", "sensitive=True"]

    # Every node trusts the new key through the entry and cosigned throughout. Cosigning
    # follows the batches (the quorum may commit before the third node cosigns): wait for it.
    def all_cosigned() -> bool:
        return all(
            spool_rows(lg.db, "SELECT max(size) FROM witness_cosigned")[0][0] == kinds[-1][0]
            for lg in d.ledgers
        )

    wait_for("every node cosigned the latest checkpoint", all_cosigned, 60)
    for lg in d.ledgers:
        vkeys = spool_rows(lg.db, "SELECT vkey FROM witness_log_keys")
        assert [v[0] for v in vkeys] == [keys["new"].vkey()]
        cosigned = spool_rows(lg.db, "SELECT size FROM witness_cosigned ORDER BY size")
        assert cosigned[-1][0] == kinds[-1][0]
        assert any(s == r.entry_size for (s,) in cosigned)

    # Every transaction before, during and after: committed once, chains, inclusion and
    # tlog proofs verify with both keys listed (the audit of the fault matrix).
    all_acked = acked_during | acked_after
    a = harness.audit(gw, d.ledgers, all_acked, proof_sample=400)
    assert a.lost == 0 and a.applied_twice == 0 and a.committed == a.acknowledged
    harness.record("log key rotated mid-run (CLI + SIGHUP, SIGKILL in overlap)", a, 0.0)
    tx_ids = [
        bytes(x[0]).hex() for x in spool_rows(gw.spool, "SELECT tx_id FROM tx ORDER BY rowid")
    ]
    # Every leaf, offline: its inclusion proof against the latest checkpoint, which the new
    # key alone signs, verifies.
    assert every_leaf_included(gw.spool, [keys["new"]], origin) == len(tx_ids)
    # And through the API, a sample of them: tlog-proof bundles that verify offline.
    ok, bad = demo.verify_proofs(gw, tx_ids, sample=1500)
    assert (ok, bad) == (1500, 0)
    # The export for auditors (the CLI) lists every key of the log, read from the token,
    # and verifies across the rotation with nothing but its directory.
    from gateway.formats import auditdir

    exported = subprocess.run(
        [
            d.sandbox.python,
            "-m",
            "gateway",
            "export",
            "--config",
            str(d.config),
            "--out",
            str(sandbox.root / "export"),
            "--sample",
            "300",
            *(a for lg in d.ledgers for a in ("--witness", lg.witness_vkey)),
        ],
        env=d.sandbox.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert exported.returncode == 0, exported.stderr
    assert (sandbox.root / "export" / "gateway.pem").read_bytes() == both
    report = auditdir.audit(sandbox.root / "export", min_proofs=300)
    assert report.ok, report.summary()
    # A transaction's proof is against the latest committed checkpoint, which the new key
    # alone signs now: those batched before the rotation verify with the new key alone,
    # and no longer with the old one.
    d.public_key.write_bytes(new_pem_path.read_bytes())
    ok, bad = demo.verify_proofs(gw, tx_ids[:200], sample=200)
    assert (ok, bad) == (200, 0)
    d.public_key.write_bytes(old_pem)
    ok, bad = demo.verify_proofs(gw, tx_ids[:200], sample=200)
    assert (ok, bad) == (0, 200)
    d.public_key.write_bytes(both)
    # The status reports the key that now signs the checkpoints.
    assert demo.gateway_status(gw).key_id == batchformat.key_id_of(new_key).hex()
    assert gw.proc.terminate(30) == 0


# --- the stages, as the batcher steps through them ------------------------------------------


def test_the_rotation_stages_decide_which_keys_sign_each_batch() -> None:
    old, new = rotation.TokenKey("batch", b"\x01"), rotation.TokenKey("batch.1", b"\x01\x00\x01")
    entry_id = b"\xee" * 32
    r = rotation.Rotation(1, old, new, entry_id, 2, 10, "spooled")
    state = rotation.KeyState(active=old, rotation=r)
    assert rotation.plan(state) == rotation.Plan((old,))
    # Batches without the entry change nothing.
    assert rotation.after_checkpoint(state, [b"\x00" * 32], 5, 1000) == state
    # The batch holding the entry is signed by the old key alone; then the overlap.
    state = rotation.after_checkpoint(state, [b"\x00" * 32, entry_id], 7, 1000)
    assert state.rotation is not None and state.rotation.stage == "overlap"
    assert state.rotation.entry_size == 7
    assert rotation.plan(state) == rotation.Plan((old, new))
    state = rotation.after_checkpoint(state, [b"\x01" * 32], 8, 2000)
    state = rotation.after_checkpoint(state, [b"\x02" * 32], 9, 5000)
    # Two checkpoints, but not yet ten seconds: both keys still.
    assert state.rotation is not None and state.rotation.stage == "overlap"
    state = rotation.after_checkpoint(state, [b"\x03" * 32], 10, 12_000)
    assert state.rotation is not None and state.rotation.stage == "done"
    assert state.active == new and rotation.plan(state) == rotation.Plan((new,))
    # The state survives its text form (the spool's meta table).
    assert rotation.KeyState.from_text(state.to_text()) == state
    # No overlap at all: the new key alone right after the entry's checkpoint.
    quick = rotation.KeyState(rotation=rotation.Rotation(1, old, new, entry_id, 0, 0, "spooled"))
    quick = rotation.after_checkpoint(quick, [entry_id], 1, 0)
    assert quick.active == new and rotation.plan(quick).checkpoint == (new,)
