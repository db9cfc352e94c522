"""The gateway's log: tiles appended batch by batch give the RFC 9162 roots and proofs of
the whole tree, stored in SQLite and read back in O(log n) tile reads; the service writes
one checkpoint per batch, signed in the HSM, that an independent signed-note
implementation (sigstore-python) and ours both verify."""

from __future__ import annotations

import hashlib
import random
import sqlite3
import time
from pathlib import Path

import pkcs11
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.edge import tlog
from gateway.edge.spool import SCHEMA
from gateway.formats import checkpoint, cosignature, merkle, note, tiles
from tests.conftest import Deployment


def leaf_hashes(n: int, start: int = 0) -> list[bytes]:
    return [merkle.leaf_hash(f"leaf {i}".encode()) for i in range(start, start + n)]


def grow(chunks: list[int]) -> tuple[tlog.LogEdge, dict[tuple[int, int], bytes], list[bytes]]:
    """Append `chunks` leaves at a time, keeping every tile write as a store would."""
    edge = tlog.LogEdge(0)
    store: dict[tuple[int, int], bytes] = {}
    hashes: list[bytes] = []
    for k in chunks:
        new = leaf_hashes(k, len(hashes))
        edge, writes = edge.append(new)
        hashes += new
        for w in writes:
            old = store.get((w.level, w.index), b"")
            assert w.data.startswith(old), "a stored tile changed below its new end"
            store[(w.level, w.index)] = w.data
        assert edge.size == len(hashes)
    return edge, store, hashes


def test_roots_after_each_append_are_the_rfc_9162_roots() -> None:
    rng = random.Random(13)
    edge = tlog.LogEdge(0)
    hashes: list[bytes] = []
    assert edge.root() == merkle.EMPTY_ROOT
    for _ in range(60):
        new = leaf_hashes(rng.choice([1, 2, 3, 7, 255, 256, 257, 600]), len(hashes))
        edge, _writes = edge.append(new)
        hashes += new
        assert edge.root() == merkle.root_from_hashes(hashes), len(hashes)


@pytest.mark.parametrize("sizes", [[256], [255, 1], [1] * 300, [65536, 1], [65535, 2, 256]])
def test_tiles_at_the_edges_of_tile_levels(sizes: list[int]) -> None:
    edge, store, hashes = grow(sizes)
    assert edge.root() == merkle.root_from_hashes(hashes)
    # The stored tiles are exactly the tlog-tiles tiles of that size, with their bytes.
    ref = merkle.subtree_hashes(hashes)
    expected = {
        (t.level, t.index): tiles.tile_data(t, ref) for t in tiles.tiles_for_size(edge.size)
    }
    assert store == expected
    # And the edge reloads from them.
    again = tlog.load_edge(edge.size, lambda lv, i: store.get((lv, i)))
    assert again == edge


def test_proofs_from_stored_tiles_are_the_reference_proofs_for_every_earlier_size() -> None:
    rng = random.Random(7)
    chunks = [rng.randint(1, 900) for _ in range(40)]
    _edge, store, hashes = grow(chunks)
    sizes = [sum(chunks[: i + 1]) for i in range(len(chunks))]
    for new_size in rng.sample(sizes, 8):
        reader = tlog.TileReader(new_size, lambda lv, i: store.get((lv, i)))
        assert reader.root() == merkle.root_from_hashes(hashes[:new_size])
        for index in rng.sample(range(new_size), 5):
            proof = reader.inclusion_proof(index)
            assert proof == merkle.inclusion_proof_from_hashes(hashes[:new_size], index)
            root = merkle.root_from_inclusion_proof(hashes[index], index, new_size, proof)
            assert root == reader.root()
        for old in [s for s in sizes if s <= new_size][-4:]:
            proof = reader.consistency_proof(old)
            assert proof == merkle.consistency_proof_from_hashes(hashes[:new_size], old)
            old_root = merkle.root_from_hashes(hashes[:old])
            assert merkle.verify_consistency(old, new_size, proof, old_root, reader.root())


