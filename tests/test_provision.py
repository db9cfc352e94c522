"""First-run provisioning commands on real SoftHSM2: setup, config init/check, device add.

The full install as root, with the package's system user, under a real systemd is
tests/test_systemd_install.py; these check each command's files, owners, modes and
one-line failures.
"""

from __future__ import annotations

import datetime as dt
import os
import pwd
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from gateway.edge import provision
from gateway.edge.config import check_certificates, load_gateway_config
from gateway.edge.profiles import ProfileSet
from gateway.lab import pki as devpki
from gateway.lab.sandbox import Hsm, Sandbox, free_port

pytestmark = pytest.mark.integration


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def fresh(tmp_path: Path) -> tuple[Sandbox, Path, dict[str, str]]:
    """A gateway config whose token, PIN, profiles and keys do not exist yet."""
    sb = Sandbox(tmp_path / "sb")
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
    env = dict(os.environ, SOFTHSM2_CONF=str(conf))
    hsm = Hsm(conf=conf, token_label="edge-box", pin_file=tmp_path / "etc" / "hsm-pin")
    extra = (
        f'[profiles]\ndir = "{tmp_path / "etc" / "profiles"}"\n'
        f'keys_dir = "{tmp_path / "etc" / "keys"}"\n'
        f'pseudonym_key_file = "{tmp_path / "etc" / "pseudonym.key"}"\n'
    )
    cfg = sb.gateway_config(
        "edge-prov-01", hsm, free_port(), [("l1", "127.0.0.1:1")], 1, extra=extra
    )
    yield sb, cfg, env
    sb.close()


