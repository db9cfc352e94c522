"""`edge-gateway demo` / `make demo`: the whole pipeline on this machine.

A throwaway SoftHSM token and key, Mosquitto on a free loopback port, three
reference ledger nodes (quorum 2), the gateway and hundreds of simulated
devices; then every figure is checked end to end, not taken on trust:
each ledger node's copy of the log verified against the checkpoint it cosigned,
log proofs verified, nothing applied twice, and
every receipt the trackers get verified with the reference device verifier.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import shutil
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import grpc

from gateway._pb.edgegateway.v1 import (
    gateway_pb2,
    gateway_pb2_grpc,
    ledger_pb2,
    ledger_pb2_grpc,
    transaction_pb2,
)
from gateway.common import resources
from gateway.common.errors import GatewayError
from gateway.edge import client, export
from gateway.edge.config import load_gateway_config
from gateway.formats import (
    auditdir,
    batchformat,
    checkpoint,
    device_verifier,
    keyrotation,
    merkle,
    note,
)
from gateway.lab import demo_rotation, logaudit, simulate
from gateway.lab import receipts as lab_receipts
from gateway.lab.sandbox import GatewayProc, Ledger, Sandbox, free_port

GATEWAY_ID = "edge-demo-01"
PROFILES_DIR = resources.profiles_dir()
# Four device families at once; esim-lifecycle is left out because its rate limit
# (one event per second per eUICC) is below the demo's per-device rate.
DEMO_PROFILES = ("nbiot-meter", "lte-m-tracker", "cellsite-power", "cdr-usage")
# The profile whose devices get receipts ([receipts] enabled in the demo's copy).
RECEIPT_PROFILE = "lte-m-tracker"


@dataclass
class Summary:
    published: int = 0
    acknowledged: int = 0
    rejected_published: int = 0
    stored: int = 0
    committed: int = 0
    duplicates_applied: int = 0
    missing_at_ledger: int = 0
    batches: int = 0
    proofs_verified: int = 0
    proofs_failed: int = 0
    # Ledger nodes whose leaves reproduce the gateway's whole log, as of the latest
    # checkpoint they cosigned, signed by the gateway's key.
    logs_verified: int = 0
    ledger_nodes: int = 0
    seconds: float = 0.0
    tx_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    signatures: int = 0
    # The gateway's log: its checkpoints, each node's cosigned ones, successive cosigned
    # pairs shown consistent, and whatever failed.
    checkpoints: int = 0
    cosigned_by_node: dict[str, int] = field(default_factory=dict)
    consistent_pairs: int = 0
    log_errors: list[str] = field(default_factory=list)
    committed_by_profile: dict[str, int] = field(default_factory=dict)
    # `--export DIR`: the export for auditors, and what gateway.formats.auditdir made of it.
    export_line: str = ""
    export_ok: bool = True
    # Receipts to the trackers: received on their topics, verified by the reference device
    # verifier, committed transactions of the profile without one, and whether a ledger
    # node's consistency proof shows the oldest receipt's checkpoint still in the log.
    receipts_received: int = 0
    receipts_verified: int = 0
    receipts_expected: int = 0
    receipts_missing: int = 0
    receipts_still_included: bool = False
    receipt_errors: list[str] = field(default_factory=list)
    # The log key rotated a third of the way through (gateway.lab.demo_rotation), unless
    # `--no-rotate`.
    rotation_line: str = ""
    rotation_ok: bool = True
    rotation_errors: list[str] = field(default_factory=list)
    # The log's own entries among the committed transactions (a rotation's), not counted
    # in `committed`, which counts what devices sent.
    log_entries: int = 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def committed_by_profile(spool: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
    try:
        out: Counter[str] = Counter()
        for (leaf,) in conn.execute(
            "SELECT leaf FROM tx WHERE rowid <= (SELECT coalesce(max(last_rowid), 0) FROM batch"
            " WHERE committed_ms IS NOT NULL)"
        ):
            out[transaction_pb2.Transaction.FromString(leaf).profile] += 1
        return dict(sorted(out.items()))
    finally:
        conn.close()


def committed_tx_ids(spool: Path, profile: str) -> set[bytes]:
    """tx_ids of the committed transactions of `profile` (name, any version)."""
    conn = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
    try:
        return {
            bytes(tx_id)
            for tx_id, leaf in conn.execute(
                "SELECT tx_id, leaf FROM tx WHERE rowid <= (SELECT coalesce(max(last_rowid), 0)"
                " FROM batch WHERE committed_ms IS NOT NULL)"
            )
            if transaction_pb2.Transaction.FromString(leaf).profile.partition("@")[0] == profile
        }
    finally:
        conn.close()


def check_receipts(
    s: Summary,
    gw: GatewayProc,
    ledgers: list[Ledger],
    sub: lab_receipts.ReceiptSubscriber,
    timeout: float = 30.0,
) -> None:
    """Every committed transaction of RECEIPT_PROFILE has a receipt that verifies as a device
    verifies it (gateway key, the three witnesses, quorum 2), and a ledger node's
    consistency proof shows the oldest receipt's checkpoint is a prefix of its latest."""
    want = committed_tx_ids(gw.spool, RECEIPT_PROFILE)
    missing = sub.wait_for_tx_ids(want, timeout)
    trust = lab_receipts.trust(
        load_gateway_config(gw.config).log_origin,
        gw.public_key,
        [lg.witness_vkey for lg in ledgers],
        quorum=2,
    )
    tally = sub.tally(trust)
    s.receipts_received, s.receipts_verified = tally.received, tally.verified
    s.receipts_expected, s.receipts_missing = len(want), len(missing)
    s.receipt_errors = tally.failed[:5]
    if not tally.verified:
        return
    oldest = min(
        (data for _t, data in sub.messages),
        key=lambda d: int.from_bytes(d[41:49], "big"),  # the receipt's tree size
    )
    old_size = int.from_bytes(oldest[41:49], "big")
    try:
        with ledgers[0].channel() as ch:
            answer = ledger_pb2_grpc.LedgerServiceStub(ch).GetConsistency(
                ledger_pb2.GetConsistencyRequest(gateway_id=gw.gateway_id, old_size=old_size),
                timeout=10,
            )
        device_verifier.verify_still_included(oldest, answer.checkpoint, list(answer.proof), trust)
        s.receipts_still_included = True
    except (grpc.RpcError, device_verifier.ReceiptInvalid) as e:
        s.receipt_errors.append(f"still included: {e}")


