"""gRPC plumbing shared by the gateway API, the forwarder and the ledger node:
TLS credentials, listening ports, client channels with keepalive."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from gateway.common.errors import ConfigError
from gateway.common.tomlconfig import TlsClient, TlsServer


def _read(path: object) -> bytes:
    try:
        with open(str(path), "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"TLS file {path} cannot be read: {e.strerror}") from None


def server_credentials(tls: TlsServer) -> grpc.ServerCredentials:
    pairs = [(_read(tls.key_file), _read(tls.cert_file))]
    if tls.client_ca_file is not None:
        return grpc.ssl_server_credentials(
            pairs, root_certificates=_read(tls.client_ca_file), require_client_auth=True
        )
    return grpc.ssl_server_credentials(pairs)


def add_port(server: grpc.aio.Server, listen: str, tls: TlsServer | None) -> int:
    """Bind `listen`; returns the bound port (useful with port 0)."""
    try:
        if tls is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, server_credentials(tls))
    except RuntimeError:  # grpcio raises "Failed to bind" rather than returning 0
        port = 0
    if port == 0:
        raise ConfigError(f"cannot listen on {listen}: address in use or not available")
    return port


def channel_options(keepalive_s: float) -> Sequence[tuple[str, int]]:
    return [
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_send_message_length", 256 * 1024 * 1024),
        ("grpc.max_receive_message_length", 256 * 1024 * 1024),
        # Reconnect quickly after a node restarts; the forwarder's own backoff paces calls.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 5_000),
    ]


def server_options(max_receive_bytes: int) -> list[tuple[str, int]]:
    """A server's options. grpc refuses a message over `max_receive_bytes` with
    RESOURCE_EXHAUSTED as soon as its length prefix arrives, before buffering it or running
    the handler: size it from what one call may legitimately carry."""
    return [
        # grpc binds with SO_REUSEPORT by default: a second server on the same port would
        # silently take half the connections. A port in use is a start-up error instead.
        ("grpc.so_reuseport", 0),
        ("grpc.max_send_message_length", 256 * 1024 * 1024),
        ("grpc.max_receive_message_length", max_receive_bytes),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_ping_strikes", 0),
    ]


def aio_channel(address: str, tls: TlsClient | None, keepalive_s: float = 30.0) -> grpc.aio.Channel:
    opts = list(channel_options(keepalive_s))
    if tls is None:
        return grpc.aio.insecure_channel(address, options=opts)
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file),
        private_key=_read(tls.key_file) if tls.key_file else None,
        certificate_chain=_read(tls.cert_file) if tls.cert_file else None,
    )
    return grpc.aio.secure_channel(address, creds, options=opts)
