"""`edge-gateway broker config`: what it writes for a gateway's configuration, and its
one-line failures. The real broker runs these files in tests/hostile/test_mqtt_broker.py
(sandbox) and tests/test_systemd_install.py (Debian's mosquitto unit)."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gateway.edge import broker
from gateway.edge.config import parse_gateway_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "gateway.toml"


def example(tmp_path: Path, **mqtt: Any) -> Path:
    """The shipped example with its password file and profiles where this test has them."""
    pw = tmp_path / "mqtt-password"
    pw.write_text("correct horse battery\n")
    data = tomllib.loads(EXAMPLE.read_text())
    data["mqtt"]["password_file"] = str(pw)
    data["profiles"]["dir"] = str(ROOT / "firmware_profiles")
    for k, v in mqtt.items():
        if v is None:
            data["mqtt"].pop(k, None)
        else:
            data["mqtt"][k] = v
    out = tmp_path / "gateway.toml"
    out.write_text(_toml(data))
    return out


def _toml(data: dict[str, Any], prefix: str = "") -> str:
    """Enough TOML for the example's tables (strings, numbers, lists, nested tables)."""
    import json

    lines, tables = [], []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            items = ", ".join(
                "{ " + ", ".join(f"{ik} = {json.dumps(iv)}" for ik, iv in i.items()) + " }"
                for i in v
            )
            lines.append(f"{k} = [{items}]")
        elif isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        else:
            lines.append(f"{k} = {json.dumps(v)}")
    text = (f"[{prefix}]\n" if prefix and lines else "") + "\n".join(lines) + "\n"
    for k, v in tables:
        text += "\n" + _toml(v, f"{prefix}.{k}" if prefix else k)
    return text


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "broker", "config", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_production_output_binds_devices_and_admits_only_the_gateway(tmp_path: Path) -> None:
    cfg = example(tmp_path)
    out = tmp_path / "broker"
    done = cli("--config", str(cfg), "--out", str(out), "--files-dir", "/etc/mosquitto/edge")
    assert done.returncode == 0, done.stderr
    assert "LAB ONLY" not in done.stdout
    conf = (out / broker.CONF_NAME).read_text()
    lines = conf.splitlines()
    # Devices: certificate required, CN is the user and the client id, all below the mount.
    devices = lines[lines.index("listener 8883") : lines.index("listener 8884")]
    for want in (
        f"cafile {broker.DEFAULT_CA}",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "mount_point edge-devices/",
        "allow_anonymous false",
        "acl_file /etc/mosquitto/edge/devices.acl",
    ):
        assert want in devices, want
    # Gateways: certificate and password, their own ACL; no identity-as-user-name.
    gateways = lines[lines.index("listener 8884") :]
    for want in (
        "require_certificate true",
        "allow_anonymous false",
        "password_file /etc/mosquitto/edge/gateways.passwd",
        "acl_file /etc/mosquitto/edge/gateways.acl",
    ):
        assert want in gateways, want
    assert not any("use_identity_as_username" in ln for ln in gateways)
    assert lines.index("per_listener_settings true") < lines.index("listener 8883")
    for limit in ("max_queued_messages 0", "max_queued_bytes 0"):
        assert limit in lines

    acl = (out / broker.DEVICES_ACL).read_text().splitlines()
    rules = [ln for ln in acl if ln and not ln.startswith("#")]
    assert "pattern write edge-devices/devices/%u/tx" in rules
    assert "pattern read edge-devices/devices/rejected/%u" in rules
    # Each shipped profile's filters, with the device's own id at its device level.
    assert "pattern write edge-devices/meters/nbiot/%u/up" in rules
    assert all(r.startswith("pattern ") for r in rules), rules  # no user gets more
    assert not any("readwrite" in r or r.endswith("#") for r in rules), rules

    gw_acl = (out / broker.GATEWAYS_ACL).read_text().splitlines()
    assert "user edge-sz-0001" in gw_acl
    assert "topic read edge-devices/devices/+/tx" in gw_acl
    assert "topic read edge-devices/meters/nbiot/+/up" in gw_acl
    assert "topic write edge-devices/devices/rejected/#" in gw_acl

    ((user, entry),) = [
        ln.split(":", 1) for ln in (out / broker.PASSWORDS).read_text().splitlines()
    ]
    _, seven, rounds, salt, digest = entry.split("$")
    assert (user, seven, rounds) == ("edge-sz-0001", "7", "101")
    expected = hashlib.pbkdf2_hmac("sha512", b"correct horse battery", base64.b64decode(salt), 101)
    assert base64.b64decode(digest) == expected
    assert "correct horse" not in "".join(p.read_text() for p in out.iterdir())
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {"0o640"}


