"""Key rotation of a gateway's log: the rotation entry's format, and a ledger node that
trusts the new key only once a checkpoint signed by the old key covered the entry."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway._pb.edgegateway.v1 import ledger_pb2
from gateway.formats import checkpoint, keyrotation, merkle, note
from gateway.formats.checkpoint import Checkpoint
from gateway.ledger import witness as witness_mod
from gateway.ledger.node import LeavesRejected, LedgerStore
from gateway.ledger.witness import LogKey, Witness
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
