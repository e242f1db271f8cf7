"""How mobykit's errors look on the wire.

Why here and not in each transport: gRPC and Infrakit's JSON-RPC must agree on what a caller's
mistake is versus the server's, so the classification lives in one table. Codes are grpc.StatusCode
member names (strings) so this module does not import grpc.
"""

from __future__ import annotations

import logging

from mobykit import errors

log = logging.getLogger("mobykit.rpc")

# Most specific first: the first class an error is an instance of decides its code.
_CODES: tuple[tuple[type[BaseException], str], ...] = (
    (errors.InvalidArgument, "INVALID_ARGUMENT"),
    (errors.SpecError, "INVALID_ARGUMENT"),
    (errors.NotFound, "NOT_FOUND"),
    (errors.FailedPrecondition, "FAILED_PRECONDITION"),
    (errors.Unavailable, "UNAVAILABLE"),
    (errors.CacheMiss, "FAILED_PRECONDITION"),
    (errors.ImageError, "FAILED_PRECONDITION"),
    (errors.RegistryError, "UNAVAILABLE"),
    (errors.BuildError, "FAILED_PRECONDITION"),
    (errors.MobykitError, "FAILED_PRECONDITION"),
)


def classify(exc: BaseException, method: str = "") -> tuple[str, str]:
    """(status code name, message) for ``exc``. An unexpected exception is a bug: it is logged with
    its traceback and the caller gets INTERNAL with a message that names the method, not a traceback."""
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code, str(exc) or cls.__name__
    log.error("internal error in %s: %s", method or "call", exc, exc_info=exc)
    return "INTERNAL", f"internal error in {method or 'call'}: {type(exc).__name__}: {exc}"