def test_lab_simulator_is_only_in_lab_output(tmp_path: Path) -> None:
    cfg = example(tmp_path)
    out = tmp_path / "lab"
    done = cli("--config", str(cfg), "--out", str(out), "--lab-simulator", "device-simulator")
    assert done.returncode == 0, done.stderr
    assert "LAB ONLY" in done.stdout
    conf = (out / broker.CONF_NAME).read_text()
    assert "LAB ONLY" in conf
    devices = conf.split("listener 8884")[0].splitlines()
    assert "use_username_as_clientid true" not in devices
    assert "mount_point edge-devices/" in devices
    acl = (out / broker.DEVICES_ACL).read_text().splitlines()
    i = acl.index("user device-simulator")
    assert acl[i + 1] == "topic readwrite edge-devices/#"


@pytest.mark.parametrize(
    ("mqtt", "args", "code", "fragment"),
    [
        ({"username": None}, [], 78, "mqtt.username and mqtt.password_file are not both set"),
        ({"mount_point": None}, [], 78, "mqtt.mount_point is not set"),
        ({}, ["--device-listener", "8884"], 78, "both port 8884"),
        ({"port": 8883}, [], 78, "both port 8883"),
        ({}, ["--gateway-listener", "9000"], 78, "is not the gateways' listener port 9000"),
        ({}, ["--device-listener", "eighty"], 64, "expected [HOST:]PORT"),
        ({}, ["--lab-simulator", "dev/+"], 78, "--lab-simulator 'dev/+'"),
        ({"password_file": "/nonexistent/pw"}, [], 78, "`edge-gateway setup` creates it"),
    ],
)
def test_refusals_are_one_line_with_their_exit_code(
    tmp_path: Path, mqtt: dict[str, Any], args: list[str], code: int, fragment: str
) -> None:
    cfg = example(tmp_path, **mqtt)
    done = cli("--config", str(cfg), "--out", str(tmp_path / "out"), *args)
    assert done.returncode == code, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("edge-gateway: ") and fragment in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_unwritable_output_is_exit_73(tmp_path: Path) -> None:
    cfg = example(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = cli("--config", str(cfg), "--out", str(blocker / "sub"))
    assert done.returncode == 73, done.stderr
    assert "cannot write" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_gateways_sharing_a_broker_each_get_a_user(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = example(tmp_path / "a")
    b = example(tmp_path / "b", username="edge-sz-0002", reject_topic_prefix="dl")
    out = tmp_path / "out"
    done = cli("--config", str(a), "--config", str(b), "--out", str(out))
    assert done.returncode == 0, done.stderr
    users = [ln.split(":")[0] for ln in (out / broker.PASSWORDS).read_text().splitlines()]
    assert users == ["edge-sz-0001", "edge-sz-0002"]
    acl = (out / broker.DEVICES_ACL).read_text()
    assert "pattern read edge-devices/dl/%u" in acl
    same = cli("--config", str(a), "--config", str(a), "--out", str(tmp_path / "o2"))
    assert same.returncode == 78 and "same mqtt.username" in same.stderr


def test_plan_refuses_a_filter_without_a_device_level() -> None:
    with pytest.raises(broker.BrokerConfigError, match="no '\\+' at level 2"):
        broker.device_pattern("devices/+/tx", 2)
    assert broker.device_pattern("a/+/b/+/#", 3) == "a/+/b/%u/#"
    assert broker.unshared("$share/g/devices/+/tx") == "devices/+/tx"
    cfg = parse_gateway_config(tomllib.loads(EXAMPLE.read_text()), EXAMPLE)
    assert cfg.mqtt.mount_point == broker.DEFAULT_MOUNT_POINT


def test_receipt_topics_are_read_by_their_device_only_and_written_by_the_gateway(
    tmp_path: Path,
) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    for f in (ROOT / "firmware_profiles").glob("*.toml"):
        text = f.read_text()
        if f.stem == "nbiot-meter":
            text += '\n[receipts]\nenabled = true\ntopic = "meters/nbiot/{device}/receipt"\n'
        (profiles / f.name).write_text(text)
    cfg = example(tmp_path)
    cfg.write_text(cfg.read_text().replace(str(ROOT / "firmware_profiles"), str(profiles)))
    out = tmp_path / "out"
    done = cli("--config", str(cfg), "--out", str(out))
    assert done.returncode == 0, done.stderr
    devices = (out / broker.DEVICES_ACL).read_text().splitlines()
    gateways = (out / broker.GATEWAYS_ACL).read_text().splitlines()
    m = broker.DEFAULT_MOUNT_POINT
    assert f"pattern read {m}meters/nbiot/%u/receipt" in devices
    assert not any("receipt" in ln and "write" in ln for ln in devices)
    assert f"topic write {m}meters/nbiot/+/receipt" in gateways
    # Without a profile opted in, no receipt topic at all.
    plain = tmp_path / "plain"
    assert cli("--config", str(example(tmp_path)), "--out", str(plain)).returncode == 0
    for name in (broker.DEVICES_ACL, broker.GATEWAYS_ACL):
        rules = [ln for ln in (plain / name).read_text().splitlines() if not ln.startswith("#")]
        assert not any("receipt" in ln for ln in rules), rules