def test_two_logs_read_in_turn_each_get_their_own_proofs() -> None:
    """Readers share the hashes inside tiles above level 0 (logtree.SHARED_LEVELS); two
    logs of the same size hold different tiles at the same coordinates, so a share keyed
    by anything but the tile's bytes would answer one log with the other's hashes."""
    sizes = [70_001, 300, 65_536 + 256 * 3 + 7]
    logs = []
    for salt in ("a", "b"):
        edge, store = tlog.LogEdge(0), {}
        hashes = [merkle.leaf_hash(f"{salt} {i}".encode()) for i in range(max(sizes))]
        edge, writes = edge.append(hashes)
        for w in writes:
            store[(w.level, w.index)] = w.data
        logs.append((store, hashes))
    rng = random.Random(12)
    for _ in range(3):
        for size in sizes:
            for store, hashes in logs:
                reader = tlog.TileReader(size, lambda lv, i, s=store: s.get((lv, i)))
                assert reader.root() == merkle.root_from_hashes(hashes[:size])
                index = rng.randrange(size)
                assert reader.inclusion_proof(index) == merkle.inclusion_proof_from_hashes(
                    hashes[:size], index
                )


def test_the_hashes_inside_a_tile_are_its_subtree_hashes() -> None:
    """tiles.tile_levels answers every perfect subtree of a full and a partial tile as
    hash_from_tile (which hashes the slice on its own) does."""
    hashes = leaf_hashes(256 + 200)
    for tile, data in (
        (tiles.Tile(0, 0), b"".join(hashes[:256])),
        (tiles.Tile(0, 1, 200), b"".join(hashes[256:])),
    ):
        levels = tiles.tile_levels(data)
        for rise in range(8):
            count = 1 << rise
            for start in range(0, tile.width - count + 1, count):
                where = tiles.TileSlice(tile, start, count)
                assert tiles.levels_slice(levels, where) == tiles.hash_from_tile(data, where)


def test_tiles_in_sqlite_serve_proofs_and_a_missing_tile_is_an_error(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "spool.db", isolation_level=None)
    conn.executescript(SCHEMA)
    edge = tlog.LogEdge(0)
    hashes: list[bytes] = []
    for k in (300, 70_000, 5):
        new = leaf_hashes(k, len(hashes))
        edge, writes = edge.append(new)
        hashes += new
        conn.execute("BEGIN")
        tlog.write_tiles(conn, writes)
        conn.execute("COMMIT")
    fetch = tlog.sqlite_fetch(conn)
    assert tlog.load_edge(edge.size, fetch) == edge
    reader = tlog.TileReader(300, fetch)
    assert reader.root() == merkle.root_from_hashes(hashes[:300])
    full = tlog.TileReader(edge.size, fetch)
    proof = full.consistency_proof(300)
    assert merkle.verify_consistency(300, edge.size, proof, reader.root(), edge.root())
    # An older, narrower write never shrinks a tile that has grown.
    conn.execute("BEGIN")
    tlog.write_tiles(conn, [tlog.TileWrite(0, 0, hashes[0])])
    conn.execute("COMMIT")
    assert tlog.TileReader(edge.size, fetch).root() == edge.root()
    conn.execute("DELETE FROM log_tile WHERE level = 1")
    with pytest.raises(tlog.LogStateError, match="missing or short"):
        tlog.TileReader(edge.size, fetch).inclusion_proof(70_000)
    conn.close()


def test_proofs_at_ten_million_leaves_cost_a_few_tile_reads() -> None:
    """O(log n) reads at 10,000,000 leaves: every proof reads at most two tiles per
    tile level (3 levels here), counted on a store that would answer any tile."""
    size = 10_000_000

    def fetch(level: int, index: int) -> bytes:
        width = tiles.tile_width(level, index, size)
        assert width > 0, f"read of tile {level}/{index} beyond the tree"
        seed = hashlib.sha256(f"{level}/{index}".encode()).digest()
        return seed * width

    rng = random.Random(10)
    worst = 0
    for _ in range(50):
        reader = tlog.TileReader(size, fetch)
        reader.inclusion_proof(rng.randrange(size))
        worst = max(worst, reader.reads)
        reader = tlog.TileReader(size, fetch)
        reader.consistency_proof(rng.randrange(1, size))
        worst = max(worst, reader.reads)
    levels = len(tlog.load_edge(size, fetch).edge)
    assert levels == 3
    # The path's tile at each level and the right edge's: far below log2(n) = 24 hashes.
    assert worst <= 2 * levels, worst


def test_an_edge_that_does_not_match_its_size_is_refused() -> None:
    with pytest.raises(tlog.LogStateError):
        tlog.LogEdge(5, (b"\x00" * 32 * 4,))
    with pytest.raises(tlog.LogStateError):
        tlog.LogEdge(256, (b"\x00" * 32 * 256,))  # level 1 missing


