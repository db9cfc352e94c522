"""What is wrong is said once, in one line, with a documented exit code: usage errors,
files that cannot be read or written, ports in use (without gRPC's own log lines), an
absent broker; and the MQTT intake logs why it cannot connect, then its recovery."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from gateway import cli
from gateway.lab import pki as devpki
from gateway.lab.sandbox import Proc, Sandbox, free_port

pytestmark = pytest.mark.integration


def edge_gateway(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def one_line(out: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed command (and no traceback anywhere)."""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    return lines[0]


def gateway_with_key(sb: Sandbox) -> Path:
    """A gateway config whose HSM key exists; no broker or ledger behind it (for starts
    that must fail before they connect anywhere)."""
    hsm = sb.hsm()
    cfg = sb.gateway_config(
        "edge-once", hsm, free_port(), [("ledger-1", f"127.0.0.1:{free_port()}")], quorum=1
    )
    sb.hsm_init(cfg, sb.root / "edge-once.pem")
    return cfg


# ---- the command line ------------------------------------------------------------


@pytest.mark.parametrize(
    "argv", [["no-such-command"], ["status", "--no-such-flag"], ["simulate", "--rate", "fast"]]
)
def test_usage_errors_exit_64(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 64
    assert "error:" in capsys.readouterr().err


def test_a_bug_still_shows_its_traceback_and_exits_70(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(_args: object) -> int:
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "_cmd_pki", broken)
    assert cli.main(["pki", "dev", "--out", "/nonexistent"]) == 70
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'a bug'" in err


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (PermissionError(13, "Permission denied", "/etc/edge-gateway/x"), 77),
        (ConnectionRefusedError(111, "Connection refused"), 69),
        (socket.gaierror(-2, "Name or service not known"), 69),
        (NotADirectoryError(20, "Not a directory", "/a/file/sub"), 74),
    ],
)
def test_os_errors_map_to_one_line_and_a_documented_code(error: OSError, code: int) -> None:
    line, got = cli._os_error("run", error)
    assert got == code
    assert "\n" not in line and error.strerror in line
    if error.filename:
        assert error.filename in line


