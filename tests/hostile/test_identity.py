"""Roles are matched on a certificate's exact identity: its SAN URI, or its whole subject
DN compared attribute by attribute, in order. A certificate from the same CA that merely
spells the admin's subject in its common name, or carries the admin's attributes in
another order, or a URI that starts like the admin's, is refused."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from gateway._pb.edgegateway.v1 import gateway_pb2, gateway_pb2_grpc
from gateway.common.errors import ConfigError
from gateway.common.identity import parse_identity
from gateway.edge.config import parse_gateway_config
from gateway.lab import pki
from gateway.lab.sandbox import ClientFiles, Hsm, Sandbox, free_port, grpc_channel
from tests.hostile.conftest import OSS_URI, Hostile, issue

OPERATOR_DN = f"CN=operator,O={pki.ORGANIZATION}"
NO_SUCH_TX = "00" * 32


def _name(*attrs: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attrs])


def _admin_call(address: str, files: ClientFiles) -> grpc.StatusCode:
    """GetTransaction for a transaction that does not exist: NOT_FOUND for an admin (the
    call reached the handler), PERMISSION_DENIED for anyone else."""
    with grpc_channel(address, files) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        try:
            stub.GetTransaction(gateway_pb2.GetTransactionRequest(tx_id=NO_SUCH_TX), timeout=10)
        except grpc.RpcError as e:
            code: grpc.StatusCode = e.code()
            return code
    return grpc.StatusCode.OK


@pytest.mark.integration
def test_only_the_exact_admin_identity_passes(hostile: Hostile) -> None:
    sb, gw = hostile.sandbox, hostile.gateway
    org = (NameOID.ORGANIZATION_NAME, pki.ORGANIZATION)
    impostors = {
        # The admin's whole subject string as the common name, same organisation.
        "cn-spells-admin": issue(
            sb, "cn-spells-admin", _name(org, (NameOID.COMMON_NAME, OPERATOR_DN))
        ),
        # ... and with nothing else in the subject.
        "cn-only": issue(sb, "cn-only", _name((NameOID.COMMON_NAME, OPERATOR_DN))),
        # The admin's bare common name, which the admin list used to accept.
        "cn-operator-only": issue(sb, "cn-operator-only", _name((NameOID.COMMON_NAME, "operator"))),
        # The admin's attributes in the other order (prints as "O=...,CN=operator").
        "reordered": issue(sb, "reordered", _name((NameOID.COMMON_NAME, "operator"), org)),
        # The admin's URI as a prefix, and as a common name without the SAN.
        "uri-prefix": issue(sb, "uri-prefix", uri=OSS_URI + "/evil"),
        "uri-as-cn": issue(sb, "uri-as-cn", _name(org, (NameOID.COMMON_NAME, f"uri:{OSS_URI}"))),
    }
    for label, files in impostors.items():
        assert _admin_call(gw.api_address, files) == grpc.StatusCode.PERMISSION_DENIED, label

    # The real operator (full DN) and a client carrying the admin SAN URI reach the handler.
    operator = sb.client_files("admin")
    assert operator is not None
    assert _admin_call(gw.api_address, operator) == grpc.StatusCode.NOT_FOUND
    oss = issue(sb, "oss-submitter", uri=OSS_URI)
    assert _admin_call(gw.api_address, oss) == grpc.StatusCode.NOT_FOUND


def _api(api: dict[str, object]) -> dict[str, object]:
    return {
        "gateway": {"id": "gw-test"},
        "hsm": {"token_label": "edge", "pin_file": "/run/edge-gateway/pin"},
        "mqtt": {"plaintext": True},
        "spool": {},
        "forwarder": {"plaintext": True, "nodes": [{"id": "l1", "address": "127.0.0.1:7001"}]},
        "api": api,
    }


MUTUAL = {"cert_file": "/tls/api.crt", "key_file": "/tls/api.key", "client_ca_file": "/ca.crt"}


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ("operator", "write the certificate's full subject DN, e.g. \"CN=operator,O="),
        ("CN=operator, O=Example", "not an RFC 4514 DN"),
        ("cn=operator,O=Example", "not an RFC 4514 DN"),
        ("uri:", "not a URI after 'uri:'"),
        ("uri:spiffe", "not a URI after 'uri:'"),
        ("", "an empty identity"),
    ],
)
def test_an_admin_entry_that_is_not_an_exact_identity_is_refused(entry: str, fragment: str) -> None:
    source = Path("/etc/edge-gateway/gateway.toml")
    data = _api({"tls": MUTUAL, "admin_subjects": [OPERATOR_DN, entry]})
    with pytest.raises(ConfigError) as e:
        parse_gateway_config(data, source)
    message = str(e.value)
    assert message.startswith(f"config {source}: api.admin_subjects[1] = {entry!r}: ")
    assert fragment in message and "\n" not in message
    assert e.value.exit_code == 78


def test_a_dn_entry_is_compared_as_a_structure() -> None:
    dn = parse_identity(OPERATOR_DN)
    assert dn.subject == _name(
        (NameOID.ORGANIZATION_NAME, pki.ORGANIZATION), (NameOID.COMMON_NAME, "operator")
    )
    assert dn.subject != _name(
        (NameOID.COMMON_NAME, "operator"), (NameOID.ORGANIZATION_NAME, pki.ORGANIZATION)
    )
    assert parse_identity(f"uri:{OSS_URI}").uri == OSS_URI


@pytest.mark.integration
def test_a_bare_common_name_stops_the_start_with_one_line_and_exit_78(sandbox: Sandbox) -> None:
    # The configuration is read before the HSM is opened: no token is needed.
    hsm = Hsm(conf=sandbox.root / "none.conf", token_label="absent", pin_file=sandbox.root / "pin")
    cfg = sandbox.gateway_config("edge-cn-01", hsm, free_port(), [("l1", "127.0.0.1:1")], 1)
    text = cfg.read_text()
    assert f'admin_subjects = ["{OPERATOR_DN}"]' in text
    cfg.write_text(text.replace(f'["{OPERATOR_DN}"]', '["operator"]'))
    run = sandbox.run_gateway_once(cfg)
    assert run.returncode == 78, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr
    assert re.search(
        r"api\.admin_subjects\[0\] = 'operator': a bare name is not an identity .*"
        r"full subject DN",
        lines[0],
    ), lines[0]