def log_entries(spool: Path) -> int:
    """The log's own entries (key rotations) in the spool: transactions no device sent."""
    conn = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
    try:
        n: int = conn.execute(
            "SELECT count(*) FROM tx WHERE device_id = ?", (keyrotation.RESERVED_DEVICE,)
        ).fetchone()[0]
        return n
    finally:
        conn.close()


def spool_figures(spool: Path) -> tuple[int, int, int, list[float], list[str]]:
    """stored, committed txs, batches, publish-to-commit latencies (ms), committed tx ids."""
    conn = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
    try:
        stored = conn.execute("SELECT count(*) FROM tx").fetchone()[0]
        batches = conn.execute("SELECT count(*) FROM batch").fetchone()[0]
        lat: list[float] = []
        ids: list[str] = []
        for first, last, committed_ms in conn.execute(
            "SELECT first_rowid, last_rowid, committed_ms FROM batch WHERE committed_ms IS NOT NULL"
        ):
            for leaf, tx_id in conn.execute(
                "SELECT leaf, tx_id FROM tx WHERE rowid BETWEEN ? AND ?", (first, last)
            ):
                tx = transaction_pb2.Transaction.FromString(leaf)
                if tx.device_time_ms:
                    lat.append(committed_ms - tx.device_time_ms)
                ids.append(tx_id.hex())
        return stored, len(ids), batches, lat, ids
    finally:
        conn.close()