def verify_with_sigstore(signed: bytes, pem: bytes) -> None:
    from tests.test_checkpoint import sigstore_verify

    key = serialization.load_pem_public_key(pem)
    sigstore_verify(signed, key)  # type: ignore[arg-type]


def gateway_verifier(origin: str, pem: bytes) -> note.EcdsaVerifier:
    key = serialization.load_pem_public_key(pem)
    return note.EcdsaVerifier.from_public_key(origin, key)  # type: ignore[arg-type]


def open_gateway_checkpoint(signed: bytes, origin: str, pem: bytes) -> checkpoint.Checkpoint:
    return checkpoint.open_checkpoint(signed, [gateway_verifier(origin, pem)], origin).checkpoint


# --------------------------------------------------------------------------
# The service: one checkpoint per batch, signed in SoftHSM2.
# --------------------------------------------------------------------------


@pytest.mark.integration
def test_the_gateway_signs_a_checkpoint_per_batch_of_one_log_across_a_kill(
    deployment: Deployment,
) -> None:
    from gateway.lab import demo, logaudit
    from tests.test_integration import publish_load

    d = deployment
    origin = checkpoint.gateway_origin("edge-gateway.invalid", d.gateway_id)
    pem = d.public_key.read_bytes()
    gw = d.start_gateway()
    res = publish_load(d, devices=20, count=30)
    assert res.acknowledged == 600 and res.failed == 0, res.line()
    demo.wait_drained(gw, 600, timeout=120)
    gw.proc.kill()  # SIGKILL: the next start reloads the log's edge from the tiles
    gw = d.start_gateway()
    res = publish_load(d, devices=20, count=30, start_seq=31)
    assert res.acknowledged == 600 and res.failed == 0, res.line()
    demo.wait_drained(gw, 1200, timeout=120)
    assert gw.proc.terminate(30) == 0

    audit = logaudit.audit_spool(gw.spool, origin, pem)
    assert audit.ok, audit.errors
    assert audit.leaves == 1200
    conn = sqlite3.connect(f"file:{gw.spool}?mode=ro", uri=True)
    batches = conn.execute("SELECT count(*) FROM batch").fetchone()[0]
    tx_ids = [r[0] for r in conn.execute("SELECT tx_id FROM tx ORDER BY rowid")]
    conn.close()
    assert audit.checkpoints == batches >= 2
    assert audit.consistency_checked == batches - 1
    last = checkpoint.parse_checkpoint(note.parse_note(audit.notes[-1]).text)
    assert last.origin == origin and last.size == 1200
    assert last.root_hash == merkle.root_from_hashes(tx_ids)
    for signed in audit.notes:
        # An implementation that is not ours, and ours.
        verify_with_sigstore(signed, pem)
        cp = open_gateway_checkpoint(signed, origin, pem)
        assert signed.decode().startswith(cp.body() + "\n\u2014 " + origin + " ")
    # A changed checkpoint is refused by both.
    tampered = audit.notes[-1].replace(b"\n1200\n", b"\n1201\n")
    from sigstore.errors import VerificationError

    with pytest.raises(VerificationError):
        verify_with_sigstore(tampered, pem)
    with pytest.raises(note.InvalidNoteSignature):
        open_gateway_checkpoint(tampered, origin, pem)


def wait_cosigned(spool: Path, size: int, nodes: int, timeout: float = 60) -> list[tuple[str, str]]:
    """Until `nodes` ledger nodes cosigned checkpoint `size`; their (node id, line)."""
    deadline = time.monotonic() + timeout
    rows: list[tuple[str, str]] = []
    while time.monotonic() < deadline:
        conn = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
        try:
            rows = conn.execute(
                "SELECT node_id, line FROM log_cosignature WHERE size = ? ORDER BY node_id",
                (size,),
            ).fetchall()
        finally:
            conn.close()
        if len(rows) >= nodes:
            return rows
        time.sleep(0.2)
    raise AssertionError(f"checkpoint {size}: cosigned by {rows} only")


