"""The example configurations document every key the parsers read, and parse as shipped.

The keys the parser reads are not listed by hand: every table the parser's reader sees
is wrapped in a mapping that records each key looked up, and the example is parsed as
shipped and once more with each commented-out `# key = value` line switched on. A key
the parser reads that the example neither sets nor shows commented out is missing; a
documented key the parser never reads is stale.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from gateway.common import tomlconfig
from gateway.common.errors import ConfigError
from gateway.edge.config import GatewayConfig, parse_gateway_config
from gateway.edge.config import check_certificates as check_gateway
from gateway.lab.pki import LEAVES, make_dev_pki
from gateway.ledger.config import LedgerNodeConfig, parse_ledger_config
from gateway.ledger.config import check_certificates as check_ledger

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
GATEWAY_EXAMPLE = EXAMPLES / "gateway.toml"
LEDGER_EXAMPLE = EXAMPLES / "ledger-node.toml"

_HEADER = re.compile(r"^\[([A-Za-z0-9_.-]+)\]\s*(?:#.*)?$")
_COMMENTED = re.compile(r"^#\s*([A-Za-z_][A-Za-z0-9_-]*\s*=.*)$")

Parse = Callable[[dict[str, Any]], object]


class _Recording(Mapping[str, Any]):
    """A TOML table that notes the keys looked up with `in` and get().

    Item access is not noted: the reader's finish() reads an unknown key that way to
    name it in its error, and an unknown key is not one the parser reads."""

    def __init__(self, data: Mapping[str, Any], prefix: str, seen: set[str]) -> None:
        self._data = data
        self._prefix = re.sub(r"\[\d+\]", "[]", prefix)  # forwarder.nodes[0]. -> nodes[].
        self._seen = seen

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __contains__(self, key: object) -> bool:
        self._seen.add(f"{self._prefix}{key}")
        return key in self._data

    def get(self, key: str, default: Any = None) -> Any:
        self._seen.add(f"{self._prefix}{key}")
        return self._data.get(key, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


@pytest.fixture
def record(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The keys the config readers look up from now on, as dotted paths."""
    seen: set[str] = set()
    original = tomlconfig.Reader.__init__

    def init(self: tomlconfig.Reader, data: Mapping[str, Any], prefix: str, source: Path) -> None:
        original(self, _Recording(data, prefix, seen), prefix, source)

    monkeypatch.setattr(tomlconfig.Reader, "__init__", init)
    return seen


