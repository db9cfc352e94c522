"""TLS everywhere, on the real components: Mosquitto requiring client certificates or
passwords, the gateway API under mutual TLS with admin subjects, ledger nodes requiring the
gateway's certificate, and start-up checks that stop on a bad certificate with one line and
exit code 79."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import ssl
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from paho.mqtt.enums import CallbackAPIVersion

from gateway._pb.edgegateway.v1 import gateway_pb2, gateway_pb2_grpc, ledger_pb2, ledger_pb2_grpc
from gateway.common.errors import EXIT_CERTIFICATE, CertificateError, ConfigError
from gateway.edge.config import load_gateway_config, parse_gateway_config
from gateway.lab import demo, pki, simulate
from gateway.lab.sandbox import ClientFiles, Hsm, Sandbox, free_port
from gateway.ledger.config import check_certificates as check_ledger_certificates
from gateway.ledger.config import load_ledger_config
from tests.conftest import deploy


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --------------------------------------------------------------------------
# pki dev
# --------------------------------------------------------------------------


def test_pki_dev_writes_a_ca_and_leaves_with_private_keys_0600(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    before = dt.datetime.now(dt.UTC)
    run = subprocess.run(
        [sys.executable, "-m", "gateway", "pki", "dev", "--out", str(out), "--days", "7"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    names = ["ca", "mosquitto", "gateway-api", "ledger", "gateway", "operator", "reader", "device"]
    for name in names:
        assert f"{name}.crt" in run.stdout
        assert stat.S_IMODE((out / f"{name}.key").stat().st_mode) == 0o600
        verify = subprocess.run(
            ["openssl", "verify", "-CAfile", str(out / "ca.crt"), str(out / f"{name}.crt")],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr
    assert 'admin_subjects = ["CN=operator,O=Edge Gateway Dev PKI"]' in run.stdout
    server = x509.load_pem_x509_certificate((out / "ledger.crt").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    validity = server.not_valid_after_utc - before
    assert (
        dt.timedelta(days=7) - dt.timedelta(seconds=1) <= validity < dt.timedelta(days=7, minutes=1)
    )

    again = subprocess.run(
        [sys.executable, "-m", "gateway", "pki", "dev", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode != 0 and "--force" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------
# Configuration: admin_subjects, certificate checks as functions
# --------------------------------------------------------------------------


def _api_config(api: dict[str, object]) -> dict[str, object]:
    return {
        "gateway": {"id": "gw-test"},
        "hsm": {"token_label": "edge", "pin_file": "/run/edge-gateway/pin"},
        "mqtt": {"plaintext": True},
        "spool": {},
        "forwarder": {"plaintext": True, "nodes": [{"id": "l1", "address": "127.0.0.1:7001"}]},
        "api": api,
    }


def test_admin_subjects_need_mutual_tls() -> None:
    source = Path("/etc/edge-gateway/gateway.toml")
    tls = {"cert_file": "/tls/api.crt", "key_file": "/tls/api.key"}
    ops = "CN=ops,O=Carrier"
    with pytest.raises(ConfigError) as e:
        parse_gateway_config(_api_config({"tls": tls, "admin_subjects": [ops]}), source)
    assert str(e.value) == (
        f"config {source}: api.admin_subjects = ['{ops}']: only takes effect with mutual "
        "TLS: set api.tls.client_ca_file (the CA of client certificates), or remove "
        "admin_subjects"
    )
    with pytest.raises(ConfigError, match=re.escape(f"api.admin_subjects = '{ops}': expected a")):
        parse_gateway_config(_api_config({"tls": tls, "admin_subjects": ops}), source)
    mutual = {**tls, "client_ca_file": "/tls/ca.crt"}
    uri = "uri:spiffe://carrier.example/oss/submitter"
    cfg = parse_gateway_config(_api_config({"tls": mutual, "admin_subjects": [ops, uri]}), source)
    assert [i.text for i in cfg.api.admin_subjects] == [ops, uri]
    assert cfg.api.admin_subjects[1].uri == "spiffe://carrier.example/oss/submitter"
    assert parse_gateway_config(_api_config({"tls": mutual}), source).api.admin_subjects == ()


@pytest.fixture
def dev_pki(tmp_path: Path) -> pki.DevPki:
    return pki.make_dev_pki(tmp_path / "pki")


def _issue(
    p: pki.DevPki, out: Path, name: str, not_before: dt.datetime, not_after: dt.datetime
) -> tuple[Path, Path]:
    ca = pki.Authority.load(p.ca.cert, p.ca.key)
    key, cert = ca.issue(
        name, server=True, hosts=["127.0.0.1"], not_before=not_before, not_after=not_after
    )
    crt_path, key_path = out / f"{name}.crt", out / f"{name}.key"
    pki.write_cert(crt_path, cert)
    pki.write_key(key_path, key)
    return crt_path, key_path


def _ledger_cfg(tmp_path: Path, cert: Path, key: Path, ca: Path) -> Path:
    (tmp_path / "gw.pem").write_text("-----BEGIN PUBLIC KEY-----\n")
    cfg = tmp_path / "ledger.toml"
    cfg.write_text(
        f'[node]\nid = "l1"\ndb_path = "{tmp_path / "l.db"}"\n[node.tls]\n'
        f'cert_file = "{cert}"\nkey_file = "{key}"\nclient_ca_file = "{ca}"\n'
        f'[gateways]\ngw = {{ public_key = "{tmp_path / "gw.pem"}", '
        'client_subject = "CN=edge-gateway,O=Edge Gateway Dev PKI" }\n'
        f'[witness]\nkey_file = "{tmp_path / "witness.key"}"\n'
    )
    return cfg


def test_certificate_checks_name_the_key_the_path_and_the_fix(
    tmp_path: Path, dev_pki: pki.DevPki
) -> None:
    ok_cert, ok_key = dev_pki["ledger"].cert, dev_pki["ledger"].key
    check_ledger_certificates(load_ledger_config(_ledger_cfg(tmp_path, ok_cert, ok_key, ok_cert)))

    def problem(cert: Path, key: Path, ca: Path = dev_pki.ca.cert) -> str:
        cfg = load_ledger_config(_ledger_cfg(tmp_path, cert, key, ca))
        with pytest.raises(CertificateError) as e:
            check_ledger_certificates(cfg)
        assert e.value.exit_code == EXIT_CERTIFICATE == 79
        message = str(e.value)
        assert "\n" not in message and message.startswith(f"config {tmp_path / 'ledger.toml'}: ")
        return message

    old_cert, old_key = _issue(
        dev_pki, tmp_path, "old", _now() - dt.timedelta(days=30), _now() - dt.timedelta(days=1)
    )
    m = problem(old_cert, old_key)
    assert f"node.tls.cert_file {old_cert} expired on " in m and m.endswith(": renew it")
    future_cert, future_key = _issue(
        dev_pki, tmp_path, "future", _now() + dt.timedelta(days=1), _now() + dt.timedelta(days=30)
    )
    assert "is not valid before" in problem(future_cert, future_key)
    m = problem(ok_cert, dev_pki["reader"].key)
    assert f"node.tls.key_file {dev_pki['reader'].key} does not match node.tls.cert_file" in m
    assert "does not exist" in problem(tmp_path / "absent.crt", ok_key)
    assert "node.tls.key_file" in problem(ok_cert, tmp_path / "absent.key")
    assert "holds no PEM certificate" in problem(ok_key, ok_key)
    assert "is not a PEM private key" in problem(ok_cert, ok_cert)
    assert "node.tls.client_ca_file" in problem(ok_cert, ok_key, ca=tmp_path / "absent-ca.crt")
    m = problem(ok_cert, ok_key, ca=old_cert)
    assert "node.tls.client_ca_file" in m and "expired" in m
    # A bundle holding a retired certificate beside a current one is fine.
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(old_cert.read_bytes() + dev_pki.ca.cert.read_bytes())
    check_ledger_certificates(load_ledger_config(_ledger_cfg(tmp_path, ok_cert, ok_key, bundle)))

    encrypted = tmp_path / "encrypted.key"
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(ok_key.read_bytes(), None)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    assert "is encrypted" in problem(ok_cert, encrypted)


# --------------------------------------------------------------------------
# Start-up: `edge-gateway run` and `ledger-node` stop with one line and exit 79
# --------------------------------------------------------------------------


def _tls_gateway_config(sandbox: Sandbox) -> Path:
    # The certificate check runs before the HSM is opened, so no token is needed here.
    hsm = Hsm(conf=sandbox.root / "none.conf", token_label="absent", pin_file=sandbox.root / "pin")
    return sandbox.gateway_config("edge-tls-01", hsm, free_port(), [("l1", "127.0.0.1:1")], 1)


def _run(args: list[str], sandbox: Sandbox) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=sandbox.env,
    )


def _one_line_exit_79(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 79, out.stdout + out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_expired_certificate_stops_the_gateway_with_exit_79(sandbox: Sandbox) -> None:
    assert sandbox.pki is not None
    cfg = _tls_gateway_config(sandbox)
    old_cert, old_key = _issue(
        sandbox.pki,
        sandbox.root,
        "expired-api",
        _now() - dt.timedelta(days=400),
        dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    )
    api = sandbox.pki["gateway-api"]
    cfg.write_text(
        cfg.read_text().replace(str(api.cert), str(old_cert)).replace(str(api.key), str(old_key))
    )
    line = _one_line_exit_79(_run(["run", "--config", str(cfg)], sandbox))
    assert f"api.tls.cert_file {old_cert} expired on 2026-01-01 00:00:00 UTC" in line
    assert line.endswith("renew it")


def test_missing_certificate_file_stops_the_gateway_with_exit_79(sandbox: Sandbox) -> None:
    assert sandbox.pki is not None
    cfg = _tls_gateway_config(sandbox)
    gone = sandbox.root / "gone" / "gateway.crt"
    text = cfg.read_text()
    # The first cert_file is [mqtt.tls]'s.
    cfg.write_text(text.replace(str(sandbox.pki["gateway"].cert), str(gone), 1))
    line = _one_line_exit_79(_run(["run", "--config", str(cfg)], sandbox))
    assert f"mqtt.tls.cert_file {gone} does not exist" in line


def test_key_that_does_not_match_its_certificate_stops_the_gateway_with_exit_79(
    sandbox: Sandbox,
) -> None:
    assert sandbox.pki is not None
    cfg = _tls_gateway_config(sandbox)
    wrong = sandbox.pki["reader"].key
    cfg.write_text(cfg.read_text().replace(str(sandbox.pki["gateway-api"].key), str(wrong)))
    line = _one_line_exit_79(_run(["run", "--config", str(cfg)], sandbox))
    assert f"api.tls.key_file {wrong} does not match api.tls.cert_file" in line


def test_expired_certificate_stops_the_ledger_node_with_exit_79(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    assert sandbox.pki is not None
    old_cert, old_key = _issue(
        sandbox.pki,
        tmp_path,
        "old-ledger",
        _now() - dt.timedelta(days=60),
        _now() - dt.timedelta(1),
    )
    cfg = _ledger_cfg(tmp_path, old_cert, old_key, sandbox.pki.ca.cert)
    line = _one_line_exit_79(_run(["ledger-node", "--config", str(cfg)], sandbox))
    assert f"node.tls.cert_file {old_cert} expired on" in line


# --------------------------------------------------------------------------
# Mosquitto: client certificates, or a password over TLS
# --------------------------------------------------------------------------


def mqtt_connects(
    port: int, files: ClientFiles | None, user: str | None = None, password: str | None = None
) -> bool:
    """Whether the broker answers CONNECT with success within a few seconds."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{time.time_ns()}")
    if files is not None:
        files.apply_paho(c)
    if user is not None:
        c.username_pw_set(user, password)
    accepted = threading.Event()
    c.on_connect = lambda _c, _u, _f, rc, _p: accepted.set() if not rc.is_failure else None
    try:
        c.connect("127.0.0.1", port, keepalive=10)
    except (OSError, ssl.SSLError):
        return False
    c.loop_start()
    try:
        return accepted.wait(5)
    finally:
        c.disconnect()
        c.loop_stop()