def test_an_os_error_reaching_the_top_is_one_line_naming_the_path(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    out = edge_gateway("demo", "--seconds", "1", "--workdir", str(afile / "sub"))
    assert out.returncode == 74, out.stdout[-2000:] + out.stderr[-2000:]
    assert str(afile) in one_line(out)


def test_a_directory_as_config_is_one_line_and_exit_78(tmp_path: Path) -> None:
    out = edge_gateway("run", "--config", str(tmp_path))
    assert out.returncode == 78
    assert f"config file {tmp_path} is a directory" in one_line(out)
    assert out.stdout == ""


def test_hsm_init_to_an_unwritable_pem_out_is_one_line_and_exit_73(sandbox: Sandbox) -> None:
    cfg = gateway_with_key(sandbox)
    target = sandbox.root / "a-directory"
    target.mkdir()
    out = edge_gateway(
        "hsm", "init", "--config", str(cfg), "--pem-out", str(target), env=sandbox.env
    )
    assert out.returncode == 73, out.stdout[-2000:] + out.stderr[-2000:]
    line = one_line(out)
    assert f"--pem-out {target} cannot be written" in line and "run again" in line


def test_simulate_without_a_broker_is_one_line_and_exit_69() -> None:
    port = free_port()
    out = edge_gateway("simulate", "--port", str(port), "--seconds", "1", "--devices", "1")
    assert out.returncode == 69, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"MQTT broker at 127.0.0.1:{port}" in one_line(out)
    assert out.stdout == ""


def test_simulate_shows_progress_on_stderr_and_its_summary_on_stdout(sandbox: Sandbox) -> None:
    broker = sandbox.mosquitto()
    files = sandbox.mqtt_tls("device")
    assert files is not None and files.cert_file and files.key_file
    args = [
        "simulate",
        "--port",
        str(broker.port),
        "--devices",
        "4",
        "--rate",
        "100",
        "--seconds",
        "6",
        "--ca-file",
        str(files.ca_file),
        "--cert-file",
        str(files.cert_file),
        "--key-file",
        str(files.key_file),
    ]
    out = edge_gateway(*args, env=sandbox.env)
    assert out.returncode == 0, out.stderr
    progress = out.stderr.strip().splitlines()
    assert 2 <= len(progress) <= 3, progress
    for line in progress:
        assert line.startswith("simulate: ") and "published" in line
        assert "acknowledged" in line and line.endswith("msg/s")
    summary = out.stdout.strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith("published ")

    quiet = edge_gateway(*args, "--seconds", "1", "--quiet", env=sandbox.env)
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert len(quiet.stdout.strip().splitlines()) == 1


def test_ports_in_use_stop_the_start_with_one_line_and_no_grpc_core_lines(
    sandbox: Sandbox,
) -> None:
    cfg = gateway_with_key(sandbox)
    data = tomllib.loads(cfg.read_text())
    for key, words in (("api", "cannot listen on"), ("metrics", "metrics.listen")):
        port = int(data[key]["listen"].rpartition(":")[2])
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", port))
            taken.listen()
            out = sandbox.run_gateway_once(cfg)
        assert out.returncode == 78, out.stdout[-2000:] + out.stderr[-2000:]
        line = one_line(out)
        assert words in line and str(port) in line
        for log_line in out.stdout.splitlines():  # the service's own logfmt events only
            assert log_line.startswith("ts="), log_line


# ---- the service's log ----------------------------------------------------------


def wait_lines(proc: Proc, text: str, timeout: float, at_least: int = 1) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = [ln for ln in proc.log_text().splitlines() if text in ln]
        if len(lines) >= at_least or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def start(sandbox: Sandbox, config: Path, name: str) -> Proc:
    p = Proc(
        name,
        [sandbox.python, "-m", "gateway", "run", "--config", str(config)],
        config.parent / f"{name}.log",
        sandbox.env,
    )
    p.start()
    sandbox.procs.append(p)
    return p


def test_mqtt_connect_failures_are_logged_once_with_their_reason_then_recovery(
    sandbox: Sandbox,
) -> None:
    from tests.conftest import deploy

    d = deploy(sandbox)
    assert sandbox.pki is not None
    # The gateway connects to the broker's gateways' listener (its configured port).
    port = tomllib.loads(d.config.read_text())["mqtt"]["port"]
    where = f"mqtt connect to 127.0.0.1:{port} failed"

    # The broker's certificate is not from the CA the gateway trusts.
    other = devpki.make_dev_pki(sandbox.root / "other-pki", force=True)
    wrong_ca = d.config.parent / "wrong-ca.toml"
    text = d.config.read_text()
    mqtt_ca = f'[mqtt.tls]\nca_file = "{sandbox.pki.ca.cert}"'
    assert mqtt_ca in text
    wrong_ca.write_text(text.replace(mqtt_ca, f'[mqtt.tls]\nca_file = "{other.ca.cert}"'))
    gw = start(sandbox, wrong_ca, "wrong-ca")
    lines = wait_lines(gw, where, 20)
    assert len(lines) == 1, gw.log_text()[-3000:]
    assert "logger=gateway.edge.ingest" in lines[0] and "level=warning" in lines[0]
    assert "TLS: certificate verify failed" in lines[0] and "mqtt.tls.ca_file" in lines[0]
    time.sleep(5)  # paho retries every 1 to 2 s; the log says it once
    assert len(wait_lines(gw, where, 0)) == 1, gw.log_text()[-3000:]
    assert gw.terminate(30) == 0

    # The broker is down at start, then comes up.
    d.broker.terminate()
    gw = start(sandbox, d.config, "broker-down")
    lines = wait_lines(gw, where, 20)
    assert len(lines) == 1, gw.log_text()[-3000:]
    assert "connection refused" in lines[0]
    time.sleep(5)
    assert len(wait_lines(gw, where, 0)) == 1
    assert not wait_lines(gw, "mqtt connected", 0)
    sandbox.restart(d.broker)
    connected = wait_lines(gw, "mqtt connected", 20)
    assert len(connected) == 1 and "failed attempts" in connected[0], gw.log_text()[-3000:]
    assert wait_lines(gw, "msg=ready", 20)
    assert gw.terminate(30) == 0
    assert "Traceback" not in gw.log_text()
