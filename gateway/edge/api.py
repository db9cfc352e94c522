"""The gateway's own gRPC API: submit, transaction proofs, batches, status.

SubmitTransactions answers only after every accepted transaction is committed
to the spool (promise 1), through the same intake as MQTT. A call bigger than
max_receive_bytes is refused by grpc before it is buffered or reaches us. A device
id the profiles refuse (a wildcard, a NUL, too long) is that item's rejection
(bad_device_id); nothing is built from it. An unexpected exception while taking a
call in is a bug: the gateway stops (exit 70) and the call is answered INTERNAL.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from typing import Any

import grpc

from gateway._pb.edgegateway.v1 import gateway_pb2, gateway_pb2_grpc
from gateway.common import grpcutil
from gateway.common.errors import Rejected
from gateway.edge import tlog
from gateway.edge.config import GatewayConfig
from gateway.edge.ingest import INVALID_DEVICE, Intake, valid_device
from gateway.edge.spool import AppendResult, Outcome, Spool, StoredCheckpoint
from gateway.formats import tlogproof

MAX_PAYLOADS_PER_CALL = 10_000
# What a DevicePayload adds around its payload: device id, topic, profile and framing.
PAYLOAD_OVERHEAD_BYTES = 1024
# No call is allowed more than this, whatever max_payload_bytes x MAX_PAYLOADS_PER_CALL
# comes to (640 MiB with the defaults), unless one payload alone needs more.
MAX_CALL_BYTES_CEILING = 16 * 1024 * 1024
# Batch seqs are stored as SQLite integers: signed 64-bit.
MAX_SEQ = 2**63 - 1
SERVICE_NAME = "edgegateway.v1.GatewayService"


def max_receive_bytes(max_payload_bytes: int) -> int:
    """The largest request the API accepts: MAX_PAYLOADS_PER_CALL payloads of
    mqtt.max_payload_bytes, capped at MAX_CALL_BYTES_CEILING but never below one payload."""
    one = max_payload_bytes + PAYLOAD_OVERHEAD_BYTES
    return max(one, min(MAX_CALL_BYTES_CEILING, one * MAX_PAYLOADS_PER_CALL))


def server_options(cfg: GatewayConfig) -> list[tuple[str, int]]:
    """The API server's grpc options, its receive limit sized from the configuration."""
    return grpcutil.server_options(max_receive_bytes(cfg.mqtt.max_payload_bytes))


def _proof_view(
    conn: sqlite3.Connection, tx_id: bytes
) -> gateway_pb2.GetTransactionResponse | None:
    tx = Spool.q_tx(conn, tx_id)
    if tx is None:
        return None
    resp = gateway_pb2.GetTransactionResponse(
        tx_id=tx_id.hex(), transaction=tx.leaf, state=gateway_pb2.GetTransactionResponse.PENDING
    )
    in_log = Spool.q_leaf_index(conn, tx.rowid)
    if in_log is None:
        return resp
    resp.log_index, own = in_log
    resp.batch_seq = own.seq
    resp.tlog_proof = log_proof(conn, resp.log_index, own)
    resp.state = (
        gateway_pb2.GetTransactionResponse.COMMITTED
        if Spool.q_committed(conn, own.size)
        else gateway_pb2.GetTransactionResponse.BATCHED
    )
    return resp


def log_proof(conn: sqlite3.Connection, index: int, own: StoredCheckpoint) -> bytes:
    """A tlog-proof bundle for leaf `index`: against the latest committed checkpoint (a
    verifier keeps fewer checkpoints that way), or the leaf's own batch checkpoint before
    one covering it is committed; cosignature lines appended to the signed note."""
    target = Spool.q_last_committed_checkpoint(conn)
    if target is None or target.size <= index:
        target = own
    reader = tlog.TileReader(target.size, tlog.sqlite_fetch(conn))
    return tlogproof.make_tlog_proof(index, reader, cosigned_note(conn, target)).serialise()


def cosigned_note(conn: sqlite3.Connection, cp: StoredCheckpoint) -> bytes:
    """A checkpoint's signed note with the cosignature lines the spool holds appended."""
    lines = "".join(line + "\n" for _node, line in Spool.q_cosignatures(conn, cp.size))
    return cp.note + lines.encode()


