"""boto3 clients per region, and botocore's errors as mobykit's.

Why one place: every call must go through the same retry policy (botocore's ``adaptive`` mode:
exponential back-off on throttling and 5xx plus a client-side rate limiter that slows down after
throttles, so twenty parallel Provisions do not keep hammering a throttled account) and the same
connection pool (wide enough for parallel PutSnapshotBlock). Credentials, region and endpoint come
from boto3's standard chain (environment, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL``, instance roles);
clients are thread-safe and made once per region, sessions are not and are used under a lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from mobykit.errors import FailedPrecondition, InvalidArgument, MobykitError, NotFound, Unavailable

MAX_ATTEMPTS = 10
POOL = 64  # connections per client: parallel block uploads and 20+ parallel provisions
NOT_FOUND_CODES = ("InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed", "InvalidAMIID.NotFound",
                   "InvalidSnapshot.NotFound", "ResourceNotFoundException")
INVALID_CODES = ("InvalidParameterValue", "InvalidParameterCombination", "InvalidParameter",
                 "MissingParameter", "ValidationException", "InvalidAMIID.Malformed", "InvalidSubnetID.NotFound",
                 "InvalidGroup.NotFound", "InvalidKeyPair.NotFound", "InvalidBlockDeviceMapping",
                 "Unsupported", "InvalidRequest")
AUTH_CODES = ("AuthFailure", "UnauthorizedOperation", "AccessDenied", "AccessDeniedException",
              "InvalidClientTokenId", "SignatureDoesNotMatch", "OptInRequired", "Blocked")


@dataclass(frozen=True)
class Clients:
    """The service clients of one region."""

    region: str
    ec2: Any
    ebs: Any
    s3: Any


class ClientCache:
    """One ``Clients`` per region, made on first use from one boto3 session."""

    def __init__(self, default_region: str | None = None):
        self.default_region = default_region
        self._lock = threading.Lock()
        self._session: Any = None
        self._clients: dict[str, Clients] = {}

    def _boto_session(self) -> Any:
        if self._session is None:
            import boto3

            self._session = boto3.session.Session()
        return self._session

    def region(self, region: str | None = None) -> str:
        with self._lock:
            name = region or self.default_region or self._boto_session().region_name
        if not name:
            raise InvalidArgument("Region: no AWS region given (Properties.Region, providers.aws.Region, "
                                  "AWS_REGION or a profile's region)")
        return name

    def credentials_present(self) -> None:
        """FailedPrecondition before any call when boto3's chain finds no credentials: the one clear
        error, rather than a NoCredentialsError from deep inside the first publish or launch."""
        with self._lock:
            creds = self._boto_session().get_credentials()
        if creds is None:
            raise FailedPrecondition(
                "AWS credentials: none found (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                "~/.aws/credentials, or an instance role); nothing was created")

    def get(self, region: str | None = None) -> Clients:
        name = self.region(region)
        with self._lock:
            found = self._clients.get(name)
            if found is not None:
                return found
            from botocore.config import Config

            cfg = Config(region_name=name, retries={"mode": "adaptive", "max_attempts": MAX_ATTEMPTS},
                         max_pool_connections=POOL, connect_timeout=10, read_timeout=60)
            s = self._boto_session()
            clients = Clients(name, s.client("ec2", config=cfg), s.client("ebs", config=cfg),
                              s.client("s3", config=cfg))
            self._clients[name] = clients
            return clients


def error_code(e: BaseException) -> str:
    response = getattr(e, "response", None) or {}
    return str((response.get("Error") or {}).get("Code") or "")


def translate(e: BaseException, what: str) -> MobykitError:
    """A botocore/boto3 exception as the mobykit error the transports map to gRPC codes."""
    from botocore import exceptions as bx

    if isinstance(e, MobykitError):
        return e
    if isinstance(e, bx.NoCredentialsError | bx.PartialCredentialsError):
        return FailedPrecondition(f"AWS credentials: {e}; nothing was created")
    if isinstance(e, bx.NoRegionError):
        return InvalidArgument("Region: no AWS region given")
    if isinstance(e, bx.ParamValidationError):
        return InvalidArgument(f"{what}: {e}")
    if isinstance(e, bx.ClientError):
        code = error_code(e)
        message = (e.response.get("Error") or {}).get("Message") or str(e)
        text = f"{what}: {code}: {message}"
        if code in NOT_FOUND_CODES or code.endswith(".NotFound") and "Instance" in code:
            return NotFound(text)
        if code in AUTH_CODES:
            return FailedPrecondition(text)
        if code in INVALID_CODES or code.startswith("Invalid"):
            return InvalidArgument(text)
        return Unavailable(text)
    if isinstance(e, bx.WaiterError):
        return Unavailable(f"{what}: {e}")
    if isinstance(e, bx.BotoCoreError):
        return Unavailable(f"{what}: {e}")
    return Unavailable(f"{what}: {e}")


@contextmanager
def api(what: str) -> Iterator[None]:
    """Run AWS calls, re-raising their failures as mobykit errors that say what was being done."""
    from botocore import exceptions as bx

    try:
        yield
    except (bx.BotoCoreError, bx.ClientError) as e:
        raise translate(e, what) from None