@pytest.mark.integration
def test_mosquitto_requiring_certificates_refuses_a_client_without_one(sandbox: Sandbox) -> None:
    broker = sandbox.mosquitto()
    assert mqtt_connects(broker.port, sandbox.mqtt_tls("gateway"))
    assert mqtt_connects(broker.port, sandbox.mqtt_tls("device"))
    assert not mqtt_connects(broker.port, sandbox.mqtt_tls("none"))
    assert not mqtt_connects(broker.port, None)  # plain text on the TLS port

    # A certificate from another CA is refused too.
    other = pki.make_dev_pki(sandbox.root / "other-pki")
    stranger = ClientFiles(sandbox.pki.ca.cert, other["device"].cert, other["device"].key)  # type: ignore[union-attr]
    assert not mqtt_connects(broker.port, stranger)


@pytest.mark.integration
def test_simulator_publishes_over_tls_with_a_device_certificate(sandbox: Sandbox) -> None:
    broker = sandbox.mosquitto()
    opts = simulate.SimulateOptions(port=broker.port, devices=3, count=5, rate=1000, seconds=30)
    res = asyncio.run(simulate.run(sandbox.simulate_options(opts)))
    assert res.acknowledged == 15 and res.failed == 0
    assert "u'device-simulator'" in (sandbox.root / "mosquitto" / "mosquitto.log").read_text()


