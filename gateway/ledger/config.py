"""The ledger node's configuration: its listener, database and the gateways it accepts."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.common import certcheck
from gateway.common.errors import ConfigError
from gateway.common.identity import Identity
from gateway.common.tomlconfig import (
    REQUIRED,
    Reader,
    TlsServer,
    address,
    ident,
    load_toml,
    mutual_tls_only,
    tls_server,
)
from gateway.formats import checkpoint
from gateway.formats.note import NoteError

DEFAULT_NODE_MAX_CONCURRENT_RPCS = 128
DEFAULT_NODE_MAX_BATCH_BYTES = 16 * 1024 * 1024


# ---- [witness]: the node as a witness of the gateways' logs --------------------------------

DEFAULT_LOG_DOMAIN = "edge-gateway.invalid"
# What an operator runs to give a node its witness key.
KEYGEN_HINT = (
    "write the node's witness key with `edge-gateway ledger-node keygen --name "
    "<domain>/ledger-witness/<node id> --out FILE` and set witness.key_file = FILE"
)


@dataclass(frozen=True, slots=True)
class WitnessConfig:
    """[witness]: `key_file` holds the node's Ed25519 note key (`edge-gateway ledger-node
    keygen`), whose name is the witness name; `origins` the log origin of each gateway in
    [gateways] (default `<log_domain>/edge-gateway/<gateway id>`)."""

    key_file: Path
    origins: Mapping[str, str]

    @classmethod
    def for_gateways(
        cls,
        key_file: Path,
        gateway_ids: Iterable[str],
        log_domain: str = DEFAULT_LOG_DOMAIN,
        origins: Mapping[str, str] | None = None,
    ) -> WitnessConfig:
        """Every gateway's origin: the one given in `origins`, else the default under
        `log_domain` (NoteError if that is not a valid origin)."""
        given = dict(origins or {})
        return cls(
            key_file=key_file,
            origins={
                gid: given[gid] if gid in given else checkpoint.gateway_origin(log_domain, gid)
                for gid in gateway_ids
            },
        )


def _witness(root: Reader, gateway_ids: list[str]) -> WitnessConfig:
    """[witness] is required: a ledger node takes a gateway's leaves only with a checkpoint
    it cosigns, so a node without a witness key could store nothing."""
    if not root.has("witness"):
        raise ConfigError(f"config {root._source}: [witness] is missing: {KEYGEN_HINT}")
    w = root.table("witness")
    if not w.has("key_file"):
        raise ConfigError(f"config {root._source}: witness.key_file is missing: {KEYGEN_HINT}")
    key_file = w.path("key_file")
    domain = w.string("log_domain", DEFAULT_LOG_DOMAIN)
    given = w._get("origins", {})
    if not isinstance(given, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in given.items()
    ):
        raise w.fail("origins", given, 'expected a table of gateway id = "origin"')
    unknown = sorted(set(given) - set(gateway_ids))
    if unknown:
        raise w.fail("origins", unknown, "origins of gateways not listed under [gateways]")
    try:
        witness = WitnessConfig.for_gateways(key_file, gateway_ids, domain, given)
    except NoteError as e:
        raise w.fail("log_domain", domain, e.detail) from None
    if len(set(witness.origins.values())) != len(witness.origins):
        raise w.fail("origins", dict(witness.origins), "two gateways cannot share one log origin")
    w.finish()
    return witness


# ---- end of [witness] --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LedgerNodeConfig:
    node_id: str
    listen: str
    db_path: Path
    gateway_keys: Mapping[str, Path]  # gateway_id -> PEM public key
    tls: TlsServer | None
    # [witness]: the node's witness key and each gateway's log origin. Required: leaves
    # reach the node only with a checkpoint it cosigns.
    witness: WitnessConfig
    source: Path = field(default=Path("<memory>"))
    # Under mutual TLS: gateway_id -> the certificate identity that may act for it, and the
    # identities that may read every gateway's consistency proofs.
    gateway_clients: Mapping[str, Identity] = field(default_factory=dict)
    readers: tuple[Identity, ...] = ()
    max_concurrent_rpcs: int = DEFAULT_NODE_MAX_CONCURRENT_RPCS
    # The most leaf bytes one AddCheckpoint may carry; sizes the receive limit.
    max_batch_bytes: int = DEFAULT_NODE_MAX_BATCH_BYTES


def parse_ledger_config(data: Mapping[str, Any], source: Path) -> LedgerNodeConfig:
    root = Reader(data, "", source)
    n = root.table("node", required=True)
    node_id = ident(n, "id")
    listen = address(n, "listen", "127.0.0.1:7001")
    db_path = n.path("db_path", REQUIRED)
    tls = tls_server(n, "tls", "plaintext")
    mutual = tls is not None and tls.client_ca_file is not None
    readers = n.identities("readers", tls, "node.tls")
    max_concurrent_rpcs = n.integer(
        "max_concurrent_rpcs", DEFAULT_NODE_MAX_CONCURRENT_RPCS, 1, 10_000
    )
    max_batch_bytes = n.integer(
        "max_batch_bytes", DEFAULT_NODE_MAX_BATCH_BYTES, 64 * 1024, 256 * 1024 * 1024
    )
    n.finish()
    gk = root.table("gateways", required=True)
    keys: dict[str, Path] = {}
    clients: dict[str, Identity] = {}
    for gid in list(gk._data):
        if not gid or not all(c.isalnum() or c in "-_." for c in gid):
            raise gk.fail(gid, gk._data[gid], "gateway ids are letters, digits, '-', '_', '.'")
        if isinstance(gk._data[gid], dict):
            g = gk.table(gid)
            keys[gid] = g.path("public_key")
            key_reader, key_name = g, "public_key"
            client = _gateway_client(g, mutual)
            if client is not None:
                clients[gid] = client
            g.finish()
        else:
            keys[gid] = gk.path(gid)
            key_reader, key_name = gk, gid
            if mutual:
                raise gk.fail(
                    gid,
                    gk._data[gid],
                    "with node.tls.client_ca_file set, bind the gateway to its client "
                    f'certificate: "{gid}" = {{ public_key = "...pem", client_subject = '
                    '"CN=...,O=..." }, or client_uri = "uri:..." in place of client_subject',
                )
        if not keys[gid].is_file():
            raise key_reader.fail(
                key_name, str(keys[gid]), "expected the gateway's public key PEM file"
            )
    gk.finish()
    witness = _witness(root, list(keys))
    root.finish()
    return LedgerNodeConfig(
        node_id=node_id,
        listen=listen,
        db_path=db_path,
        gateway_keys=keys,
        tls=tls,
        source=source,
        gateway_clients=clients,
        readers=readers,
        max_concurrent_rpcs=max_concurrent_rpcs,
        max_batch_bytes=max_batch_bytes,
        witness=witness,
    )


def _gateway_client(g: Reader, mutual: bool) -> Identity | None:
    """The certificate identity a [gateways] table binds its gateway to (mutual TLS only)."""
    subject = g._get("client_subject", None)
    uri = g._get("client_uri", None)
    if subject is not None and uri is not None:
        raise g.fail("client_uri", uri, "set one of client_subject and client_uri, not both")
    if subject is None and uri is None:
        if mutual:
            raise ConfigError(
                f"config {g._source}: {g._key('client_subject')} is missing: with "
                "node.tls.client_ca_file set, each gateway is bound to its client certificate "
                'by client_subject = "CN=...,O=..." or client_uri = "uri:..."'
            )
        return None
    name, value = ("client_subject", subject) if subject is not None else ("client_uri", uri)
    if not mutual:
        raise mutual_tls_only(g, name, value, "node.tls")
    return g.identity(name, value, uri=name == "client_uri")


def check_certificates(cfg: LedgerNodeConfig, now: dt.datetime | None = None) -> None:
    """Raise CertificateError for the first unusable file of [node.tls]."""
    certcheck.check(cfg.source, servers=(("node.tls", cfg.tls),), now=now)


def load_ledger_config(path: Path) -> LedgerNodeConfig:
    return parse_ledger_config(load_toml(path), path)
