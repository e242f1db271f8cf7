"""A gRPC server interceptor that answers an undecodable request with INVALID_ARGUMENT.

Why: when a request deserializer raises (protobuf's DecodeError on random bytes, invalid UTF-8 in a
string field, a Struct nested past upb's depth limit), grpcio logs "Exception deserializing
message!" with a full traceback and answers INTERNAL, which says the server is broken when it is
the caller's bytes that are. The interceptor wraps every handler (ours, health and reflection
alike) so its deserializer never raises: a failure becomes an ``Undecodable`` value, and the
wrapped behavior refuses it with INVALID_ARGUMENT and one short, throttled log line.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from mobykit.rpc.limits import clip

log = logging.getLogger("mobykit.rpc")

_REASON_BYTES = 200  # of the parser's message, in the status and the log line


@dataclass(frozen=True)
class Undecodable:
    """What the guarded deserializer returns instead of raising (never None: grpcio reads None as
    a deserializer failure and answers INTERNAL)."""

    reason: str


def safe_deserializer(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:  # DecodeError, or whatever else a parser raises on hostile bytes
            return Undecodable(clip(f"{type(e).__name__}: {e}", _REASON_BYTES))

    return decode


def _refuse(context: grpc.ServicerContext, method: str, request: Undecodable) -> None:
    log.warning("refused an undecodable request to %s: %s", method, request.reason)
    context.abort(
        grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid protobuf message: {request.reason}"
    )


def _unary(behavior: Callable, method: str) -> Callable:
    def guarded(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            _refuse(context, method, request)
        return behavior(request, context)

    return guarded


def _streaming(behavior: Callable, method: str) -> Callable:
    def checked(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        for request in requests:
            if isinstance(request, Undecodable):
                _refuse(context, method, request)
            yield request

    def guarded(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        return behavior(checked(requests, context), context)

    return guarded


def guard(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """``handler`` with a deserializer that never raises and behaviour that refuses what it could
    not decode."""
    decode = safe_deserializer(handler.request_deserializer)
    encode = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            _streaming(handler.stream_stream, method), decode, encode
        )
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_streaming(handler.stream_unary, method), decode, encode)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_unary(handler.unary_stream, method), decode, encode)
    return grpc.unary_unary_rpc_method_handler(_unary(handler.unary_unary, method), decode, encode)


class DecodeGuard(grpc.ServerInterceptor):
    """Pass to ``grpc.server(interceptors=[DecodeGuard()])``."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        self._lock = threading.Lock()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler  # unknown method (UNIMPLEMENTED), or raw bytes that cannot fail to decode
        method = handler_call_details.method
        with self._lock:  # handlers are looked up per call; wrap each one once
            cached = self._cache.get(method)
            if cached is None or cached[0] is not handler:
                cached = self._cache[method] = (handler, guard(handler, method))
        return cached[1]