@pytest.mark.integration
def test_gateway_logs_in_to_mosquitto_with_a_password_over_tls(sandbox: Sandbox) -> None:
    assert sandbox.pki is not None
    broker = sandbox.mosquitto(name="mosquitto-pw", passwords={"edge-gw": "correct horse"})
    server_only = sandbox.mqtt_tls("none")
    assert mqtt_connects(broker.port, server_only, "edge-gw", "correct horse")
    assert not mqtt_connects(broker.port, server_only, "edge-gw", "wrong")
    assert not mqtt_connects(broker.port, server_only)

    hsm = sandbox.hsm()
    pw_file = sandbox.root / "mqtt-password"
    pw_file.write_text("correct horse\n")
    pw_file.chmod(0o600)
    port = free_port()
    cfg = sandbox.gateway_config(
        "edge-pw-01",
        hsm,
        broker.port,
        [("ledger-1", f"127.0.0.1:{port}")],
        quorum=1,
        mqtt_password=("edge-gw", pw_file),
    )
    pem = sandbox.root / "edge-pw-01.pem"
    sandbox.hsm_init(cfg, pem)
    sandbox.ledger("ledger-1", {"edge-pw-01": pem}, port=port)
    gw = sandbox.gateway("edge-pw-01", cfg, pem)  # READY=1 only once subscribed
    assert demo.gateway_status(gw).mqtt_connected
    assert "u'edge-gw'" in (sandbox.root / "mosquitto-pw" / "mosquitto.log").read_text()
    assert gw.proc.terminate(30) == 0


