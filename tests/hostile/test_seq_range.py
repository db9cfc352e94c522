"""A batch seq is a uint64 on the wire but a signed 64-bit integer in every store: a seq of
2^63 or more is answered INVALID_ARGUMENT with the range, by the gateway's API and by a
ledger node, never UNKNOWN, and the servers keep serving."""

from __future__ import annotations

import grpc
import pytest

from gateway._pb.edgegateway.v1 import gateway_pb2, gateway_pb2_grpc, ledger_pb2, ledger_pb2_grpc
from gateway.formats import batchformat
from tests.hostile.conftest import Hostile
from tests.test_ledger import SoftSigner, txs_for

TOO_BIG = (2**63, 2**64 - 1)
RANGE = f"out of range: batch seqs go from 0 to {2**63 - 1}"


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
def test_ledger_seqs_past_int64_are_invalid_argument(hostile: Hostile) -> None:
    sb = hostile.sandbox
    signer = SoftSigner.new("edge-seq")
    node = sb.ledger("ledger-seq", {"edge-seq": signer.write_public_pem(sb.root / "seq.pem")})
    with node.channel("gateway") as ch:
        stub = ledger_pb2_grpc.LedgerServiceStub(ch)
        for seq in TOO_BIG:
            request = ledger_pb2.ListBatchesRequest(gateway_id="edge-seq", from_seq=seq)
            with pytest.raises(grpc.RpcError) as e:
                list(stub.ListBatches(request, timeout=10))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
            assert e.value.details() == f"from_seq {seq} is {RANGE}"
            # A batch the gateway really signed, at such a seq.
            batch = signer.batch(seq, batchformat.ZERO_HASH, txs_for(0))
            with pytest.raises(grpc.RpcError) as e:
                stub.SubmitBatch(ledger_pb2.SubmitBatchRequest(batch=batch), timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
            assert e.value.details() == f"bad_header: seq {seq} is {RANGE}"
        receipt = stub.SubmitBatch(
            ledger_pb2.SubmitBatchRequest(batch=signer.chain(1)[0]), timeout=10
        )
        assert receipt.seq == 0
        head = stub.GetHead(ledger_pb2.GetHeadRequest(gateway_id="edge-seq"), timeout=10)
        assert head.next_seq == 1
