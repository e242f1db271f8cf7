"""The Compute clients, their credentials, retries and operation waits.

Why these choices:
- Every client (instances, images, zones, and the zone and global operations clients) is built
  with the same ``ClientOptions`` and credentials. The library's own ``ExtendedOperation.result()``
  polls through an operations client built without them, i.e. the real endpoint: so mutations use
  the ``*_unary`` methods and we wait with our own operations clients.
- Transient answers (429, 500, 502, 503, 504, a dropped connection) are retried with google-api-core's
  ``Retry`` and a predicate. A mutation keeps its ``requestId`` across those retries, so a retry after a
  lost answer returns the first operation instead of doing the work twice.
- Credentials are Application Default Credentials, except that a plain-http loopback endpoint
  (an emulator or a test's fake) with none found gets anonymous ones.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlparse

from google.api_core import exceptions as gexc
from google.api_core import retry as gretry
from google.api_core.client_options import ClientOptions
from requests import exceptions as rexc

from mobykit.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

T = TypeVar("T")

TRANSIENT = (gexc.TooManyRequests, gexc.InternalServerError, gexc.BadGateway, gexc.ServiceUnavailable,
             gexc.GatewayTimeout, ConnectionError, rexc.ConnectionError, rexc.ChunkedEncodingError, rexc.Timeout)
_retry_transient = gretry.if_exception_type(*TRANSIENT)


class AlreadyExists(InvalidArgument):
    """409: a resource of that name exists (someone else's, or a racing publisher's)."""


class OperationPending(Exception):
    """An operation wait answered before DONE: asked again by the Retry."""


def retry(deadline: float = 300.0) -> gretry.Retry:
    """Transient errors, with a short first back-off (a 429 storm spreads out from there)."""
    return gretry.Retry(predicate=_retry_transient, initial=0.05, maximum=4.0, multiplier=2.0, timeout=deadline)


def _pending_or_transient(exc: BaseException) -> bool:
    """Transient answers, and our "operation not done yet" (a wait may answer before DONE)."""
    return isinstance(exc, OperationPending) or _retry_transient(exc)


def is_loopback_http(endpoint: str | None) -> bool:
    if not endpoint:
        return False
    url = urlparse(endpoint)
    if url.scheme != "http" or not url.hostname:
        return False
    if url.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(url.hostname).is_loopback
    except ValueError:
        return False


def credentials(endpoint: str | None) -> tuple[Any, str | None]:
    """(credentials, ADC's project or None); FailedPrecondition naming what to set when none exist."""
    import google.auth
    from google.auth.credentials import AnonymousCredentials
    from google.auth.exceptions import DefaultCredentialsError

    try:
        creds, project = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
        return creds, project
    except DefaultCredentialsError as e:
        if is_loopback_http(endpoint):
            return AnonymousCredentials(), None
        raise FailedPrecondition(
            "providers.gcp: no Google credentials (Application Default Credentials: set "
            f"GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default login`): {e}") from None


@dataclass
class Compute:
    """The clients of one endpoint and credentials."""

    instances: Any
    images: Any
    zones: Any
    zone_operations: Any
    global_operations: Any
    disks: Any = None

    @classmethod
    def connect(cls, endpoint: str | None, creds: Any) -> Compute:
        from google.cloud import compute_v1

        options = ClientOptions(api_endpoint=endpoint) if endpoint else None
        kw = {"credentials": creds, "transport": "rest", "client_options": options}
        return cls(instances=compute_v1.InstancesClient(**kw), images=compute_v1.ImagesClient(**kw),
                   zones=compute_v1.ZonesClient(**kw), zone_operations=compute_v1.ZoneOperationsClient(**kw),
                   global_operations=compute_v1.GlobalOperationsClient(**kw), disks=compute_v1.DisksClient(**kw))

    # -- calls --------------------------------------------------------------------------------------

    def call(self, fn: Callable[..., T], what: str, **request: Any) -> T:
        """``fn(request=...)`` with transient answers retried; other API errors mapped to ours."""
        try:
            return fn(request=request, retry=retry())
        except gexc.RetryError as e:
            raise Unavailable(f"gcp: {what}: still failing after retries: {e.cause}") from None
        except gexc.NotFound as e:
            raise NotFound(f"gcp: {what}: {e.message}") from None
        except gexc.Conflict as e:
            raise AlreadyExists(f"gcp: {what}: {e.message}") from None
        except gexc.BadRequest as e:
            raise InvalidArgument(f"gcp: {what}: {e.message}") from None
        except (gexc.Unauthorized, gexc.Forbidden) as e:
            raise FailedPrecondition(f"gcp: {what}: {e.message}") from None
        except TRANSIENT as e:
            raise Unavailable(f"gcp: {what}: {e}") from None
        except gexc.PreconditionFailed:
            raise  # a stale fingerprint: the caller reads again and retries (set_tags)
        except gexc.GoogleAPICallError as e:  # anything else the API answers is the API's trouble, not ours
            raise Unavailable(f"gcp: {what}: {e}") from None

    def wait(self, op: Any, project: str, zone: str | None, what: str, deadline: float = 600.0) -> Any:
        """Wait for ``op`` (zone or global) to be DONE with our own operations clients; raise its error."""
        from google.cloud import compute_v1

        done = compute_v1.Operation.Status.DONE
        client = self.zone_operations if zone else self.global_operations
        where = {"project": project, "operation": op.name, **({"zone": zone} if zone else {})}

        def once() -> Any:
            current = client.wait(request=where)
            if current.status != done:
                raise OperationPending(op.name)
            return current

        if op.status != done:
            poll = gretry.Retry(predicate=_pending_or_transient, initial=0.02, maximum=2.0, multiplier=1.5,
                                timeout=deadline)
            try:
                op = poll(once)()
            except gexc.RetryError as e:
                raise Unavailable(f"gcp: {what}: operation {op.name} not done after {deadline:.0f}s: {e.cause}") from None
        errors = list(op.error.errors) if op.error else []
        if errors:
            message = "; ".join(f"{x.code}: {x.message}" for x in errors)
            # GCE puts the HTTP status the call would have had on the operation.
            code = op.http_error_status_code or 0
            if code == 404 or any(x.code == "RESOURCE_NOT_FOUND" for x in errors):
                raise NotFound(f"gcp: {what}: {message}")
            if code == 409 or any(x.code == "RESOURCE_ALREADY_EXISTS" for x in errors):
                raise AlreadyExists(f"gcp: {what}: {message}")
            if code == 400:
                raise InvalidArgument(f"gcp: {what}: {message}")
            if code in (401, 403, 412):  # permissions, quota
                raise FailedPrecondition(f"gcp: {what}: {message}")
            raise Unavailable(f"gcp: {what}: {message}")  # 429, 5xx, ZONE_RESOURCE_POOL_EXHAUSTED: try again
        return op