def ledger_log(
    ledger: Ledger, key_pem: Path, gateway_id: str = GATEWAY_ID
) -> tuple[int, list[bytes]]:
    """The leaves a ledger node holds of the gateway's log (one snapshot of its database),
    and how many of them the latest checkpoint it cosigned covers when they reproduce its
    root and that checkpoint verifies under the gateway's key (-1 otherwise)."""
    keys = batchformat.load_public_keys(key_pem.read_bytes())
    conn = sqlite3.connect(f"file:{ledger.db}?mode=ro", uri=True)
    try:
        conn.execute("BEGIN")
        leaves = [
            bytes(r[0])
            for r in conn.execute(
                "SELECT leaf FROM log_leaf WHERE gateway_id = ? ORDER BY idx", (gateway_id,)
            )
        ]
        notes = [
            bytes(r[0])
            for r in conn.execute(
                "SELECT note FROM witness_cosigned WHERE size <= ? ORDER BY size DESC",
                (len(leaves),),
            )
        ]
    finally:
        conn.close()
    if not leaves:
        return 0, leaves  # an empty log needs no checkpoint
    # The largest checkpoint of this log that verifies decides; the leaves are hashed
    # into a root once, for it alone.
    for signed in notes:
        try:
            origin = checkpoint.checkpoint_of(note.parse_note(signed)).origin
            verifiers = [note.EcdsaVerifier.from_public_key(origin, k) for k in keys]
            cp = checkpoint.open_checkpoint(signed, verifiers, origin).checkpoint
        except note.NoteError:
            continue  # another gateway's log, or a key not given
        return (cp.size if merkle.root(leaves[: cp.size]) == cp.root_hash else -1), leaves
    return -1, leaves


def check_ledger(
    ledger: Ledger, key_pem: Path, gateway_id: str = GATEWAY_ID
) -> tuple[int, int, set[tuple[str, int]]]:
    """ledger_log's verified size, the transactions the node applied twice, and the
    (device, seq) set it holds."""
    verified, leaves = ledger_log(ledger, key_pem, gateway_id)
    seen: Counter[tuple[str, int]] = Counter()
    for leaf in leaves:
        tx = transaction_pb2.Transaction.FromString(leaf)
        seen[(tx.device_id, tx.device_seq)] += 1
    dups = sum(c - 1 for c in seen.values() if c > 1)
    return verified, dups, set(seen)


def check_log(s: Summary, gw: GatewayProc, ledgers: list[Ledger]) -> None:
    """The gateway's log as an auditor sees it (logaudit): every checkpoint signed and
    consistent with the one before; every checkpoint each node cosigned verifies, and
    successive ones are consistent by a proof from the gateway's tiles."""
    origin = load_gateway_config(gw.config).log_origin
    pem = gw.public_key.read_bytes()
    own = logaudit.audit_spool(gw.spool, origin, pem)
    s.checkpoints = own.checkpoints
    s.log_errors += own.errors
    audits = [
        logaudit.audit_witness(lg.node_id, lg.db, origin, pem, lg.witness_vkey, gw.spool)
        for lg in ledgers
    ]
    for a in audits:
        s.cosigned_by_node[a.node_id] = a.cosigned
        s.consistent_pairs += a.consistent_pairs
        s.log_errors += a.errors
    s.log_errors += logaudit.same_roots(audits, gw.spool)


def verify_proofs(gw: GatewayProc, tx_ids: list[str], sample: int) -> tuple[int, int]:
    key = batchformat.load_public_keys(gw.public_key.read_bytes())
    ok = bad = 0
    with gw.channel("admin") as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        for tx_id in random.Random(7).sample(tx_ids, min(sample, len(tx_ids))):
            resp = stub.GetTransaction(gateway_pb2.GetTransactionRequest(tx_id=tx_id), timeout=10)
            try:
                client.verify_log_proof(resp, key, client.LogTrust())
                ok += 1
            except client.ProofInvalid:
                bad += 1
    return ok, bad


def export_and_audit(
    s: Summary, gw: GatewayProc, ledgers: list[Ledger], out: Path, say: Callable[[str], None]
) -> None:
    """Export the log for auditors while the gateway runs, then verify the directory as an
    auditor would, with gateway.formats.auditdir and nothing but the directory."""
    done = export.export(
        gw.spool,
        out,
        gateway_id=gw.gateway_id,
        origin=load_gateway_config(gw.config).log_origin,
        public_pems=[gw.public_key.read_bytes()],
        witnesses={lg.node_id: lg.witness_vkey for lg in ledgers},
    )
    say(done.line())
    report = auditdir.audit(out, min_proofs=min(export.DEFAULT_SAMPLE, s.committed))
    s.export_line, s.export_ok = report.summary(), report.ok


