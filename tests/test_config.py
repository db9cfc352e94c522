"""Configuration: one typed, frozen object from TOML; every bad value stops the
start with one line naming the key, the value and what is allowed; the HSM PIN
never comes from the config and never shows up in an error.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from gateway.common.errors import EXIT_CONFIG, EXIT_NOPERM, ConfigError, HsmPinError
from gateway.edge.config import (
    GatewayConfig,
    PinSource,
    load_gateway_config,
    parse_gateway_config,
)
from gateway.ledger.config import LedgerNodeConfig, load_ledger_config, parse_ledger_config

SOURCE = Path("/etc/edge-gateway/gateway.toml")
PIN = "7391-secret-pin-0042"


def minimal() -> dict[str, Any]:
    return {
        "gateway": {"id": "gw-test"},
        "hsm": {"token_label": "edge", "pin_file": "/run/edge-gateway/pin"},
        "mqtt": {"plaintext": True},
        "spool": {},
        "forwarder": {
            "plaintext": True,
            "nodes": [{"id": "ledger-1", "address": "127.0.0.1:7001"}],
        },
        "api": {"plaintext": True},
    }


def with_value(path: str, value: object) -> dict[str, Any]:
    """minimal() with the dotted `path` (e.g. "batch.max_tx") set to value."""
    data = minimal()
    *tables, key = path.split(".")
    node = data
    for t in tables:
        node = node.setdefault(t, {})
    node[key] = value
    return data


def config_error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_gateway_config(data, SOURCE)
    assert info.value.exit_code == EXIT_CONFIG
    message = str(info.value)
    assert "\n" not in message
    assert str(SOURCE) in message
    return message


# --------------------------------------------------------------------------
# A valid configuration and its defaults.
# --------------------------------------------------------------------------


def test_minimal_config_parses_with_production_defaults() -> None:
    cfg = parse_gateway_config(minimal(), SOURCE)
    assert isinstance(cfg, GatewayConfig)
    assert cfg.gateway_id == "gw-test"
    assert cfg.source == SOURCE
    assert cfg.log_level == "info"
    assert cfg.hsm.token_label == "edge"
    assert cfg.hsm.key_id == b"\x01"
    assert cfg.hsm.pin == PinSource(pin_file=Path("/run/edge-gateway/pin"), credential=None)
    assert cfg.mqtt.port == 8883
    assert cfg.mqtt.topics == ("devices/+/tx",)
    assert cfg.mqtt.client_id == "edge-gateway-gw-test"
    assert cfg.mqtt.tls is None
    assert (cfg.batch.max_tx, cfg.batch.max_bytes, cfg.batch.max_age_s) == (500, 2 * 1024**2, 2.0)
    assert cfg.forwarder.quorum == 1
    assert cfg.forwarder.tls is None
    assert cfg.api.listen == "127.0.0.1:7443"
    assert cfg.api.tls is None
    assert cfg.metrics.listen == "127.0.0.1:9464"


def test_config_is_frozen() -> None:
    cfg = parse_gateway_config(minimal(), SOURCE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch.max_tx = 1  # type: ignore[misc]


def test_parse_does_not_modify_its_input() -> None:
    data = minimal()
    before = copy.deepcopy(data)
    parse_gateway_config(data, SOURCE)
    assert data == before


def test_quorum_defaults_to_a_majority() -> None:
    nodes = [{"id": f"ledger-{i}", "address": f"10.0.0.{i}:7001"} for i in range(1, 4)]
    cfg = parse_gateway_config(with_value("forwarder.nodes", nodes), SOURCE)
    assert cfg.forwarder.quorum == 2
    assert [n.node_id for n in cfg.forwarder.nodes] == ["ledger-1", "ledger-2", "ledger-3"]


def test_shared_subscription_topic_is_accepted() -> None:
    cfg = parse_gateway_config(with_value("mqtt.topics", ["$share/gws/devices/+/tx"]), SOURCE)
    assert cfg.mqtt.topics == ("$share/gws/devices/+/tx",)


def test_integers_are_accepted_where_numbers_are_expected() -> None:
    cfg = parse_gateway_config(with_value("batch.max_age_s", 5), SOURCE)
    assert cfg.batch.max_age_s == 5.0
    assert isinstance(cfg.batch.max_age_s, float)


def test_metrics_can_be_disabled() -> None:
    cfg = parse_gateway_config(with_value("metrics.enabled", False), SOURCE)
    assert cfg.metrics.listen is None


def test_metrics_listen_may_stay_set_while_disabled() -> None:
    data = with_value("metrics.enabled", False)
    data["metrics"]["listen"] = "127.0.0.1:9100"
    assert parse_gateway_config(data, SOURCE).metrics.listen is None


def test_tls_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    data = minimal()
    del data["mqtt"]["plaintext"]
    data["mqtt"]["tls"] = {"ca_file": "pki/ca.pem", "cert_file": "/abs/c.pem", "key_file": "k.pem"}
    cfg = parse_gateway_config(data, tmp_path / "gateway.toml")
    assert cfg.mqtt.tls is not None
    assert cfg.mqtt.tls.ca_file == tmp_path / "pki" / "ca.pem"
    assert cfg.mqtt.tls.cert_file == Path("/abs/c.pem")
    assert cfg.mqtt.tls.key_file == tmp_path / "k.pem"


# --------------------------------------------------------------------------
# Bad values: key path, value and what is allowed, in one line.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value", "allowed"),
    [
        ("batch.max_tx", 0, "from 1 to 1000000"),
        ("batch.max_tx", 1_000_001, "from 1 to 1000000"),
        ("batch.max_tx", "500", "from 1 to 1000000"),
        ("batch.max_tx", True, "from 1 to 1000000"),
        ("batch.max_tx", 5.0, "from 1 to 1000000"),
        ("batch.max_bytes", 1023, "from 1024 to 268435456"),
        ("batch.max_age_s", 0, "from 0.01 to 3600"),
        ("batch.max_age_s", 3601.5, "from 0.01 to 3600"),
        ("batch.max_age_s", False, "from 0.01 to 3600"),
        ("mqtt.port", 0, "from 1 to 65535"),
        ("mqtt.port", 65536, "from 1 to 65535"),
        ("mqtt.keepalive_s", 4, "from 5 to 3600"),
        ("mqtt.max_payload_bytes", 63, "from 64 to 16777216"),
        ("mqtt.receive_maximum", 0, "from 1 to 65535"),
        ("mqtt.device_id_level", -1, "from 0 to 32"),
        ("mqtt.topics", [], "non-empty list of strings"),
        ("mqtt.topics", "devices/+/tx", "non-empty list of strings"),
        ("mqtt.topics", ["devices/tx"], "must have '+' at level 1"),
        ("mqtt.host", "", "non-empty string"),
        ("spool.group_commit_max", 0, "from 1 to 100000"),
        ("spool.min_free_bytes", -1, "from 0 to"),
        ("spool.path", 42, "expected a path"),
        ("gateway.id", "gw test", "letters, digits, '-', '_' or '.'"),
        ("gateway.id", "x" * 129, "1-128 characters"),
        ("gateway.log_level", "verbose", "one of debug, info, warning, error"),
        ("hsm.key_id", "zz", "expected hex bytes"),
        ("hsm.token_label", "", "non-empty string"),
        ("api.listen", "127.0.0.1:99999", "expected host:port"),
        ("api.listen", "localhost", "expected host:port"),
        ("metrics.listen", ":9464", "expected host:port"),
        ("metrics.enabled", "yes", "expected true or false"),
        ("forwarder.quorum", 2, "from 1 to 1"),
        ("forwarder.quorum", 0, "from 1 to 1"),
        ("forwarder.call_timeout_s", 0.01, "from 0.1 to 600"),
        ("forwarder.nodes", [], "non-empty list"),
        ("forwarder.plaintext", "false", "expected true or false"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None,
)
def test_bad_value_names_key_value_and_range(path: str, value: object, allowed: str) -> None:
    message = config_error(with_value(path, value))
    assert f"{path} = {value!r}" in message
    assert allowed in message


def test_bad_node_address_names_the_node() -> None:
    nodes = [{"id": "ledger-1", "address": "ledger-1.example"}]
    message = config_error(with_value("forwarder.nodes", nodes))
    assert "forwarder.nodes[0].address = 'ledger-1.example'" in message
    assert "host:port" in message


def test_duplicate_node_ids_are_refused() -> None:
    nodes = [{"id": "a", "address": "10.0.0.1:7001"}, {"id": "a", "address": "10.0.0.2:7001"}]
    message = config_error(with_value("forwarder.nodes", nodes))
    assert "forwarder.nodes" in message
    assert "unique" in message


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({k: v for k, v in minimal().items() if k != "hsm"}, "[hsm] is missing"),
        ({k: v for k, v in minimal().items() if k != "gateway"}, "[gateway] is missing"),
        ({**minimal(), "gateway": {}}, "gateway.id is missing"),
        ({**minimal(), "hsm": {"pin_file": "/run/pin"}}, "hsm.token_label is missing"),
        ({**minimal(), "forwarder": {"plaintext": True}}, "forwarder.nodes is missing"),
    ],
    ids=["no-hsm", "no-gateway", "no-id", "no-token", "no-nodes"],
)
def test_missing_required_key_is_named(data: dict[str, Any], fragment: str) -> None:
    assert fragment in config_error(data)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("batch.max_txs", 5),
        ("gateway.name", "x"),
        ("mqtt.tls_ca", "/x"),
        ("spool.wal", True),
        ("hsm.slot", 0),
    ],
)
def test_unknown_key_is_refused(path: str, value: object) -> None:
    message = config_error(with_value(path, value))
    assert f"{path} = {value!r}" in message
    assert "unknown key" in message


def test_unknown_table_is_refused() -> None:
    message = config_error({**minimal(), "bacth": {"max_tx": 10}})
    assert "bacth" in message
    assert "unknown key" in message


def test_unknown_key_in_a_node_is_refused() -> None:
    nodes = [{"id": "ledger-1", "address": "127.0.0.1:7001", "weight": 2}]
    message = config_error(with_value("forwarder.nodes", nodes))
    assert "forwarder.nodes[0].weight = 2" in message


def test_table_where_a_value_is_expected_is_refused() -> None:
    message = config_error({**minimal(), "batch": 5})
    assert "batch = 5" in message
    assert "expected a table" in message


# --------------------------------------------------------------------------
# TLS is on by default.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("section", ["mqtt", "forwarder"])
def test_client_tls_is_required_unless_plaintext_is_explicit(section: str) -> None:
    data = minimal()
    del data[section]["plaintext"]
    message = config_error(data)
    assert f"{section}.tls.ca_file is missing" in message
    assert f"{section}.plaintext = true" in message


def test_server_tls_is_required_unless_plaintext_is_explicit() -> None:
    data = minimal()
    del data["api"]
    message = config_error(data)
    assert "api.tls.cert_file is missing" in message
    assert "api.plaintext = true" in message


@pytest.mark.parametrize("section", ["mqtt", "forwarder", "api"])
def test_plaintext_and_tls_together_are_refused(section: str) -> None:
    data = minimal()
    data[section]["tls"] = {"ca_file": "/ca.pem", "cert_file": "/c.pem", "key_file": "/k.pem"}
    message = config_error(data)
    assert f"{section}.plaintext = True" in message
    assert "cannot be true" in message


def test_client_certificate_needs_its_key() -> None:
    data = minimal()
    del data["mqtt"]["plaintext"]
    data["mqtt"]["tls"] = {"ca_file": "/ca.pem", "cert_file": "/c.pem"}
    message = config_error(data)
    assert "mqtt.tls.cert_file" in message
    assert "go together" in message


# --------------------------------------------------------------------------
# The PIN never lives in the config.
# --------------------------------------------------------------------------


def test_pin_in_config_is_refused_without_echoing_it() -> None:
    message = config_error(with_value("hsm.pin", PIN))
    assert "hsm.pin" in message
    assert "pin_file" in message and "pin_credential" in message
    assert PIN not in message


def test_pin_file_and_credential_together_are_refused() -> None:
    message = config_error(with_value("hsm.pin_credential", "hsm-pin"))
    assert "exactly one of hsm.pin_file and hsm.pin_credential" in message


def test_some_pin_source_is_required() -> None:
    data = minimal()
    del data["hsm"]["pin_file"]
    assert "exactly one of hsm.pin_file and hsm.pin_credential" in config_error(data)


def test_pin_credential_is_accepted() -> None:
    data = minimal()
    del data["hsm"]["pin_file"]
    data["hsm"]["pin_credential"] = "hsm-pin"
    cfg = parse_gateway_config(data, SOURCE)
    assert cfg.hsm.pin == PinSource(pin_file=None, credential="hsm-pin")


def _pin_file(tmp_path: Path, mode: int, text: str = PIN + "\n") -> Path:
    path = tmp_path / "pin"
    path.write_text(text, encoding="utf-8")
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o601])
def test_pin_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = _pin_file(tmp_path, mode)
    with pytest.raises(HsmPinError) as info:
        PinSource(pin_file=path, credential=None).read()
    message = str(info.value)
    assert info.value.exit_code == EXIT_NOPERM
    assert "chmod 600" in message
    assert f"{mode:04o}" in message
    assert str(path) in message
    assert PIN not in message


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_private_pin_file_is_read_and_stripped(tmp_path: Path, mode: int) -> None:
    path = _pin_file(tmp_path, mode)
    assert PinSource(pin_file=path, credential=None).read() == PIN


def test_missing_pin_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(HsmPinError, match="does not exist"):
        PinSource(pin_file=tmp_path / "nope", credential=None).read()


def test_empty_pin_file_is_refused(tmp_path: Path) -> None:
    path = _pin_file(tmp_path, 0o600, text="\n")
    with pytest.raises(HsmPinError, match="is empty"):
        PinSource(pin_file=path, credential=None).read()


def test_pin_credential_reads_from_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # systemd hands credentials over read-only; their mode is its business.
    (tmp_path / "hsm-pin").write_text(PIN + "\n", encoding="utf-8")
    os.chmod(tmp_path / "hsm-pin", 0o444)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    source = PinSource(pin_file=None, credential="hsm-pin")
    assert source.resolve() == tmp_path / "hsm-pin"
    assert source.read() == PIN


def test_pin_credential_without_systemd_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(HsmPinError) as info:
        PinSource(pin_file=None, credential="hsm-pin").read()
    message = str(info.value)
    assert "$CREDENTIALS_DIRECTORY is not set" in message
    assert "'hsm-pin'" in message
    assert "LoadCredential=" in message
    assert "hsm.pin_file" in message


# --------------------------------------------------------------------------
# Loading from disk.
# --------------------------------------------------------------------------

GATEWAY_TOML = """\
[gateway]
id = "gw-disk"