# --------------------------------------------------------------------------
# The gateway API under mutual TLS; a ledger node requiring client certificates
# --------------------------------------------------------------------------


def _submit(ch: grpc.Channel, seq: int) -> gateway_pb2.SubmitTransactionsResponse:
    resp: gateway_pb2.SubmitTransactionsResponse = gateway_pb2_grpc.GatewayServiceStub(
        ch
    ).SubmitTransactions(
        gateway_pb2.SubmitTransactionsRequest(
            payloads=[gateway_pb2.DevicePayload(device_id="oss-1", payload=b'{"seq": %d}' % seq)]
        ),
        timeout=10,
    )
    return resp


@pytest.mark.integration
def test_api_reader_sees_status_admin_may_submit_and_no_certificate_no_handshake(
    sandbox: Sandbox,
) -> None:
    d = deploy(sandbox, nodes=1, quorum=1)
    gw = d.start_gateway()

    with gw.channel("admin") as ch:
        r = _submit(ch, 1)
        assert r.results[0].outcome == gateway_pb2.SubmitResult.STORED
        tx_id = r.results[0].tx_id
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        assert stub.GetTransaction(gateway_pb2.GetTransactionRequest(tx_id=tx_id), timeout=10)
        demo.wait_drained(gw, 1, timeout=30, all_nodes=True)
        assert stub.GetBatch(gateway_pb2.GetBatchRequest(seq=0), timeout=10).checkpoint

    for role in ("reader", "device"):
        with gw.channel(role) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            st = stub.GetStatus(gateway_pb2.GetStatusRequest(), timeout=10)
            assert st.gateway_id == d.gateway_id
            health = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            calls = [
                lambda s=stub: _submit(ch, 2),
                lambda s=stub: s.GetTransaction(
                    gateway_pb2.GetTransactionRequest(tx_id=tx_id), timeout=10
                ),
                lambda s=stub: s.GetBatch(gateway_pb2.GetBatchRequest(seq=0), timeout=10),
            ]
            for call in calls:
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "api.admin_subjects" in (e.value.details() or "")

    with gw.channel("none") as ch, pytest.raises(grpc.RpcError) as e:
        gateway_pb2_grpc.GatewayServiceStub(ch).GetStatus(gateway_pb2.GetStatusRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE

    # The CLI: status as the reader works; a proof needs the admin certificate.
    out = _run(["status", "--address", gw.api_address, *gw.cli_args("reader")], sandbox)
    assert out.returncode == 0 and d.gateway_id in out.stdout, out.stderr
    args = ["proof", tx_id, "--address", gw.api_address, "--public-key", str(d.public_key)]
    out = _run([*args, *gw.cli_args("reader")], sandbox)
    assert out.returncode == 1 and "PERMISSION_DENIED" in out.stderr
    assert "Traceback" not in out.stderr
    out = _run([*args, *gw.cli_args("admin")], sandbox)
    assert out.returncode == 0 and "inclusion proof verified" in out.stdout, out.stderr
    assert "refused to CN=reader" in gw.proc.log_text()

    # A ledger node requires a client certificate from the CA, too.
    lg = d.ledgers[0]
    request = ledger_pb2.GetConsistencyRequest(gateway_id=d.gateway_id, old_size=1)
    with lg.channel("gateway") as ch:
        proof = ledger_pb2_grpc.LedgerServiceStub(ch).GetConsistency(request, timeout=10)
        assert proof.old_size == 1 and proof.checkpoint
    with lg.channel("none") as ch, pytest.raises(grpc.RpcError) as e:
        ledger_pb2_grpc.LedgerServiceStub(ch).GetConsistency(request, timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(lg.address) as ch, pytest.raises(grpc.RpcError) as e:
        ledger_pb2_grpc.LedgerServiceStub(ch).GetConsistency(request, timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert gw.proc.terminate(30) == 0


# --------------------------------------------------------------------------
# Plain text, only because the config says so
# --------------------------------------------------------------------------


@pytest.mark.integration
def test_plaintext_mode_runs_end_to_end_when_every_section_says_so(tmp_path: Path) -> None:
    sb = Sandbox(tmp_path / "plain", tls=False)
    try:
        d = deploy(sb, nodes=1, quorum=1)
        text = d.config.read_text()
        assert text.count("plaintext = true") == 3 and ".tls]" not in text
        assert load_gateway_config(d.config).api.tls is None
        gw = d.start_gateway()
        # READY=1 follows the broker's SUBACK, so a publish right away has a subscriber.
        opts = simulate.SimulateOptions(port=d.broker.port, devices=2, count=5, rate=1000)
        res = asyncio.run(simulate.run(sb.simulate_options(opts)))
        assert res.acknowledged == 10
        assert demo.wait_drained(gw, 10, timeout=30).transactions_stored == 10
        out = _run(["status", "--address", gw.api_address, *gw.cli_args()], sb)
        assert out.returncode == 0 and "--plaintext" in gw.cli_args()
        assert gw.proc.terminate(30) == 0
    finally:
        sb.close()