def cosigned_by(signed: bytes, lines: list[tuple[str, str]], vkeys: list[str]) -> set[str]:
    """Names of the witnesses whose cosignature lines verify on the checkpoint."""
    body = note.parse_note(signed).text
    text = body + "\n" + "".join(line + "\n" for _n, line in lines)
    verifiers = [cosignature.parse_cosigner_vkey(v) for v in vkeys]
    verified = note.verify_note(note.parse_note(text.encode()), verifiers)
    return {s.name for s in verified.verified}


@pytest.mark.integration
def test_ledger_nodes_cosign_every_checkpoint_and_refuse_a_split_view(
    deployment: Deployment,
) -> None:
    import grpc

    from gateway._pb.edgegateway.v1 import ledger_pb2, ledger_pb2_grpc
    from gateway.edge.config import load_gateway_config
    from gateway.edge.signer import Signer
    from gateway.lab import demo, logaudit
    from gateway.lab.sandbox import TEST_PIN
    from tests.test_integration import publish_load

    d = deployment
    origin = checkpoint.gateway_origin("edge-gateway.invalid", d.gateway_id)
    pem = d.public_key.read_bytes()
    vkeys = [lg.witness_vkey for lg in d.ledgers]
    gw = d.start_gateway()
    res = publish_load(d, devices=10, count=20)
    assert res.acknowledged == 200, res.line()
    demo.wait_drained(gw, 200, timeout=120)
    audit = logaudit.audit_spool(gw.spool, origin, pem)
    assert audit.ok and audit.leaves == 200, audit.errors
    last = checkpoint.parse_checkpoint(note.parse_note(audit.notes[-1]).text)
    lines = wait_cosigned(gw.spool, last.size, 3)
    names = {checkpoint.witness_name("ledger.sandbox.invalid", lg.node_id) for lg in d.ledgers}
    assert cosigned_by(audit.notes[-1], lines, vkeys) == names
    assert gw.proc.terminate(30) == 0

    # Each node keeps the leaves it cosigned, in log order, and the same checkpoints.
    for lg in d.ledgers:
        conn = sqlite3.connect(f"file:{lg.db}?mode=ro", uri=True)
        leaves = [r[0] for r in conn.execute("SELECT leaf FROM log_leaf ORDER BY idx")]
        sizes = [r[0] for r in conn.execute("SELECT size FROM witness_cosigned ORDER BY size")]
        conn.close()
        assert merkle.root([bytes(x) for x in leaves]) == last.root_hash
        assert sizes[-1] == last.size

    # Shown another tree of the same size, signed by the gateway's own key, a node refuses
    # it (ABORTED) and keeps both checkpoints as evidence.
    cfg = load_gateway_config(d.config)
    # SoftHSM reads SOFTHSM2_CONF once, at C_Initialize: start over in this process so this
    # deployment's token is seen (an earlier test may have initialized the library with its
    # own), and finalize after so the next in-process user starts over with its own.
    lib = pkcs11.lib(str(cfg.hsm.module))
    lib.reinitialize()
    hsm = Signer(cfg.hsm, TEST_PIN)
    hsm.start()
    try:
        other = checkpoint.Checkpoint(origin, last.size, hashlib.sha256(b"other").digest())
        forged = hsm.sign_checkpoint(other).result(30)
    finally:
        hsm.close()
        lib.finalize()
    lg = d.ledgers[0]
    with lg.channel("gateway") as ch:
        stub = ledger_pb2_grpc.LedgerServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.AddCheckpoint(
                ledger_pb2.AddCheckpointRequest(
                    gateway_id=d.gateway_id, old_size=last.size, checkpoint=forged
                ),
                timeout=10,
            )
        assert err.value.code() is grpc.StatusCode.ABORTED, err.value.details()
        head = stub.GetHead(ledger_pb2.GetHeadRequest(gateway_id=d.gateway_id), timeout=10)
        assert head.log_size == last.size
    conn = sqlite3.connect(f"file:{lg.db}?mode=ro", uri=True)
    evidence = conn.execute("SELECT cosigned_size, presented_note FROM witness_evidence").fetchall()
    conn.close()
    assert [(e[0], bytes(e[1])) for e in evidence] == [(last.size, forged)]
    assert "SPLIT VIEW" in lg.proc.log_path.read_text()

    # A node whose cosigned view differs from the gateway's log is marked forked by the
    # gateway, which keeps committing with the other two.
    conn = sqlite3.connect(d.ledgers[1].db)
    conn.execute(
        "UPDATE witness_cosigned SET root_hash = ? WHERE size = ?",
        (hashlib.sha256(b"elsewhere").digest(), last.size),
    )
    conn.commit()
    conn.close()
    gw = d.start_gateway()
    res = publish_load(d, devices=10, count=5, start_seq=21)
    assert res.acknowledged == 50, res.line()
    demo.wait_drained(gw, 250, timeout=120)
    deadline = time.monotonic() + 30
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        st = demo.gateway_status(gw)
        states = {n.node_id: n.state for n in st.ledger_nodes}
        if states[d.ledgers[1].node_id] == "forked":
            break
        time.sleep(0.2)
    assert states[d.ledgers[1].node_id] == "forked", states
    assert states[d.ledgers[0].node_id] == states[d.ledgers[2].node_id] == "ok"
    assert gw.proc.terminate(30) == 0