[hsm]
token_label = "edge"
pin_file = "secrets/pin"

[mqtt]
plaintext = true

[spool]
path = "spool.db"

[batch]
max_tx = 100

[forwarder]
plaintext = true
nodes = [{ id = "ledger-1", address = "127.0.0.1:7001" }]

[api]
plaintext = true
"""


def test_load_gateway_config_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(GATEWAY_TOML, encoding="utf-8")
    cfg = load_gateway_config(path)
    assert cfg.gateway_id == "gw-disk"
    assert cfg.source == path
    assert cfg.batch.max_tx == 100
    assert cfg.spool.path == tmp_path / "spool.db"
    assert cfg.hsm.pin.pin_file == tmp_path / "secrets" / "pin"


def test_load_gateway_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_gateway_config(path)
    assert f"config file {path} does not exist" in str(info.value)


def test_load_gateway_config_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text("[gateway\nid = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_gateway_config(path)
    assert str(path) in str(info.value)
    assert "is not valid TOML" in str(info.value)


def test_load_gateway_config_bad_value_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(GATEWAY_TOML.replace("max_tx = 100", "max_tx = 0"), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_gateway_config(path)
    assert str(info.value) == (
        f"config {path}: batch.max_tx = 0: expected an integer from 1 to 1000000"
    )


# --------------------------------------------------------------------------
# The reference ledger node's config.
# --------------------------------------------------------------------------


def ledger_data() -> dict[str, Any]:
    return {
        "node": {"id": "ledger-1", "db_path": "ledger.db", "plaintext": True},
        "gateways": {"gw-test": "keys/gw-test.pem"},
        "witness": {"key_file": "witness.key"},
    }


@pytest.fixture
def ledger_dir(tmp_path: Path) -> Path:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "gw-test.pem").write_text("-----BEGIN PUBLIC KEY-----\n", "ascii")
    return tmp_path


def test_ledger_config_parses(ledger_dir: Path) -> None:
    cfg = parse_ledger_config(ledger_data(), ledger_dir / "ledger.toml")
    assert isinstance(cfg, LedgerNodeConfig)
    assert cfg.node_id == "ledger-1"
    assert cfg.listen == "127.0.0.1:7001"
    assert cfg.db_path == ledger_dir / "ledger.db"
    assert cfg.tls is None
    assert dict(cfg.gateway_keys) == {"gw-test": ledger_dir / "keys" / "gw-test.pem"}


def test_load_ledger_config_from_toml(ledger_dir: Path) -> None:
    path = ledger_dir / "ledger.toml"
    path.write_text(
        '[node]\nid = "ledger-1"\ndb_path = "ledger.db"\nplaintext = true\n'
        '[gateways]\ngw-test = "keys/gw-test.pem"\n[witness]\nkey_file = "witness.key"\n',
        encoding="utf-8",
    )
    assert load_ledger_config(path).gateway_keys["gw-test"] == ledger_dir / "keys/gw-test.pem"


def _ledger_error(data: dict[str, Any], source: Path) -> str:
    with pytest.raises(ConfigError) as info:
        parse_ledger_config(data, source)
    return str(info.value)


def test_ledger_config_missing_key_file(ledger_dir: Path) -> None:
    data = ledger_data()
    data["gateways"]["gw-test"] = "keys/absent.pem"
    message = _ledger_error(data, ledger_dir / "ledger.toml")
    assert "gateways.gw-test" in message
    assert "absent.pem" in message
    assert "public key PEM file" in message


def test_ledger_config_bad_gateway_id(ledger_dir: Path) -> None:
    data = ledger_data()
    data["gateways"] = {"gw test": "keys/gw-test.pem"}
    message = _ledger_error(data, ledger_dir / "ledger.toml")
    assert "gateways.gw test = 'keys/gw-test.pem'" in message


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        ("listen", "nowhere", "expected host:port"),
        ("id", "", "non-empty string"),
        ("db_path", 7, "expected a path"),
        ("port", 7001, "unknown key"),
    ],
)
def test_ledger_config_bad_node_value(
    ledger_dir: Path, path: str, value: object, fragment: str
) -> None:
    data = ledger_data()
    data["node"][path] = value
    message = _ledger_error(data, ledger_dir / "ledger.toml")
    assert f"node.{path} = {value!r}" in message
    assert fragment in message


def test_ledger_config_needs_gateways(ledger_dir: Path) -> None:
    data = ledger_data()
    del data["gateways"]
    assert "[gateways] is missing" in _ledger_error(data, ledger_dir / "ledger.toml")


def test_ledger_tls_is_required_unless_plaintext_is_explicit(ledger_dir: Path) -> None:
    data = ledger_data()
    del data["node"]["plaintext"]
    message = _ledger_error(data, ledger_dir / "ledger.toml")
    assert "node.tls.cert_file is missing" in message
