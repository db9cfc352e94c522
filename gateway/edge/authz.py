"""Who may call what on the gateway's API under mutual TLS (api.tls.client_ca_file set).

The TLS handshake already refuses a client without a certificate from the client CA, so
every call that reaches us is authenticated. Status, health and reflection are open to
every such client; anything else (submitting transactions, reading transactions, proofs
and batches, and any method added later) needs a certificate with an identity listed in
api.admin_subjects: a SAN URI ("uri:spiffe://carrier.example/oss/submitter") or the whole
subject DN ("CN=operator,O=Edge Gateway Dev PKI"), compared exactly (gateway.common.identity).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

import grpc

from gateway.common.identity import Identity, peer_certificate
from gateway.edge.config import ApiConfig

log = logging.getLogger("gateway.edge.authz")

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


class AdminOnly(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Lets every authenticated client reach OPEN_METHODS; everything else needs an admin."""

    def __init__(self, admin_subjects: tuple[Identity, ...]) -> None:
        self.admin_subjects = admin_subjects
        if not admin_subjects:
            log.warning(
                "api.admin_subjects is empty: no client may submit or read transactions "
                "through the API; list the operator certificate's subject DN or SAN URI there"
            )

    async def _require_admin(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        auth: Mapping[str, Iterable[bytes]] = context.auth_context()
        peer = peer_certificate(auth)
        if peer is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
            return
        if not peer.is_any(self.admin_subjects):
            who = peer.description
            log.warning("api: %s refused to %s (not in api.admin_subjects)", method, who)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} needs an administrative certificate; {who} is not one "
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