@pytest.mark.integration
def test_get_transaction_returns_a_tlog_proof_that_verifies_offline_with_the_witnesses(
    deployment: Deployment, tmp_path: Path
) -> None:
    import subprocess
    import sys

    from gateway._pb.edgegateway.v1 import gateway_pb2, gateway_pb2_grpc
    from gateway.formats import tlogproof
    from gateway.lab import demo, logaudit
    from tests.test_integration import publish_load

    d = deployment
    origin = checkpoint.gateway_origin("edge-gateway.invalid", d.gateway_id)
    pem = d.public_key.read_bytes()
    vkeys = [lg.witness_vkey for lg in d.ledgers]
    gw = d.start_gateway()
    res = publish_load(d, devices=10, count=30)
    assert res.acknowledged == 300, res.line()
    demo.wait_drained(gw, 300, timeout=120)
    audit = logaudit.audit_spool(gw.spool, origin, pem)
    last = checkpoint.parse_checkpoint(note.parse_note(audit.notes[-1]).text)
    wait_cosigned(gw.spool, last.size, 3)
    conn = sqlite3.connect(f"file:{gw.spool}?mode=ro", uri=True)
    tx_ids = [bytes(r[0]).hex() for r in conn.execute("SELECT tx_id FROM tx ORDER BY rowid")]
    conn.close()

    policy = tlogproof.WitnessPolicy(
        tuple(cosignature.parse_cosigner_vkey(v) for v in vkeys), threshold=3
    )
    log_key = logaudit.log_verifier(origin, pem)
    with gw.channel() as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        for index in (0, 1, 150, 299):
            resp = stub.GetTransaction(
                gateway_pb2.GetTransactionRequest(tx_id=tx_ids[index]), timeout=10
            )
            assert resp.log_index == index
            verified = tlogproof.verify_tlog_proof(
                resp.tlog_proof, merkle.leaf_hash(resp.transaction), [log_key], policy
            )
            # Against the latest committed checkpoint, cosigned by all three nodes.
            assert verified.checkpoint.size == last.size
            assert len(verified.cosigned_by) == 3
            with pytest.raises(tlogproof.NotIncluded):
                tlogproof.verify_tlog_proof(
                    resp.tlog_proof, merkle.leaf_hash(resp.transaction + b"x"), [log_key], policy
                )

    witnesses = tmp_path / "witnesses"
    witnesses.write_text("# the sandbox's ledger nodes\n" + "".join(v + "\n" for v in vkeys))

    def proof_cli(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway",
                "proof",
                tx_ids[42],
                "--address",
                gw.api_address,
                *gw.cli_args("admin"),
                "--public-key",
                str(d.public_key),
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )

    out = proof_cli("--witnesses-file", str(witnesses), "--witness-quorum", "3", "--origin", origin)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "cosigned by 3 of 3 witness(es), 3 required" in out.stdout, out.stdout
    # A witness that did not cosign cannot make the quorum; the failure is one line.
    stranger = (
        cosignature.Cosigner(
            "ledger.sandbox.invalid/ledger-witness/stranger", ed25519.Ed25519PrivateKey.generate()
        )
        .verifier()
        .vkey()
    )
    out = proof_cli("--witness", stranger, "--witness", vkeys[0], "--witness-quorum", "2")
    assert out.returncode != 0
    assert "1 of 2 witnesses cosigned, 2 required" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    out = proof_cli("--origin", "other.example/edge-gateway/x")
    assert out.returncode != 0 and "origin" in out.stderr, out.stderr
    assert gw.proc.terminate(30) == 0