def log_size(spool: Path) -> int:
    """The size of the gateway's log at its last checkpoint (0 before the first)."""
    conn = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT max(size) FROM log_checkpoint").fetchone()
        return 0 if row is None or row[0] is None else int(row[0])
    finally:
        conn.close()


def gateway_status(gw: GatewayProc) -> gateway_pb2.GatewayStatus:
    # Status needs no administrative rights: the read-only certificate is enough.
    with gw.channel("reader") as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        st: gateway_pb2.GatewayStatus = stub.GetStatus(gateway_pb2.GetStatusRequest(), timeout=10)
        return st


def wait_drained(
    gw: GatewayProc, stored_at_least: int, timeout: float, all_nodes: bool = False
) -> gateway_pb2.GatewayStatus:
    """Until everything acknowledged is batched and committed at the quorum (with
    `all_nodes`, also cosigned by every ledger node, not only the quorum)."""
    deadline = time.monotonic() + timeout
    st = gateway_status(gw)
    while time.monotonic() < deadline:
        st = gateway_status(gw)
        if (
            st.transactions_stored >= stored_at_least
            and st.spool_depth == 0
            and st.last_committed_seq == st.last_signed_seq
            and (not all_nodes or all(n.log_size == log_size(gw.spool) for n in st.ledger_nodes))
        ):
            return st
        time.sleep(0.2)
    raise GatewayError(
        f"pipeline did not drain within {timeout} s: depth {st.spool_depth}, "
        f"signed {st.last_signed_seq}, committed {st.last_committed_seq}"
    )


async def _load(
    opts: simulate.SimulateOptions,
    gw: GatewayProc,
    quiet: bool,
    midway: Callable[[], None] | None = None,
) -> simulate.SimulateResult:
    """The simulated devices' run; `midway()` (in a thread) a third of the way through, so
    that the rest of the run brings the batches a rotation's overlap needs."""
    task = asyncio.create_task(simulate.run(opts))
    t0 = time.monotonic()
    if midway is not None:
        await asyncio.sleep(opts.seconds / 3)
        await asyncio.to_thread(midway)
    while not task.done():
        await asyncio.sleep(2.0)
        if not quiet and not task.done():
            st = await asyncio.to_thread(gateway_status, gw)
            print(
                f"  t={time.monotonic() - t0:4.0f}s  stored {st.transactions_stored:>8}  "
                f"rejected {st.transactions_rejected:>5}  depth {st.spool_depth:>5}  "
                f"signed seq {st.last_signed_seq:>4}  committed seq {st.last_committed_seq:>4}",
                flush=True,
            )
    return await task


