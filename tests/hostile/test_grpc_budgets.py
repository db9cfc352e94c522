"""gRPC budgets: a call bigger than what the configuration allows is refused with
RESOURCE_EXHAUSTED before the server buffers it (its memory barely moves), and calls past
the concurrency cap are refused while the calls in progress, and later ones, are served."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway._pb.edgegateway.v1 import (
    gateway_pb2,
    gateway_pb2_grpc,
    ledger_pb2,
    ledger_pb2_grpc,
)
from gateway.common.errors import ConfigError
from gateway.edge import api
from gateway.edge.config import parse_gateway_config
from gateway.lab.sandbox import ClientFiles, Ledger, Sandbox, grpc_channel
from gateway.ledger import node as ledger
from tests.hostile.conftest import API_MAX_CONCURRENT, Hostile, RssPeak
from tests.test_ledger import SoftSigner

MIB = 1024 * 1024
HUGE = 200 * MIB
LEDGER_MAX_CONCURRENT = 4
LEDGER_MAX_BATCH = 1 * MIB


def _files(hostile: Hostile, role: str) -> ClientFiles:
    files = hostile.sandbox.client_files(role)
    assert files is not None
    return files


def _served(call: grpc.UnaryUnaryMultiCallable, request: object) -> object:  # type: ignore[type-arg]
    """The call's answer once the server takes calls again (it sees cancellations
    asynchronously); at most 10 s."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return call(request, timeout=10)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def _hold(channel: grpc.Channel, n: int) -> list[Iterator[health_pb2.HealthCheckResponse]]:
    """`n` calls in progress on the server: health watches, each past its first answer."""
    stub = health_pb2_grpc.HealthStub(channel)
    watches = [stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60) for _ in range(n)]
    for w in watches:
        assert next(w).status == health_pb2.HealthCheckResponse.SERVING
    return watches


# --- the gateway's API ---------------------------------------------------------------------


