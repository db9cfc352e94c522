"""A ledger node under mutual TLS binds each gateway id to that gateway's certificate: only
it may add checkpoints of the gateway's log for the node to cosign or read its head, and
only it and the node's readers may read the node's consistency proofs of that log. Any
other certificate from the same CA (a device, another gateway, one whose common name spells
the gateway's subject) is refused PERMISSION_DENIED, and the log is left as it was."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from gateway._pb.edgegateway.v1 import ledger_pb2, ledger_pb2_grpc
from gateway.common.errors import ConfigError
from gateway.common.identity import parse_identity
from gateway.lab import pki
from gateway.lab.sandbox import ClientFiles, Sandbox, grpc_channel
from gateway.ledger import node as ledger
from gateway.ledger.config import parse_ledger_config
from tests.hostile.conftest import issue
from tests.test_ledger import GatewayLog, SoftSigner

EDGE_02_URI = "spiffe://carrier.example/gateway/edge-02"


class Client:
    """LedgerService calls with one certificate; each returns the result or the status."""

    def __init__(self, address: str, files: ClientFiles) -> None:
        self.address = address
        self.files = files

    def _call(self, fn: Callable[[ledger_pb2_grpc.LedgerServiceStub], Any]) -> Any:
        with grpc_channel(self.address, self.files) as ch:
            try:
                return fn(ledger_pb2_grpc.LedgerServiceStub(ch))
            except grpc.RpcError as e:
                code: grpc.StatusCode = e.code()
                return code

    def add(self, request: ledger_pb2.AddCheckpointRequest) -> Any:
        return self._call(lambda s: s.AddCheckpoint(request, timeout=10))

    def head(self, gateway_id: str) -> Any:
        return self._call(
            lambda s: s.GetHead(ledger_pb2.GetHeadRequest(gateway_id=gateway_id), timeout=10)
        )

    def consistency(self, gateway_id: str, old_size: int = 1) -> Any:
        request = ledger_pb2.GetConsistencyRequest(gateway_id=gateway_id, old_size=old_size)
        return self._call(lambda s: s.GetConsistency(request, timeout=10))


DENIED = grpc.StatusCode.PERMISSION_DENIED


def _grown(log: GatewayLog, n: int) -> ledger_pb2.AddCheckpointRequest:
    log.grow(n)
    return log.request()


@pytest.mark.integration
def test_each_gateway_id_is_bound_to_its_certificate_and_reads_need_a_reader(
    sandbox: Sandbox,
) -> None:
    sb = sandbox
    assert sb.pki is not None
    edge01, edge02 = SoftSigner.new("edge-01"), SoftSigner.new("edge-02")
    keys = {
        "edge-01": edge01.write_public_pem(sb.root / "acl-edge-01.pem"),
        "edge-02": edge02.write_public_pem(sb.root / "acl-edge-02.pem"),
    }
    # edge-01 is the sandbox's gateway certificate (by DN), edge-02 one with a SAN URI.
    node = sb.ledger("ledger-acl", keys, clients={"edge-02": f"uri:{EDGE_02_URI}"})
    files = {role: sb.client_files(role) for role in ("gateway", "admin", "device")}
    assert all(f is not None for f in files.values())
    gateway, operator, device = (Client(node.address, f) for f in files.values() if f)
    other_gateway = Client(node.address, issue(sb, "acl-edge-02", uri=EDGE_02_URI))
    org = x509.NameAttribute(NameOID.ORGANIZATION_NAME, pki.ORGANIZATION)
    spelt = x509.NameAttribute(NameOID.COMMON_NAME, sb.pki["gateway"].subject)
    forged = Client(node.address, issue(sb, "acl-forged", x509.Name([org, spelt])))
    log01, log02 = edge01.log(), edge02.log()

    # Each gateway adds checkpoints of its own log and reads its head.
    cosigned = gateway.add(_grown(log01, 3))
    assert isinstance(cosigned, ledger_pb2.Cosignature) and cosigned.size == 3, cosigned
    log01.cosigned = 3
    assert gateway.head("edge-01").log_size == 3
    assert isinstance(other_gateway.add(_grown(log02, 2)), ledger_pb2.Cosignature)
    log02.cosigned = 2
    assert other_gateway.head("edge-02").log_size == 2

    # A genuine, correctly signed checkpoint of edge-01's log from any other certificate
    # is refused, and so is edge-02's from edge-01's certificate.
    next01 = _grown(log01, 2)
    for client in (other_gateway, operator, device, forged):
        assert client.add(next01) == DENIED
        assert client.head("edge-01") == DENIED
    assert gateway.add(_grown(log02, 1)) == DENIED
    assert gateway.head("edge-02") == DENIED

    # Reads: a gateway its own log's; the operator (node.readers) every gateway's; nobody
    # else. What they read is the node's cosigned checkpoint.
    for client, gid, size in [
        (gateway, "edge-01", 3),
        (other_gateway, "edge-02", 2),
        (operator, "edge-01", 3),
        (operator, "edge-02", 2),
    ]:
        proof = client.consistency(gid)
        assert isinstance(proof, ledger_pb2.ConsistencyProof), (gid, proof)
        assert f"\n{size}\n".encode() in proof.checkpoint
    assert gateway.consistency("edge-02") == DENIED
    assert other_gateway.consistency("edge-01") == DENIED
    for client in (device, forged):
        assert client.consistency("edge-01") == DENIED
        assert client.consistency("edge-02") == DENIED
    assert operator.consistency("edge-99") == grpc.StatusCode.NOT_FOUND
    assert device.consistency("edge-99") == DENIED

    # The refusals left the logs as they were: the gateways continue them.
    assert gateway.add(next01).size == 5
    assert gateway.head("edge-01").log_size == 5
    assert other_gateway.head("edge-02").log_size == 2


def _ledger(tls: dict[str, str] | None, gateways: dict[str, Any], **node: Any) -> dict[str, Any]:
    n: dict[str, Any] = {"id": "l1", "db_path": "l.db", **node}
    if tls is None:
        n["plaintext"] = True
    else:
        n["tls"] = tls
    return {"node": n, "gateways": gateways, "witness": {"key_file": "/keys/witness.key"}}


def test_ledger_bindings_are_checked_at_load(tmp_path: Path) -> None:
    source = tmp_path / "ledger.toml"
    pem = tmp_path / "edge-01.pem"
    pem.write_text("-----BEGIN PUBLIC KEY-----\n")
    server = {"cert_file": "/tls/l.crt", "key_file": "/tls/l.key"}
    mutual = {**server, "client_ca_file": "/tls/ca.crt"}
    dn = "CN=edge-01,O=Example Carrier"
    bound = {"public_key": str(pem), "client_subject": dn}

    def error(data: dict[str, Any]) -> str:
        with pytest.raises(ConfigError) as e:
            parse_ledger_config(data, source)
        assert e.value.exit_code == 78 and "\n" not in str(e.value)
        return str(e.value)

    # Without client certificates the path alone still works (plain text, or no client CA).
    for tls in (None, server):
        cfg = parse_ledger_config(_ledger(tls, {"edge-01": str(pem)}), source)
        assert cfg.gateway_keys == {"edge-01": pem} and not cfg.gateway_clients
    cfg = parse_ledger_config(_ledger(mutual, {"edge-01": bound}, readers=[dn]), source)
    assert cfg.gateway_clients["edge-01"].subject == x509.Name.from_rfc4514_string(dn)
    assert [r.text for r in cfg.readers] == [dn]
    uri = {"public_key": str(pem), "client_uri": f"uri:{EDGE_02_URI}"}
    cfg = parse_ledger_config(_ledger(mutual, {"edge-01": uri}), source)
    assert cfg.gateway_clients["edge-01"].uri == EDGE_02_URI

    m = error(_ledger(mutual, {"edge-01": str(pem)}))
    assert f"gateways.edge-01 = {str(pem)!r}: with node.tls.client_ca_file set, bind" in m
    m = error(_ledger(mutual, {"edge-01": {"public_key": str(pem)}}))
    assert "gateways.edge-01.client_subject is missing" in m
    m = error(_ledger(mutual, {"edge-01": {**bound, "client_subject": "edge-gateway"}}))
    assert "gateways.edge-01.client_subject = 'edge-gateway': a bare name" in m
    m = error(_ledger(mutual, {"edge-01": {**bound, "client_subject": f"uri:{EDGE_02_URI}"}}))
    assert "client_subject" in m and "expected the full subject DN" in m
    m = error(_ledger(mutual, {"edge-01": {**uri, "client_uri": EDGE_02_URI}}))
    assert "gateways.edge-01.client_uri" in m and 'expected "uri:<SAN URI>"' in m
    m = error(_ledger(mutual, {"edge-01": {**bound, **uri}}))
    assert "set one of client_subject and client_uri" in m
    m = error(_ledger(mutual, {"edge-01": {**bound, "public_key": str(tmp_path / "x.pem")}}))
    assert "gateways.edge-01.public_key" in m and "public key PEM file" in m
    m = error(_ledger(mutual, {"edge-01": {**bound, "client_sbject": dn}}))
    assert "gateways.edge-01.client_sbject" in m and "unknown key" in m
    m = error(_ledger(mutual, {"edge-01": bound}, readers=["operator"]))
    assert "node.readers[0] = 'operator': a bare name" in m
    for tls in (None, server):
        m = error(_ledger(tls, {"edge-01": bound}))
        assert "gateways.edge-01.client_subject" in m and "only takes effect with mutual TLS" in m
        m = error(_ledger(tls, {"edge-01": str(pem)}, readers=[dn]))
        assert "node.readers" in m and "set node.tls.client_ca_file" in m


@pytest.mark.integration
def test_an_unbound_gateway_under_mutual_tls_stops_the_node_with_exit_78(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    assert sandbox.pki is not None
    pem = SoftSigner.new("edge-01").write_public_pem(tmp_path / "edge-01.pem")
    cfg = tmp_path / "ledger.toml"
    ledger = sandbox.pki["ledger"]
    cfg.write_text(
        f'[node]\nid = "l1"\nlisten = "127.0.0.1:0"\ndb_path = "{tmp_path / "l.db"}"\n'
        f'[node.tls]\ncert_file = "{ledger.cert}"\nkey_file = "{ledger.key}"\n'
        f'client_ca_file = "{sandbox.pki.ca.cert}"\n[gateways]\n"edge-01" = "{pem}"\n'
        f'[witness]\nkey_file = "{tmp_path / "witness.key"}"\n'
    )
    run = subprocess.run(
        [sys.executable, "-m", "gateway", "ledger-node", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        env=sandbox.env,
    )
    assert run.returncode == 78, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr
    assert "gateways.edge-01" in lines[0] and "client_subject" in lines[0]


def test_gateways_bound_to_one_certificate_are_found_for_the_start_warning() -> None:
    dn = "CN=edge-gateway,O=Example Carrier"
    access = ledger.ClientAccess(
        {
            "edge-01": parse_identity(dn),
            "edge-02": parse_identity(dn),
            "edge-03": parse_identity(f"uri:{EDGE_02_URI}"),
            "edge-04": parse_identity("O=Example Carrier,CN=edge-gateway"),
        }
    )
    assert access.shared() == [["edge-01", "edge-02"]]


@pytest.mark.integration
def test_only_a_gateways_own_certificate_adds_checkpoints_of_its_own_log(
    sandbox: Sandbox,
) -> None:
    sb = sandbox
    assert sb.pki is not None
    edge01, edge02 = SoftSigner.new("edge-01"), SoftSigner.new("edge-02")
    keys = {
        "edge-01": edge01.write_public_pem(sb.root / "cp-edge-01.pem"),
        "edge-02": edge02.write_public_pem(sb.root / "cp-edge-02.pem"),
    }
    node = sb.ledger("ledger-cp", keys, clients={"edge-02": f"uri:{EDGE_02_URI}"})
    files = {role: sb.client_files(role) for role in ("gateway", "admin", "device")}
    gateway, operator, device = (Client(node.address, f) for f in files.values() if f)
    other_gateway = Client(node.address, issue(sb, "cp-edge-02", uri=EDGE_02_URI))
    # The origins the node derives by default (witness.log_domain unset).
    origin01, origin02 = edge01.origin, edge02.origin
    assert origin01 == "edge-gateway.invalid/edge-gateway/edge-01"
    leaves = [f"tx {i}".encode() for i in range(5)]
    cp01 = edge01.checkpoint(leaves)

    def add(client: Client, gateway_id: str, signed: bytes, sent: list[bytes]) -> Any:
        request = ledger_pb2.AddCheckpointRequest(
            gateway_id=gateway_id, old_size=0, checkpoint=signed, leaves=sent
        )
        return client._call(lambda s: s.AddCheckpoint(request, timeout=10))

    # Other certificates cannot add edge-01's checkpoints, genuine as they are.
    for client in (other_gateway, operator, device):
        assert add(client, "edge-01", cp01, leaves) == DENIED
    # edge-01's certificate cannot pass another log's checkpoint off as its own, nor a
    # checkpoint of its origin signed by another key.
    assert add(gateway, "edge-01", edge02.checkpoint(leaves, origin02), leaves) == DENIED
    assert add(gateway, "edge-01", edge02.checkpoint(leaves, origin01), leaves) == DENIED
    # Leaves that do not give the checkpoint's root are refused; nothing is stored.
    wrong = [*leaves[:4], b"not tx 4"]
    assert add(gateway, "edge-01", cp01, wrong) == grpc.StatusCode.INVALID_ARGUMENT
    assert add(gateway, "edge-01", cp01, leaves[:4]) == grpc.StatusCode.INVALID_ARGUMENT
    assert gateway.head("edge-01").log_size == 0

    # The gateway's own certificate adds its own: cosigned, and the node's log grows.
    cosig = add(gateway, "edge-01", cp01, leaves)
    assert isinstance(cosig, ledger_pb2.Cosignature) and cosig.size == 5, cosig
    assert cosig.line.startswith("\u2014 ledger.sandbox.invalid/ledger-witness/ledger-cp ")
    assert gateway.head("edge-01").log_size == 5
    # Sent again, the same cosignature; an old size that is no longer the node's is refused.
    assert add(gateway, "edge-01", cp01, leaves) == cosig
    more = edge01.checkpoint([*leaves, b"tx 5"])
    assert add(gateway, "edge-01", more, [b"tx 5"]) == grpc.StatusCode.FAILED_PRECONDITION