def run_demo(
    root: Path,
    seconds: float,
    devices: int,
    rate: float,
    quiet: bool = False,
    bad_ratio: float = 0.01,
    export_dir: Path | None = None,
    rotate: bool = True,
) -> Summary:
    sb = Sandbox(root)

    def say(text: str) -> None:
        if not quiet:
            print(text, flush=True)

    try:
        hsm = sb.hsm()
        broker = sb.mosquitto()
        say(f"mosquitto on 127.0.0.1:{broker.port}, SoftHSM token {hsm.token_label!r}")
        if sb.pki is not None:
            say(
                f"TLS everywhere, client certificates required (dev CA in {sb.pki.dir}): "
                "devices and the gateway to MQTT, the gateway to the ledger nodes, "
                "operators to the API"
            )
        login = sb.broker_logins.get(broker.port)
        if login is not None:
            say(
                f"broker from `edge-gateway broker config` (lab form): devices on "
                f"127.0.0.1:{broker.port}, bound to their own topics by certificate, below "
                f"{login.mount_point!r}; the simulator's certificate publishes for every "
                f"device; gateways on 127.0.0.1:{login.gateway_port} with a password"
            )
        ports = [free_port() for _ in range(3)]
        names = [f"ledger-{i + 1}" for i in range(3)]
        opts = sb.simulate_options(
            simulate.SimulateOptions(
                port=broker.port,
                devices=devices,
                rate=rate,
                seconds=seconds,
                bad_ratio=bad_ratio,
                start_seq=int(time.time() * 1000),
                profiles=DEMO_PROFILES,
                profiles_dir=PROFILES_DIR,
            )
        )
        # The shipped profiles, the trackers' opted in to receipts.
        profiles_dir = lab_receipts.opt_in(PROFILES_DIR, root / "profiles", [RECEIPT_PROFILE])
        keys_dir = root / "keys"
        keys_dir.mkdir(mode=0o700, exist_ok=True)
        # The gateway loads every shipped profile, so every one needs its keys file.
        simulate.provision_keys(opts, keys_dir)
        simulate.provision_keys(replace(opts, profiles=("esim-lifecycle",)), keys_dir)
        pseudonym_key = root / "pseudonym.key"
        pseudonym_key.write_text(secrets.token_hex(32) + "\n")
        pseudonym_key.chmod(0o600)
        cfg = sb.gateway_config(
            GATEWAY_ID,
            hsm,
            broker.port,
            [(n, f"127.0.0.1:{p}") for n, p in zip(names, ports, strict=True)],
            quorum=2,
            extra=(
                f'\n[profiles]\ndir = "{profiles_dir}"\nkeys_dir = "{keys_dir}"\n'
                f'pseudonym_key_file = "{pseudonym_key}"\n'
                + (demo_rotation.LOG_SECTION if rotate else "")
            ),
        )
        pem = root / f"{GATEWAY_ID}.pem"
        key_id = sb.hsm_init(cfg, pem)
        say(f"HSM key created (sensitive, not extractable), key_id {key_id}")
        ledgers = [
            sb.ledger(n, {GATEWAY_ID: pem}, port=p) for n, p in zip(names, ports, strict=True)
        ]
        say("ledger nodes: " + ", ".join(f"{lg.node_id}@{lg.address}" for lg in ledgers))
        gw = sb.gateway(GATEWAY_ID, cfg, pem)
        say(f"gateway {GATEWAY_ID} ready (sd_notify READY=1), API {gw.api_address}")
        say(
            f"simulating {devices} devices ({', '.join(DEMO_PROFILES)}) at {rate:.0f} msg/s "
            f"for {seconds:.0f} s ({bad_ratio:.0%} malformed)"
        )
        # The trackers' receipts, as the devices get them (the simulator's certificate
        # reads every device's receipt topic).
        sub = lab_receipts.ReceiptSubscriber(broker.port, "demo-receipts", sb.mqtt_tls())
        sub.start(["receipts/+"])
        say(f"{RECEIPT_PROFILE} devices subscribed to receipts/<device>")
        old_pem = pem.read_bytes()
        new_pem = root / f"{GATEWAY_ID}.rotated.pem"

        def rotate_key() -> None:
            say(f"  {demo_rotation.request(sb, gw, new_pem)}; SIGHUP sent to the gateway")
            # From here on every verifier is given both keys, as auditors are after a
            # rotation: a proof checks under the key (or keys) that signed its checkpoint.
            pem.write_bytes(old_pem + new_pem.read_bytes())

        t0 = time.monotonic()
        res = asyncio.run(_load(opts, gw, quiet, rotate_key if rotate else None))
        good_acked = res.acknowledged - res.bad_published
        if rotate:
            demo_rotation.wait_done(gw.spool, timeout=20)
        st = wait_drained(gw, good_acked, timeout=60, all_nodes=True)
        elapsed = time.monotonic() - t0
        stored, committed, batches, lat, ids = spool_figures(gw.spool)
        entries = log_entries(gw.spool)
        stored, committed = stored - entries, committed - entries
        s = Summary(
            log_entries=entries,
            published=res.published,
            acknowledged=res.acknowledged,
            rejected_published=res.bad_published,
            stored=stored,
            committed=committed,
            batches=batches,
            seconds=round(elapsed, 1),
            tx_per_s=round(committed / res.elapsed_s, 1) if res.elapsed_s else 0.0,
            p50_ms=round(percentile(lat, 0.50), 1),
            p99_ms=round(percentile(lat, 0.99), 1),
            ledger_nodes=len(ledgers),
            signatures=batches,
        )
        del st
        for lg in ledgers:
            n, dups, held = check_ledger(lg, pem)
            s.logs_verified += 1 if n == log_size(gw.spool) else 0
            s.duplicates_applied += dups
            s.missing_at_ledger = max(s.missing_at_ledger, committed - len(held))
        s.proofs_verified, s.proofs_failed = verify_proofs(gw, ids, 200)
        check_log(s, gw, ledgers)
        check_receipts(s, gw, ledgers, sub)
        sub.close()
        if export_dir is not None:
            export_and_audit(s, gw, ledgers, export_dir, say)
        s.committed_by_profile = committed_by_profile(gw.spool)
        if rotate:
            origin = load_gateway_config(gw.config).log_origin
            rot = demo_rotation.report(gw.spool, origin, old_pem, new_pem.read_bytes())
            s.rotation_line, s.rotation_ok, s.rotation_errors = rot.line(), rot.ok(), rot.errors
        code = gw.proc.terminate(30)
        if code != 0:
            raise GatewayError(f"gateway exited with {code} on SIGTERM")
        return s
    finally:
        sb.close()