def _batch_view(
    conn: sqlite3.Connection, seq: int, with_txs: bool
) -> gateway_pb2.GetBatchResponse | None:
    b = Spool.q_checkpoint_of_seq(conn, seq)
    if b is None:
        return None
    resp = gateway_pb2.GetBatchResponse(
        seq=b.seq,
        checkpoint=cosigned_note(conn, b),
        first_index=b.first_index,
        tx_count=b.tx_count,
        committed=Spool.q_committed(conn, b.size),
    )
    if with_txs:
        resp.transactions.extend(Spool.q_leaves(conn, b.first_rowid, b.last_rowid))
    return resp


class GatewayApi(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(
        self,
        spool: Spool,
        intake: Intake,
        status: Callable[[], gateway_pb2.GatewayStatus],
        paused: Callable[[], str | None],
    ) -> None:
        self.spool = spool
        self.intake = intake
        self._status = status
        self._paused = paused

    async def SubmitTransactions(
        self,
        request: gateway_pb2.SubmitTransactionsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> gateway_pb2.SubmitTransactionsResponse:
        reason = self._paused()
        if reason is not None:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"intake paused ({reason}); retry after 5 s"
            )
        if len(request.payloads) > MAX_PAYLOADS_PER_CALL:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(request.payloads)} payloads in one call; at most {MAX_PAYLOADS_PER_CALL}",
            )
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[tuple[AppendResult | BaseException, Rejected | None]]] = []
        for p in request.payloads:
            fut: asyncio.Future[tuple[AppendResult | BaseException, Rejected | None]] = (
                loop.create_future()
            )

            def done(
                res: AppendResult | BaseException,
                rej: Rejected | None,
                fut: asyncio.Future[tuple[AppendResult | BaseException, Rejected | None]] = fut,
            ) -> None:
                loop.call_soon_threadsafe(_set, fut, (res, rej))

            shown = p.device_id if valid_device(p.device_id) or not p.device_id else INVALID_DEVICE
            topic = p.topic or f"grpc/{shown}"
            try:
                self.intake.submit(
                    p.device_id or None, topic, p.payload, "grpc", done, p.profile or None
                )
            except Exception as e:  # a bug: the gateway stops, the message is recorded
                self.intake.guard.fatal(e, "grpc submit", (topic, p.payload))
                await context.abort(
                    grpc.StatusCode.INTERNAL,
                    "internal error: the gateway restarts; retry once it serves again",
                )
            futures.append(fut)
        outcomes = await asyncio.gather(*futures)
        resp = gateway_pb2.SubmitTransactionsResponse()
        for res, rej in outcomes:
            r = resp.results.add()
            if isinstance(res, BaseException):
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"spool write failed, nothing from this call is acknowledged: {res}",
                )
            elif rej is not None:
                r.outcome = gateway_pb2.SubmitResult.REJECTED
                r.reason, r.detail = rej.reason, rej.detail
            elif res.outcome is Outcome.STORED:
                r.outcome = gateway_pb2.SubmitResult.STORED
                r.tx_id = res.tx_id.hex()
            else:
                r.outcome = gateway_pb2.SubmitResult.DUPLICATE
                r.tx_id = res.tx_id.hex()
        return resp

    async def GetTransaction(
        self,
        request: gateway_pb2.GetTransactionRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> gateway_pb2.GetTransactionResponse:
        try:
            tx_id = bytes.fromhex(request.tx_id)
        except ValueError:
            tx_id = b""
        if len(tx_id) != 32:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "tx_id must be 64 hex characters (the leaf hash)"
            )
        view = await asyncio.wrap_future(self.spool.read(lambda c: _proof_view(c, tx_id)))
        if view is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no transaction {request.tx_id}")
        assert view is not None
        return view

    async def GetBatch(
        self, request: gateway_pb2.GetBatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gateway_pb2.GetBatchResponse:
        if request.seq > MAX_SEQ:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"seq {request.seq} is out of range: batch seqs go from 0 to {MAX_SEQ}",
            )
        view = await asyncio.wrap_future(
            self.spool.read(lambda c: _batch_view(c, request.seq, request.include_transactions))
        )
        if view is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no batch {request.seq}")
        assert view is not None
        return view

    async def GetStatus(
        self, request: gateway_pb2.GetStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gateway_pb2.GatewayStatus:
        return self._status()


def _set(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)
