"""A batch seq and a log size are uint64 on the wire but signed 64-bit integers in every
store: a seq, an old size or a tree size of 2^63 or more is answered with the range (a
proof from such a size is out of range), by the gateway's API and by a ledger node, never
UNKNOWN, and the servers keep serving."""

from __future__ import annotations

import grpc
import pytest

from gateway._pb.edgegateway.v1 import gateway_pb2, gateway_pb2_grpc, ledger_pb2, ledger_pb2_grpc
from gateway.formats import checkpoint, merkle
from gateway.formats.checkpoint import Checkpoint
from gateway.lab.sandbox import Sandbox
from tests.hostile.conftest import Hostile
from tests.test_ledger import SoftSigner

TOO_BIG = (2**63, 2**64 - 1)
RANGE = f"out of range: batch seqs go from 0 to {2**63 - 1}"
LOG_RANGE = f"out of range: log sizes go from 0 to {2**63 - 1}"


@pytest.mark.integration
def test_gateway_get_batch_past_int64_is_invalid_argument(hostile: Hostile) -> None:
    gw = hostile.gateway
    with gw.channel("admin") as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        for seq in TOO_BIG:
            with pytest.raises(grpc.RpcError) as e:
                stub.GetBatch(gateway_pb2.GetBatchRequest(seq=seq), timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
            assert e.value.details() == f"seq {seq} is {RANGE}"
        # The largest valid seq is simply not there yet.
        with pytest.raises(grpc.RpcError) as e:
            stub.GetBatch(gateway_pb2.GetBatchRequest(seq=2**63 - 1), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        status = stub.GetStatus(gateway_pb2.GetStatusRequest(), timeout=10)
        assert status.gateway_id == hostile.deployment.gateway_id


@pytest.mark.integration
def test_ledger_log_sizes_past_int64_are_refused_with_the_range(sandbox: Sandbox) -> None:
    signer = SoftSigner.new("edge-seq")
    node = sandbox.ledger(
        "ledger-seq", {"edge-seq": signer.write_public_pem(sandbox.root / "seq.pem")}
    )
    leaves = [b"tx 0", b"tx 1"]
    with node.channel("gateway") as ch:
        stub = ledger_pb2_grpc.LedgerServiceStub(ch)
        for size in TOO_BIG:
            request = ledger_pb2.AddCheckpointRequest(
                gateway_id="edge-seq",
                old_size=size,
                checkpoint=signer.checkpoint(leaves),
                leaves=leaves,
            )
            with pytest.raises(grpc.RpcError) as e:
                stub.AddCheckpoint(request, timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
            assert e.value.details() == f"old_size {size} is {LOG_RANGE}"
            # A checkpoint the gateway's key really signed, of a tree that large.
            big = Checkpoint(signer.origin, size, merkle.root(leaves))
            request = ledger_pb2.AddCheckpointRequest(
                gateway_id="edge-seq",
                old_size=0,
                checkpoint=checkpoint.sign_checkpoint(big, [signer.note_signer()]),
                leaves=leaves,
            )
            with pytest.raises(grpc.RpcError) as e:
                stub.AddCheckpoint(request, timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
            assert "beyond what this witness stores (2^63-1)" in (e.value.details() or "")
            # Asked for a proof from such a size: out of the range the node holds.
            with pytest.raises(grpc.RpcError) as e:
                stub.GetConsistency(
                    ledger_pb2.GetConsistencyRequest(gateway_id="edge-seq", old_size=size),
                    timeout=10,
                )
            assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value.details()
        # Still serving: the log starts at 0.
        cosigned = stub.AddCheckpoint(
            ledger_pb2.AddCheckpointRequest(
                gateway_id="edge-seq",
                old_size=0,
                checkpoint=signer.checkpoint(leaves),
                leaves=leaves,
            ),
            timeout=10,
        )
        assert cosigned.size == 2
        for size in TOO_BIG:
            with pytest.raises(grpc.RpcError) as e:
                stub.GetConsistency(
                    ledger_pb2.GetConsistencyRequest(gateway_id="edge-seq", old_size=size),
                    timeout=10,
                )
            assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE, e.value.details()
        head = stub.GetHead(ledger_pb2.GetHeadRequest(gateway_id="edge-seq"), timeout=10)
        assert head.log_size == 2
