"""Fixtures that start the real components: SoftHSM2, Mosquitto, ledger nodes, gateways."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.formats import checkpoint, merkle, note
from gateway.lab.sandbox import GatewayProc, Hsm, Ledger, Proc, Sandbox, free_port


@dataclass
class Deployment:
    sandbox: Sandbox
    hsm: Hsm
    broker: Proc
    ledgers: list[Ledger]
    gateway_id: str
    config: Path
    public_key: Path
    key_id: str

    def start_gateway(self) -> GatewayProc:
        return self.sandbox.gateway(self.gateway_id, self.config, self.public_key)


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    sb = Sandbox(tmp_path / "sb")
    try:
        yield sb
    finally:
        sb.close()


def deploy(
    sb: Sandbox,
    gateway_id: str = "edge-test-01",
    nodes: int = 3,
    quorum: int = 2,
    batch: str = "max_tx = 500\nmax_age_s = 0.5",
    extra: str = "",
    spool_extra: str = "",
) -> Deployment:
    hsm = sb.hsm()
    broker = sb.mosquitto()
    ports = [free_port() for _ in range(nodes)]
    names = [f"ledger-{i + 1}" for i in range(nodes)]
    cfg = sb.gateway_config(
        gateway_id,
        hsm,
        broker.port,
        [(n, f"127.0.0.1:{p}") for n, p in zip(names, ports, strict=True)],
        quorum=quorum,
        batch=batch,
        extra=extra,
    )
    if spool_extra:
        text = cfg.read_text().replace("[spool]\n", f"[spool]\n{spool_extra}\n")
        cfg.write_text(text)
    pem = sb.root / f"{gateway_id}.pem"
    key_id = sb.hsm_init(cfg, pem)
    ledgers = [sb.ledger(n, {gateway_id: pem}, port=p) for n, p in zip(names, ports, strict=True)]
    return Deployment(sb, hsm, broker, ledgers, gateway_id, cfg, pem, key_id)


@pytest.fixture
def deployment(sandbox: Sandbox) -> Deployment:
    return deploy(sandbox)


BUILD_DEB = Path(__file__).resolve().parents[1] / "scripts" / "build-deb"


@pytest.fixture(scope="session")
def deb_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Debian package, built once per test session by scripts/build-deb into a temp dir.

    Its staging directory is under the session's temp dir too, so a test can look for
    that path in the package's files. A build that cannot run fails with its one line
    (e.g. which Debian package to install).
    """
    out = tmp_path_factory.mktemp("deb")
    staging = tmp_path_factory.mktemp("deb-staging")
    env = {**os.environ, "TMPDIR": str(staging)}
    try:
        r = subprocess.run(
            [str(BUILD_DEB), str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("scripts/build-deb did not finish within 900 s", pytrace=False)
    if r.returncode != 0:
        pytest.fail(
            f"scripts/build-deb failed (exit {r.returncode}): {r.stderr.strip()[-3000:]}",
            pytrace=False,
        )
    debs = sorted(out.glob("edge-gateway_*.deb"))
    if len(debs) != 1:
        pytest.fail(f"scripts/build-deb wrote {debs} to {out}, expected one .deb", pytrace=False)
    return debs[0]


def every_leaf_included(spool: Path, verifiers: list[note.EcdsaVerifier], origin: str) -> int:
    """Offline, from the spool: the latest checkpoint verifies under one of `verifiers`,
    and every transaction's inclusion proof leads from its tx_id (the leaf hash, in log
    order) to that checkpoint's root. Returns the number of leaves checked."""
    conn = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
    try:
        conn.execute("BEGIN")
        size, signed = conn.execute(
            "SELECT size, note FROM log_checkpoint ORDER BY size DESC LIMIT 1"
        ).fetchone()
        hashes = [bytes(r[0]) for r in conn.execute("SELECT tx_id FROM tx ORDER BY rowid")]
    finally:
        conn.close()
    assert size == len(hashes), f"the latest checkpoint covers {size} of {len(hashes)} leaves"
    root = checkpoint.open_checkpoint(bytes(signed), verifiers, origin).checkpoint.root_hash
    tree = merkle.subtree_hashes(hashes)
    for i, h in enumerate(hashes):
        proof = merkle.inclusion_proof_from_provider(i, size, tree)
        assert merkle.root_from_inclusion_proof(h, i, size, proof) == root, f"leaf {i}"
    return size