def main(
    seconds: float,
    as_json: bool,
    devices: int,
    rate: float,
    workdir: Path | None,
    export_dir: Path | None = None,
    rotate: bool = True,
) -> int:
    if export_dir is not None:
        export.check_out_dir(export_dir, force=False)  # before the demo, not after it
    root = workdir or Path(tempfile.mkdtemp(prefix="edge-gateway-demo-"))
    try:
        s = run_demo(
            root, seconds, devices, rate, quiet=False, export_dir=export_dir, rotate=rotate
        )
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print("summary")
    print(f"  published            {s.published} ({s.rejected_published} malformed on purpose)")
    print(f"  acknowledged         {s.acknowledged}")
    print(f"  stored in spool      {s.stored}")
    entries = f" (and {s.log_entries} log entry)" if s.log_entries == 1 else ""
    if s.log_entries > 1:
        entries = f" (and {s.log_entries} log entries)"
    print(f"  committed (quorum)   {s.committed}{entries} in {s.batches} signed batches")
    print(f"  throughput           {s.tx_per_s} tx/s committed")
    by = ", ".join(f"{k} {v}" for k, v in s.committed_by_profile.items())
    print(f"  by firmware profile  {by}")
    print(f"  publish-to-commit    p50 {s.p50_ms} ms, p99 {s.p99_ms} ms")
    print(f"  proofs verified      {s.proofs_verified} of a sample ({s.proofs_failed} failed)")
    print(
        f"  ledger logs          {s.logs_verified} of {s.ledger_nodes} verified, "
        f"{s.duplicates_applied} duplicates applied"
    )
    cosigned = ", ".join(f"{k} {v}" for k, v in s.cosigned_by_node.items())
    print(
        f"  log                  {s.checkpoints} signed checkpoints; cosigned: {cosigned}; "
        f"{s.consistent_pairs} successive cosigned pairs consistent"
    )
    for err in s.log_errors[:5]:
        print(f"  log error            {err}")
    print(
        f"  receipts             {s.receipts_received} received, {s.receipts_verified} verified "
        f"({s.receipts_expected} committed {RECEIPT_PROFILE} transactions, "
        f"{s.receipts_missing} without one; oldest still in the log: "
        f"{'yes' if s.receipts_still_included else 'NO'})"
    )
    for err in s.receipt_errors[:5]:
        print(f"  receipt error        {err}")
    if export_dir is not None:
        print(f"  export (auditdir)    {s.export_line}")
    if rotate:
        print(f"  log key rotation     {s.rotation_line}")
        for err in s.rotation_errors[:5]:
            print(f"  rotation error       {err}")
    ok = (
        len(s.committed_by_profile) >= 3
        and s.proofs_failed == 0
        and s.duplicates_applied == 0
        and s.logs_verified == s.ledger_nodes
        and s.committed >= s.acknowledged - s.rejected_published
        and s.checkpoints == s.batches
        and not s.log_errors
        and len(s.cosigned_by_node) == s.ledger_nodes
        and all(n > 0 for n in s.cosigned_by_node.values())
        and s.export_ok
        and s.receipts_received > 0
        and s.receipts_verified == s.receipts_received
        and s.receipts_missing == 0
        and s.receipts_still_included
        and s.rotation_ok
    )
    if as_json:
        print(json.dumps(asdict(s), sort_keys=True))
    return 0 if ok else 1
