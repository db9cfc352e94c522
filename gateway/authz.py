"""Who may call what on the gateway's API under mutual TLS (api.tls.client_ca_file set).

The TLS handshake already refuses a client without a certificate from the client CA, so
every call that reaches us is authenticated. Status, health and reflection are open to
every such client; anything else (submitting transactions, reading transactions, proofs
and batches, and any method added later) needs a certificate whose subject is listed in
api.admin_subjects. An entry matches the subject's common name ("operator") or the whole
subject as an RFC 4514 string ("CN=operator,O=Edge Gateway Dev PKI", the order
`openssl x509 -noout -subject -nameopt RFC2253` prints).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from gateway.config import ApiConfig

log = logging.getLogger("gateway.authz")

# Deny by default: a method not named here is administrative.
OPEN_METHODS = frozenset(
    {
        "/edgegateway.v1.GatewayService/GetStatus",
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)


@dataclass(frozen=True, slots=True)
class Peer:
    subject: str  # RFC 4514
    common_name: str | None

    def matches(self, entries: Iterable[str]) -> bool:
        return any(e == self.subject or e == self.common_name for e in entries)


@functools.lru_cache(maxsize=256)
def _peer_from_pem(pem: bytes) -> Peer | None:
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = cns[0].value if cns else None
    return Peer(cert.subject.rfc4514_string(), cn if isinstance(cn, str) else None)


def peer_of(auth_context: Mapping[str, Iterable[bytes]]) -> Peer | None:
    """The client certificate's subject, from grpc's auth context; None without one."""
    pems = list(auth_context.get("x509_pem_cert", ()))
    return _peer_from_pem(bytes(pems[0])) if pems else None


class AdminOnly(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Lets every authenticated client reach OPEN_METHODS; everything else needs an admin."""

    def __init__(self, admin_subjects: tuple[str, ...]) -> None:
        self.admin_subjects = admin_subjects
        if not admin_subjects:
            log.warning(
                "api.admin_subjects is empty: no client may submit or read transactions "
                "through the API; list the operator certificate's subject there"
            )

    async def _require_admin(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        auth: Mapping[str, Iterable[bytes]] = context.auth_context()
        peer = peer_of(auth)
        if peer is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
            return
        if not peer.matches(self.admin_subjects):
            log.warning("api: %s refused to %s (not in api.admin_subjects)", method, peer.subject)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} needs an administrative certificate; {peer.subject} is not one "
                "(api.admin_subjects)",
            )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],  # type: ignore[type-arg]
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method in OPEN_METHODS:
            return handler
        return _guard(handler, functools.partial(self._require_admin, method))


Check = Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]


def _guard(handler: grpc.RpcMethodHandler, check: Check) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
    """The same handler, running `check` before the method's own code."""
    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        uu: Any = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await check(context)
            return await uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)
    if handler.unary_stream is not None:
        us: Any = handler.unary_stream

        async def unary_stream(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            await check(context)
            async for r in _responses(us(request, context)):
                yield r

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)
    if handler.stream_unary is not None:
        su: Any = handler.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await check(context)
            return await su(requests, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)
    ss: Any = handler.stream_stream

    async def stream_stream(
        requests: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        await check(context)
        async for r in _responses(ss(requests, context)):
            yield r

    return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)


async def _responses(result: Any) -> AsyncIterator[Any]:
    # A streaming method is an async generator, or a coroutine that writes with
    # context.write() and returns nothing.
    if inspect.isasyncgen(result):
        async for r in result:
            yield r
    else:
        await result


def interceptors(api: ApiConfig) -> list[grpc.aio.ServerInterceptor]:  # type: ignore[type-arg]
    """The API server's interceptors: authorization under mutual TLS, none otherwise."""
    if api.tls is None or api.tls.client_ca_file is None:
        return []
    return [AdminOnly(api.admin_subjects)]
