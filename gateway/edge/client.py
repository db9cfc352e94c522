"""Client side of the gateway API: status table and offline proof checks.

Verification trusts nothing the gateway says but its public key(s) and the witnesses'
vkeys: the c2sp.org/tlog-proof bundle's checkpoint signature and cosignatures, the
inclusion proof against the checkpoint's root, the leaf bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.message import Message

from gateway._pb.edgegateway.v1 import gateway_pb2, gateway_pb2_grpc, transaction_pb2
from gateway.common.errors import EXIT_DEGRADED, EXIT_OK, GatewayError, Unreachable
from gateway.common.grpcutil import aio_channel
from gateway.common.tomlconfig import TlsClient
from gateway.formats import batchformat, checkpoint, cosignature, merkle, note, tlogproof


@dataclass(frozen=True)
class ClientOptions:
    address: str
    tls: TlsClient | None

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> ClientOptions:
        if a.plaintext:
            return cls(a.address, None)
        if a.ca_file is None:
            raise GatewayError(
                "--ca-file is required for TLS (or --plaintext for a loopback gateway without TLS)"
            )
        if (a.cert_file is None) != (a.key_file is None):
            raise GatewayError("--cert-file and --key-file go together (mutual TLS)")
        return cls(a.address, TlsClient(a.ca_file, a.cert_file, a.key_file))


class ProofInvalid(GatewayError):
    """A proof, checkpoint signature or cosignature does not verify."""


def _rpc_error(what: str, e: grpc.aio.AioRpcError) -> GatewayError:
    if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        # exit 69: nothing answered
        return Unreachable(f"{what} unreachable: {e.code().name}: {e.details()}")
    return GatewayError(f"{what}: {e.code().name}: {e.details()}")


def degraded(st: gateway_pb2.GatewayStatus) -> list[str]:
    """Why the gateway is degraded; empty when it is not."""
    reasons = []
    ok = sum(1 for n in st.ledger_nodes if n.state == "ok")
    if ok < st.quorum:
        reasons.append(f"{ok} of {len(st.ledger_nodes)} ledger nodes ok, quorum {st.quorum}")
    forked = [n.node_id for n in st.ledger_nodes if n.state == "forked"]
    if forked:
        reasons.append("ledger split view: " + ", ".join(forked))
    if st.intake_paused:
        reasons.append(f"intake paused: {st.intake_paused_reason}")
    if st.hsm_state != "ok":
        reasons.append(f"hsm {st.hsm_state or 'state unknown'}")
    if not st.mqtt_connected:
        reasons.append("mqtt disconnected")
    return reasons


def plain(msg: Message) -> dict[str, object]:
    """A message's fields as JSON-ready values, every field present, 64-bit integers as
    numbers (protobuf's JSON mapping would make them strings)."""
    out: dict[str, object] = {}
    for f in msg.DESCRIPTOR.fields:
        v = getattr(msg, f.name)
        if isinstance(v, Message):
            out[f.name] = plain(v)
        elif f.message_type is not None:  # repeated messages
            out[f.name] = [plain(x) for x in v]
        elif isinstance(v, str | bytes | bool | int | float):
            out[f.name] = v
        else:  # repeated scalars
            out[f.name] = list(v)
    return out


async def print_status(opts: ClientOptions, as_json: bool = False) -> int:
    """The status as a table (or one JSON object). Exit code 2 when the gateway is
    degraded, with the reasons on one stderr line; 69 when it does not answer."""
    async with aio_channel(opts.address, opts.tls) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        try:
            st: gateway_pb2.GatewayStatus = await stub.GetStatus(
                gateway_pb2.GetStatusRequest(), timeout=10
            )
        except grpc.aio.AioRpcError as e:
            raise _rpc_error(f"gateway at {opts.address}", e) from None
    if as_json:
        print(json.dumps(plain(st), sort_keys=True))
    else:
        _print_table(st)
    reasons = degraded(st)
    if reasons:
        print(
            f"edge-gateway: gateway {st.gateway_id} degraded: {'; '.join(reasons)}", file=sys.stderr
        )
        return EXIT_DEGRADED
    return EXIT_OK


def _print_table(st: gateway_pb2.GatewayStatus) -> None:
    rows = [
        ("gateway", f"{st.gateway_id} (version {st.version}, up {st.uptime_s} s)"),
        ("intake", "PAUSED: " + st.intake_paused_reason if st.intake_paused else "open"),
        ("mqtt", "connected" if st.mqtt_connected else "disconnected"),
        ("spool depth", f"{st.spool_depth} (oldest {st.oldest_pending_age_s:.1f} s)"),
        ("stored / rejected", f"{st.transactions_stored} / {st.transactions_rejected}"),
        ("last signed seq", str(st.last_signed_seq)),
        ("last committed seq", str(st.last_committed_seq)),
        ("hsm", f"{st.hsm_state} key_id {st.key_id}"),
        (
            "box",
            f"cpu {st.cpu_percent:.0f} %, memory {st.memory_percent:.0f} %, spool disk "
            f"free {st.spool_disk_free_bytes / 2**30:.1f} GiB",
        ),
    ]
    for n in st.ledger_nodes:
        rows.append(
            (
                f"ledger {n.node_id}",
                f"{n.state} at {n.address}, cosigned log size {n.log_size}"
                + (f" ({n.last_error})" if n.last_error else ""),
            )
        )
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


@dataclass(frozen=True, slots=True)
class LogTrust:
    """What an offline verifier of the log trusts: the log's origin (None: the one the
    checkpoint names, signed by the gateway's key), the witnesses' cosignature vkeys, and
    how many of them must have cosigned."""

    origin: str | None = None
    witnesses: tuple[str, ...] = ()
    quorum: int | None = None  # None: a majority of the witnesses

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> LogTrust:
        vkeys = list(a.witness or ())
        if a.witnesses_file is not None:
            try:
                text = Path(a.witnesses_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise GatewayError(f"--witnesses-file {a.witnesses_file}: {e}") from None
            vkeys += [ln.strip() for ln in text.splitlines() if ln.strip() and ln[0] != "#"]
        return cls(a.origin, tuple(vkeys), a.witness_quorum)

    def policy(self) -> tlogproof.WitnessPolicy:
        try:
            verifiers = tuple(cosignature.parse_cosigner_vkey(v) for v in self.witnesses)
            quorum = len(verifiers) // 2 + 1 if self.quorum is None else self.quorum
            if not verifiers:
                quorum = 0
            return tlogproof.WitnessPolicy(verifiers, quorum)
        except note.NoteError as e:
            raise GatewayError(f"witnesses: {e}") from None


def verify_log_proof(
    resp: gateway_pb2.GetTransactionResponse,
    keys: ec.EllipticCurvePublicKey | Sequence[ec.EllipticCurvePublicKey],
    trust: LogTrust,
) -> tlogproof.VerifiedProof:
    """The c2sp.org/tlog-proof bundle: the checkpoint signed by one of the gateway's keys
    under its origin, cosigned by the quorum of witnesses, and the leaf included in it."""
    if resp.state == gateway_pb2.GetTransactionResponse.PENDING or not resp.tlog_proof:
        raise ProofInvalid(f"transaction {resp.tx_id} is not in a batch yet")
    if merkle.leaf_hash(resp.transaction).hex() != resp.tx_id:
        raise ProofInvalid("transaction bytes do not hash to the tx_id")
    try:
        bundle = tlogproof.parse_tlog_proof(resp.tlog_proof)
        origin = trust.origin
        if origin is None:
            origin = checkpoint.checkpoint_of(note.parse_note(bundle.checkpoint)).origin
        listed = [keys] if isinstance(keys, ec.EllipticCurvePublicKey) else list(keys)
        verifiers = [note.EcdsaVerifier.from_public_key(origin, k) for k in listed]
        verified = tlogproof.verify_tlog_proof(
            bundle, merkle.leaf_hash(resp.transaction), verifiers, trust.policy(), origin
        )
    except note.NoteError as e:
        raise ProofInvalid(f"log proof: {e}") from None
    if verified.index != resp.log_index:
        raise ProofInvalid(f"log proof is for index {verified.index}, not {resp.log_index}")
    return verified


async def check_proof(
    opts: ClientOptions, tx_id: str, public_key: Path, trust: LogTrust | None = None
) -> int:
    trust = trust or LogTrust()
    try:
        key = batchformat.load_public_keys(public_key.read_bytes())
    except (OSError, ValueError) as e:
        raise GatewayError(f"--public-key {public_key}: {e}") from None
    policy = trust.policy()  # a bad vkey fails before the call
    async with aio_channel(opts.address, opts.tls) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        try:
            resp: gateway_pb2.GetTransactionResponse = await stub.GetTransaction(
                gateway_pb2.GetTransactionRequest(tx_id=tx_id), timeout=10
            )
        except grpc.aio.AioRpcError as e:
            raise _rpc_error(f"GetTransaction {tx_id}", e) from None
    logged = verify_log_proof(resp, key, trust)
    tx = transaction_pb2.Transaction.FromString(resp.transaction)
    state = gateway_pb2.GetTransactionResponse.State.Name(resp.state)
    print(f"tx {tx_id}: {state}, device {tx.device_id} seq {tx.device_seq}, batch {resp.batch_seq}")
    cp = logged.checkpoint
    cosigners = ", ".join(name for name, _t in logged.cosigned_by) or "none"
    print(
        f"log {cp.origin}: leaf {logged.index} of checkpoint {cp.size} (root "
        f"{cp.root_hash.hex()}), signed by the gateway's key; inclusion proof verified; "
        f"cosigned by {len(logged.cosigned_by)} of {len(policy.witnesses)} witness(es), "
        f"{policy.threshold} required ({cosigners})"
    )
    sys.stdout.flush()
    return 0