def _flatten(table: Mapping[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for k, v in table.items():
        keys.add(prefix + k)
        if isinstance(v, dict):
            keys |= _flatten(v, f"{prefix}{k}.")
        elif isinstance(v, list):
            for item in v:
                if isinstance(item, dict):
                    keys |= _flatten(item, f"{prefix}{k}[].")
    return keys


def commented_keys(text: str) -> list[tuple[int, str]]:
    """(line index, dotted key) of each `# key = value` line that is valid TOML."""
    out = []
    table = ""
    for i, line in enumerate(text.splitlines()):
        header = _HEADER.match(line.strip())
        if header:
            table = header.group(1) + "."
            continue
        m = _COMMENTED.match(line.strip())
        if m is None:
            continue
        try:
            (key,) = tomllib.loads(m.group(1))
        except (tomllib.TOMLDecodeError, ValueError):
            continue  # prose that happens to contain '='
        out.append((i, table + key))
    return out


def uncomment(text: str, index: int) -> str:
    lines = text.splitlines()
    lines[index] = re.sub(r"^(\s*)#\s*", r"\1", lines[index], count=1)
    return "\n".join(lines) + "\n"


def _entries(keys: set[str], map_tables: tuple[str, ...]) -> set[str]:
    """Keys with the entries of a map table (one per gateway id) folded together: the ids
    are data, not keys; the keys inside an entry's table are `<table>.*.<key>`."""
    out = set()
    for k in keys:
        table = next((t for t in map_tables if k.startswith(t + ".")), None)
        if table is None:
            out.add(k)
        elif "." in k[len(table) + 1 :]:
            out.add(f"{table}.*.{k.rsplit('.', 1)[1]}")
    return out


def documented(text: str, map_tables: tuple[str, ...] = ()) -> set[str]:
    keys = _flatten(tomllib.loads(text)) | {k for _, k in commented_keys(text)}
    return _entries(keys, map_tables)


def keys_read(
    text: str, parse: Parse, seen: set[str], map_tables: tuple[str, ...] = ()
) -> set[str]:
    """Keys the parser looks up for the example and for each commented key switched on.

    A variant may be refused (two alternatives set at once, say); what matters is what
    the parser looked up, and that it never calls a documented key unknown."""
    seen.clear()
    parse(tomllib.loads(text))
    for index, key in commented_keys(text):
        variant = uncomment(text, index)
        try:
            data = tomllib.loads(variant)
        except tomllib.TOMLDecodeError as e:
            pytest.fail(f"uncommenting {key} makes the example invalid TOML: {e}")
        try:
            parse(data)
        except ConfigError as e:
            assert "unknown key" not in str(e), f"documented key {key} is unknown: {e}"
    return _entries(seen, map_tables)


def parse_gateway(source: Path) -> Parse:
    def parse(data: dict[str, Any]) -> GatewayConfig:
        return parse_gateway_config(data, source)

    return parse


def parse_ledger(source: Path, keys_dir: Path) -> Parse:
    """The ledger parser insists the gateways' public key files exist: point the
    example's [gateways] entries (a path, or a table's public_key) at stand-ins in keys_dir."""

    def parse(data: dict[str, Any]) -> LedgerNodeConfig:
        keys_dir.mkdir(exist_ok=True)
        stand_ins: dict[str, Any] = {}
        for gid, entry in data.get("gateways", {}).items():
            (keys_dir / f"{gid}.pem").write_text("stand-in\n")
            path = str(keys_dir / f"{gid}.pem")
            stand_ins[gid] = {**entry, "public_key": path} if isinstance(entry, dict) else path
        return parse_ledger_config({**data, "gateways": stand_ins}, source)

    return parse


def assert_complete(text: str, read: set[str], map_tables: tuple[str, ...] = ()) -> None:
    docs = documented(text, map_tables)
    missing = sorted(read - docs)
    stale = sorted(docs - read)
    assert not missing, f"keys the parser reads that the example does not document: {missing}"
    assert not stale, f"keys the example documents that the parser does not read: {stale}"


def test_gateway_example_parses_as_shipped() -> None:
    text = GATEWAY_EXAMPLE.read_text()
    cfg = parse_gateway_config(tomllib.loads(text), GATEWAY_EXAMPLE)
    assert cfg.mqtt.tls is not None and cfg.forwarder.tls is not None and cfg.api.tls is not None
    assert cfg.metrics.listen == "127.0.0.1:9464"
    assert cfg.profiles is not None


def test_gateway_example_documents_every_key_the_parser_reads(record: set[str]) -> None:
    text = GATEWAY_EXAMPLE.read_text()
    read = keys_read(text, parse_gateway(GATEWAY_EXAMPLE), record)
    # The recorder sees the keys that are easy to forget, in every table.
    assert {
        "mqtt.keepalive_s",
        "mqtt.reconnect_min_s",
        "mqtt.reconnect_max_s",
        "mqtt.username",
        "mqtt.password_file",
        "mqtt.plaintext",
        "mqtt.tls.cert_file",
        "spool.group_commit_wait_ms",
        "spool.max_pending_age_s",
        "spool.retention_batches",
        "forwarder.keepalive_s",
        "forwarder.plaintext",
        "forwarder.nodes[].address",
        "api.plaintext",
        "api.admin_subjects",
        "api.tls.client_ca_file",
        "metrics.enabled",
        "profiles.share_group",
        "hsm.pin_file",
    } <= read
    assert_complete(text, read)


def test_ledger_example_parses_and_documents_every_key(record: set[str], tmp_path: Path) -> None:
    text = LEDGER_EXAMPLE.read_text()
    parse = parse_ledger(LEDGER_EXAMPLE, tmp_path / "keys")
    cfg = parse(tomllib.loads(text))
    assert isinstance(cfg, LedgerNodeConfig)
    assert cfg.tls is not None and set(cfg.gateway_keys) == {"edge-01", "edge-02"}
    assert {g: i.text for g, i in cfg.gateway_clients.items()} == {
        "edge-01": "CN=edge-01,O=Example Carrier",
        "edge-02": "uri:spiffe://carrier.example/gateway/edge-02",
    }
    read = keys_read(text, parse, record, map_tables=("gateways",))
    assert {
        "node.plaintext",
        "node.tls.client_ca_file",
        "node.db_path",
        "node.readers",
        "node.max_concurrent_rpcs",
        "node.max_batch_bytes",
        "gateways.*.public_key",
        "gateways.*.client_subject",
        "gateways.*.client_uri",
    } <= read
    assert_complete(text, read, map_tables=("gateways",))


def test_a_key_missing_from_the_example_is_named(record: set[str]) -> None:
    # Guards the tests above: drop one documented key and the check must name it.
    text = GATEWAY_EXAMPLE.read_text()
    lines = [ln for ln in text.splitlines() if not ln.startswith("keepalive_s = 30 ")]
    assert len(lines) == len(text.splitlines()) - 2  # [mqtt] and [forwarder]
    reduced = "\n".join(lines) + "\n"
    read = keys_read(reduced, parse_gateway(GATEWAY_EXAMPLE), record)
    with pytest.raises(AssertionError, match=r"forwarder\.keepalive_s.*mqtt\.keepalive_s"):
        assert_complete(reduced, read)


def test_a_misspelt_commented_key_is_refused(record: set[str]) -> None:
    text = GATEWAY_EXAMPLE.read_text().replace("# share_group =", "# share_gruop =")
    with pytest.raises(AssertionError, match=r"documented key profiles\.share_gruop is unknown"):
        keys_read(text, parse_gateway(GATEWAY_EXAMPLE), record)


def _tls_paths(cfg: GatewayConfig) -> list[Path | None]:
    assert cfg.mqtt.tls is not None and cfg.forwarder.tls is not None and cfg.api.tls is not None
    return [
        cfg.mqtt.tls.ca_file,
        cfg.mqtt.tls.cert_file,
        cfg.mqtt.tls.key_file,
        cfg.forwarder.tls.ca_file,
        cfg.forwarder.tls.cert_file,
        cfg.forwarder.tls.key_file,
        cfg.api.tls.cert_file,
        cfg.api.tls.key_file,
        cfg.api.tls.client_ca_file,
    ]


def test_gateway_example_tls_files_are_what_pki_dev_writes(tmp_path: Path) -> None:
    # `edge-gateway pki dev --out /etc/edge-gateway/tls`, then the example unchanged
    # apart from that directory: every file exists and passes the start-up check.
    tls = tmp_path / "tls"
    make_dev_pki(tls)
    text = GATEWAY_EXAMPLE.read_text()
    assert "/etc/edge-gateway/tls/" in text
    text = text.replace("/etc/edge-gateway/tls/", f"{tls}/")
    # ... with mutual TLS on the API as well (its commented-out client_ca_file).
    (index,) = [i for i, key in commented_keys(text) if key == "api.tls.client_ca_file"]
    for variant in (text, uncomment(text, index)):
        cfg = parse_gateway_config(tomllib.loads(variant), GATEWAY_EXAMPLE)
        paths = [p for p in _tls_paths(cfg) if p is not None]
        assert all(p.parent == tls and p.is_file() for p in paths), paths
        check_gateway(cfg)
    assert cfg.mqtt.tls is not None and cfg.api.tls is not None
    assert cfg.mqtt.tls.cert_file == tls / "gateway.crt"
    assert cfg.api.tls.cert_file == tls / "gateway-api.crt"
    assert {p.name for p in paths} <= {"ca.crt"} | {
        f"{leaf.name}{ext}" for leaf in LEAVES for ext in (".crt", ".key")
    }


def test_ledger_example_tls_files_are_what_pki_dev_writes(tmp_path: Path) -> None:
    tls = tmp_path / "tls"
    make_dev_pki(tls)
    text = LEDGER_EXAMPLE.read_text().replace("/etc/edge-ledger/tls/", f"{tls}/")
    cfg = parse_ledger(LEDGER_EXAMPLE, tmp_path / "keys")(tomllib.loads(text))
    assert isinstance(cfg, LedgerNodeConfig) and cfg.tls is not None
    assert cfg.tls.cert_file == tls / "ledger.crt"
    assert cfg.tls.client_ca_file == tls / "ca.crt"
    check_ledger(cfg)