def test_setup_creates_everything_once_with_safe_modes_and_config_check_passes(
    fresh: tuple[Sandbox, Path, dict[str, str]], tmp_path: Path
) -> None:
    _sb, cfg, env = fresh
    etc = tmp_path / "etc"
    pem = etc / "batch-key.pem"
    out = cli("setup", "--config", str(cfg), "--pem-out", str(pem), env=env)
    assert out.returncode == 0, out.stderr
    assert "created  HSM token: edge-box" in out.stdout
    assert mode(etc / "hsm-pin") == 0o600
    assert mode(etc / "hsm-pin-so") == 0o600
    assert mode(etc / "pseudonym.key") == 0o600
    assert len(bytes.fromhex((etc / "pseudonym.key").read_text().strip())) == 32
    assert mode(etc / "profiles") == 0o750 and mode(etc / "keys") == 0o750
    shipped = {p.name for p in (etc / "profiles").glob("*.toml")}
    assert {"nbiot-meter.toml", "lte-m-tracker.toml"} <= shipped
    assert pem.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    first_pin = (etc / "hsm-pin").read_text()

    again = cli("setup", "--config", str(cfg), "--pem-out", str(pem), env=env)
    assert again.returncode == 0, again.stderr
    assert "kept     HSM token: edge-box" in again.stdout
    assert "kept     HSM user PIN" in again.stdout
    assert (etc / "hsm-pin").read_text() == first_pin
    assert pem.read_text() == (etc / "batch-key.pem").read_text()

    check = cli("config", "check", "--config", str(cfg), env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "logged in to token 'edge-box'" in check.stdout
    assert "sensitive, not extractable" in check.stdout
    assert "nothing was started" in check.stdout
    assert "warning" not in check.stdout  # the sandbox's dev PKI is valid for 90 days


def test_config_check_fails_with_one_line_and_its_code(
    fresh: tuple[Sandbox, Path, dict[str, str]], tmp_path: Path
) -> None:
    sb, cfg, env = fresh
    assert (
        cli("setup", "--config", str(cfg), "--pem-out", str(tmp_path / "k.pem"), env=env).returncode
        == 0
    )
    # A wrong PIN: 77, one line, never retried.
    pin = tmp_path / "etc" / "hsm-pin"
    good = pin.read_text()
    pin.write_text("000000\n")
    bad = cli("config", "check", "--config", str(cfg), env=env)
    assert bad.returncode == 77, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "refused the PIN" in bad.stderr
    pin.write_text(good)
    # A missing TLS file: 79.
    assert sb.pki is not None
    sb.pki["gateway-api"].cert.rename(tmp_path / "moved.crt")
    missing = cli("config", "check", "--config", str(cfg), env=env)
    assert missing.returncode == 79, missing.stderr
    assert "api.tls.cert_file" in missing.stderr and "Traceback" not in missing.stderr
    # A directory as --config: 78.
    as_dir = cli("config", "check", "--config", str(tmp_path), env=env)
    assert as_dir.returncode == 78, as_dir.stderr
    assert "Traceback" not in as_dir.stderr


def test_config_check_warns_about_a_certificate_expiring_within_30_days(
    tmp_path: Path,
) -> None:
    made = devpki.make_dev_pki(tmp_path / "pki", days=10)
    sb = Sandbox(tmp_path / "sb")
    try:
        cfg_path = sb.gateway_config(
            "edge-exp", Hsm(tmp_path, "t", tmp_path / "pin"), 1, [("l1", "127.0.0.1:1")], 1
        )
        cfg = load_gateway_config(cfg_path)
        from dataclasses import replace

        from gateway.common.tomlconfig import TlsClient

        tls = TlsClient(made.ca.cert, made["gateway"].cert, made["gateway"].key)
        cfg = replace(cfg, mqtt=replace(cfg.mqtt, tls=tls))
        warnings = check_certificates(cfg, now=dt.datetime.now(dt.UTC))
        assert any("mqtt.tls.cert_file" in w and "in 9 days" in w for w in warnings), warnings
        # One warning per file, though mqtt.tls and forwarder.tls may share it.
        assert len(warnings) == len({w.split()[3] for w in warnings}), warnings
        assert check_certificates(cfg, warn_days=5) == []
    finally:
        sb.close()


def test_config_init_writes_a_config_that_loads_with_this_sites_values(tmp_path: Path) -> None:
    out = tmp_path / "gateway.toml"
    done = cli(
        "config",
        "init",
        "--out",
        str(out),
        "--gateway-id",
        "edge-bj-7",
        "--mqtt",
        "10.0.0.5:8883",
        "--ledger",
        "a=10.0.1.1:7001",
        "--ledger",
        "b=10.0.1.2:7001",
        "--ledger",
        "c=[2001:db8::1]:7001",
    )
    assert done.returncode == 0, done.stderr
    data = tomllib.loads(out.read_text())
    assert data["gateway"]["id"] == "edge-bj-7" and data["mqtt"]["client_id"] == "edge-bj-7"
    assert (data["mqtt"]["host"], data["mqtt"]["port"]) == ("10.0.0.5", 8883)
    assert [n["address"] for n in data["forwarder"]["nodes"]] == [
        "10.0.1.1:7001",
        "10.0.1.2:7001",
        "[2001:db8::1]:7001",
    ]
    assert data["forwarder"]["quorum"] == 2
    # The log's origin names this gateway, not the example's.
    assert data["log"]["origin"] == "ledger.carrier.example/edge-gateway/edge-bj-7"
    assert mode(out) == 0o640
    load_gateway_config(out)
    again = cli(
        "config",
        "init",
        "--out",
        str(out),
        "--gateway-id",
        "x",
        "--mqtt",
        "h:1",
        "--ledger",
        "a=h:2",
    )
    assert again.returncode == 73 and "exists" in again.stderr
    bad = cli(
        "config",
        "init",
        "--out",
        str(tmp_path / "b.toml"),
        "--gateway-id",
        "x",
        "--mqtt",
        "no-port",
        "--ledger",
        "a=h:2",
    )
    assert bad.returncode == 64 and "--mqtt 'no-port'" in bad.stderr


def test_device_add_gives_an_hmac_device_a_key_the_gateway_loads(
    fresh: tuple[Sandbox, Path, dict[str, str]], tmp_path: Path
) -> None:
    _sb, cfg_path, env = fresh
    assert (
        cli(
            "setup", "--config", str(cfg_path), "--pem-out", str(tmp_path / "k.pem"), env=env
        ).returncode
        == 0
    )
    added = cli(
        "device",
        "add",
        "meter-0001",
        "--profile",
        "nbiot-meter",
        "--config",
        str(cfg_path),
        env=env,
    )
    assert added.returncode == 0, added.stderr
    key_line = [ln for ln in added.stdout.splitlines() if ln.startswith("key ")]
    assert len(key_line) == 1 and len(bytes.fromhex(key_line[0].split()[1])) == 32
    keys_file = tmp_path / "etc" / "keys" / "nbiot-meter.toml"
    assert mode(keys_file) == 0o600
    dup = cli(
        "device",
        "add",
        "meter-0001",
        "--profile",
        "nbiot-meter",
        "--config",
        str(cfg_path),
        env=env,
    )
    assert dup.returncode == 73 and "already has a key" in dup.stderr
    bad = cli(
        "device", "add", "meter/+", "--profile", "nbiot-meter", "--config", str(cfg_path), env=env
    )
    assert bad.returncode == 64
    cfg = load_gateway_config(cfg_path)
    ps = ProfileSet.from_config(cfg)
    assert "nbiot-meter@1" in ps.names() or any("nbiot-meter" in n for n in ps.names())


def test_run_as_drops_to_the_service_user_in_a_child_only() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (it drops privileges to 'nobody')")
    nobody = provision.account("nobody")
    assert provision.run_as(nobody, os.getuid) == pwd.getpwnam("nobody").pw_uid
    assert os.getuid() == 0
    with pytest.raises(provision.ProvisionError, match="does not exist"):
        provision.account("no-such-user-here")