@pytest.mark.integration
def test_an_oversized_api_call_is_refused_before_the_gateway_buffers_it(hostile: Hostile) -> None:
    gw = hostile.gateway
    assert gw.proc.proc is not None
    request = gateway_pb2.SubmitTransactionsRequest(
        payloads=[
            gateway_pb2.DevicePayload(device_id=f"big-{i}", payload=b"\xa5" * MIB)
            for i in range(HUGE // MIB)
        ]
    )
    size = request.ByteSize()
    limit = api.max_receive_bytes(65536)  # mqtt.max_payload_bytes as the sandbox leaves it
    assert size >= HUGE and limit == api.MAX_CALL_BYTES_CEILING
    # A compromised device certificate: not allowed to submit, but the bytes arrive first.
    with grpc_channel(gw.api_address, _files(hostile, "device")) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        with RssPeak(gw.proc.proc.pid) as rss, pytest.raises(grpc.RpcError) as e:
            stub.SubmitTransactions(request, timeout=60)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    assert f"vs. {limit}" in (e.value.details() or "")
    assert rss.growth < size // 8, f"gateway RSS grew {rss.growth} bytes for a {size}-byte call"

    # It keeps serving: the admin's ordinary submission is stored.
    with grpc_channel(gw.api_address, _files(hostile, "admin")) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        small = gateway_pb2.SubmitTransactionsRequest(
            payloads=[gateway_pb2.DevicePayload(device_id="after-big", payload=b'{"seq": 1}')]
        )
        resp = stub.SubmitTransactions(small, timeout=10)
    assert resp.results[0].outcome == gateway_pb2.SubmitResult.STORED


@pytest.mark.integration
def test_api_calls_past_the_cap_are_refused_while_the_others_go_on(hostile: Hostile) -> None:
    gw = hostile.gateway
    status = gateway_pb2.GetStatusRequest()
    with grpc_channel(gw.api_address, _files(hostile, "reader")) as ch:
        watches = _hold(ch, API_MAX_CONCURRENT)
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.GetStatus(status, timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The cap is the server's: another client on another connection is refused too.
        with grpc_channel(gw.api_address, _files(hostile, "admin")) as other:
            with pytest.raises(grpc.RpcError) as e:
                gateway_pb2_grpc.GatewayServiceStub(other).GetStatus(status, timeout=10)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert all(w.is_active() for w in watches)  # type: ignore[attr-defined]
        for w in watches:
            w.cancel()  # type: ignore[attr-defined]
        answer = _served(stub.GetStatus, status)
        assert isinstance(answer, gateway_pb2.GatewayStatus)
        assert answer.gateway_id == hostile.deployment.gateway_id


# --- a ledger node -------------------------------------------------------------------------
# A node's budgets need no gateway: each test starts its own node in a TLS sandbox and
# speaks to it with the gateway's certificate.


def _budget_node(
    sandbox: Sandbox, name: str, extra: str | None = None
) -> tuple[Ledger, SoftSigner]:
    signer = SoftSigner.new("edge-budget")
    node = sandbox.ledger(
        name,
        {"edge-budget": signer.write_public_pem(sandbox.root / f"{name}.pem")},
        node_extra=(
            f"max_concurrent_rpcs = {LEDGER_MAX_CONCURRENT}\nmax_batch_bytes = {LEDGER_MAX_BATCH}\n"
            if extra is None
            else extra
        ),
    )
    return node, signer


def _add(signer: SoftSigner, leaves: list[bytes]) -> ledger_pb2.AddCheckpointRequest:
    """The first checkpoint of a log of `leaves`, as the gateway sends it."""
    return ledger_pb2.AddCheckpointRequest(
        gateway_id=signer.gateway_id,
        old_size=0,
        checkpoint=signer.checkpoint(leaves),
        leaves=leaves,
    )


@pytest.mark.integration
def test_a_checkpoint_over_the_node_limit_is_refused_before_the_node_buffers_it(
    sandbox: Sandbox,
) -> None:
    node, signer = _budget_node(sandbox, "ledger-budget-size")
    assert node.proc.proc is not None
    limit = ledger.max_receive_bytes(LEDGER_MAX_BATCH)
    # node.max_batch_bytes of leaves in the smallest leaves (the most framing) is taken.
    full = _add(signer, [i.to_bytes(8, "big") for i in range(LEDGER_MAX_BATCH // 8)])
    assert sum(len(leaf) for leaf in full.leaves) == LEDGER_MAX_BATCH
    assert full.ByteSize() <= limit
    huge = _add(signer, [b"\x5a" * MIB for _ in range(HUGE // MIB)])
    just_over = _add(signer, [b"\x5a" * (limit + 1)])
    with node.channel("gateway") as ch:
        stub = ledger_pb2_grpc.LedgerServiceStub(ch)
        cosigned = stub.AddCheckpoint(full, timeout=60)
        assert cosigned.size == LEDGER_MAX_BATCH // 8
        for request in (just_over, huge):
            assert request.ByteSize() > limit
            with RssPeak(node.proc.proc.pid) as rss, pytest.raises(grpc.RpcError) as e:
                stub.AddCheckpoint(request, timeout=60)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
            assert rss.growth < max(request.ByteSize() // 8, 16 * MIB), rss.growth
        # Still serving, and nothing of the refused calls stored.
        head = stub.GetHead(ledger_pb2.GetHeadRequest(gateway_id="edge-budget"), timeout=10)
        assert head.log_size == LEDGER_MAX_BATCH // 8


@pytest.mark.integration
def test_more_leaves_than_one_call_may_carry_are_refused(sandbox: Sandbox) -> None:
    # The default receive limit (16 MiB of leaves) lets this many empty leaves through.
    node, signer = _budget_node(sandbox, "ledger-budget-leaves", extra="")
    too_many = [b""] * (ledger.MAX_CHECKPOINT_LEAVES + 1)
    request = ledger_pb2.AddCheckpointRequest(
        gateway_id="edge-budget", old_size=0, checkpoint=signer.checkpoint([b""]), leaves=too_many
    )
    with node.channel("gateway") as ch:
        stub = ledger_pb2_grpc.LedgerServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.AddCheckpoint(request, timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert e.value.details() == (
            f"{ledger.MAX_CHECKPOINT_LEAVES + 1} leaves in one call: at most "
            f"{ledger.MAX_CHECKPOINT_LEAVES}; send the log in several checkpoints"
        )
        head = stub.GetHead(ledger_pb2.GetHeadRequest(gateway_id="edge-budget"), timeout=10)
        assert head.log_size == 0


@pytest.mark.integration
def test_node_calls_past_the_cap_are_refused_while_the_others_go_on(sandbox: Sandbox) -> None:
    node, signer = _budget_node(sandbox, "ledger-budget-calls")
    request = _add(signer, [b"tx 0", b"tx 1", b"tx 2"])
    with node.channel("gateway") as ch:
        watches = _hold(ch, LEDGER_MAX_CONCURRENT)
        stub = ledger_pb2_grpc.LedgerServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.AddCheckpoint(request, timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert all(w.is_active() for w in watches)  # type: ignore[attr-defined]
        for w in watches:
            w.cancel()  # type: ignore[attr-defined]
        cosigned = _served(stub.AddCheckpoint, request)
        assert isinstance(cosigned, ledger_pb2.Cosignature) and cosigned.size == 3


def test_budgets_come_from_the_config_and_are_checked() -> None:
    source = Path("/etc/edge-gateway/gateway.toml")
    base: dict[str, Any] = {
        "gateway": {"id": "gw-test"},
        "hsm": {"token_label": "edge", "pin_file": "/run/edge-gateway/pin"},
        "mqtt": {"plaintext": True, "max_payload_bytes": 4096},
        "spool": {},
        "forwarder": {"plaintext": True, "nodes": [{"id": "l1", "address": "127.0.0.1:7001"}]},
        "api": {"plaintext": True},
    }
    cfg = parse_gateway_config(base, source)
    assert cfg.api.max_concurrent_rpcs == 32
    # 10,000 payloads of 4 KiB (and their overhead) pass the 16 MiB ceiling: capped.
    assert api.max_receive_bytes(cfg.mqtt.max_payload_bytes) == 16 * MIB
    assert api.max_receive_bytes(64) == 10_000 * (64 + 1024)
    assert api.max_receive_bytes(16 * MIB) == 16 * MIB + 1024  # one payload always fits
    assert ledger.max_receive_bytes(16 * MIB) == 20 * MIB + 64 * 1024
    for bad in (0, 10_001, "8"):
        with pytest.raises(ConfigError) as e:
            parse_gateway_config(
                {**base, "api": {"plaintext": True, "max_concurrent_rpcs": bad}}, source
            )
        assert str(e.value) == (
            f"config {source}: api.max_concurrent_rpcs = {bad!r}: expected an integer from 1 "
            "to 10000"
        )
