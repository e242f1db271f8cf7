"""Talking to a running ``mobykit serve`` over gRPC with the SPI's Python interfaces.

``connect(address)`` returns objects that implement ``InstancePlugin``, ``FlavorPlugin`` and
``GroupPlugin`` (plus the image store calls), so code such as the group CLI works the same against
an in-process plugin and a remote server. Server statuses come back as mobykit's errors
(NOT_FOUND -> NotFound, ...), so callers handle one family of exceptions.

Address: ``--server`` or ``$MOBYKIT_SERVER``, else the socket ``mobykit serve`` listens on by default
(``~/.mobykit/mobykit.sock``); ``unix:PATH``, ``tcp://HOST:PORT`` or ``HOST:PORT``.
TLS for TCP comes from ``tls=`` or ``$MOBYKIT_TLS_CA``, ``$MOBYKIT_TLS_CERT``, ``$MOBYKIT_TLS_KEY``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from mobykit import errors
from mobykit.rpc import convert as c
from mobykit.rpc.gen import mobykit_pb2 as pb
from mobykit.rpc.gen import mobykit_pb2_grpc as pbg
from mobykit.rpc.plugins import DEFAULT_ADDRESS
from mobykit.spi.group import GroupDescription, GroupSpec
from mobykit.spi.types import Allocation, Description, DestroyReason, Health, Index, Spec

ENV_SERVER = "MOBYKIT_SERVER"

_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.Unavailable,
}


@dataclass(frozen=True)
class ClientTLS:
    ca: Path
    cert: Path | None = None
    key: Path | None = None


def _call(fn):
    """Run one RPC; a non-OK status becomes the matching mobykit error naming the server's reason."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            detail = e.details() if hasattr(e, "details") else str(e)
            cls = _ERRORS.get(code, errors.MobykitError)
            if code == grpc.StatusCode.UNAVAILABLE:
                detail = f"{self._address}: {detail}"
            raise cls(detail or str(code)) from None

    return wrapper


class _Base:
    def __init__(self, stub, address: str, timeout: float | None):
        self._stub, self._address, self._timeout = stub, address, timeout


class InstanceClient(_Base):
    """InstancePlugin over gRPC."""

    @_call
    def validate(self, type: str, properties: Any) -> None:
        req = pb.ValidateInstanceRequest(type=type)
        if properties is not None:
            c.to_value(properties, req.properties)
        self._stub.Validate(req, timeout=self._timeout)

    @_call
    def provision(self, type: str, spec: Spec) -> str:
        req = pb.ProvisionRequest(type=type)
        c.spec_to_pb(spec, req.spec)
        return self._stub.Provision(req, timeout=self._timeout).id

    @_call
    def label(self, type: str, instance: str, labels: dict[str, str]) -> None:
        self._stub.Label(pb.LabelRequest(type=type, instance=instance, labels=labels), timeout=self._timeout)

    @_call
    def destroy(self, type: str, instance: str, reason: DestroyReason = DestroyReason.TERMINATE) -> None:
        req = pb.DestroyRequest(type=type, instance=instance, reason=DestroyReason(reason).value)
        self._stub.Destroy(req, timeout=self._timeout)

    @_call
    def describe_instances(self, type: str, tags: dict[str, str], properties: bool = False) -> list[Description]:
        req = pb.DescribeInstancesRequest(type=type, tags=tags, properties=properties)
        return [c.description_from_pb(d) for d in self._stub.DescribeInstances(req, timeout=self._timeout).descriptions]


class FlavorClient(_Base):
    """FlavorPlugin over gRPC."""

    @_call
    def validate(self, type: str, properties: Any, allocation: Allocation) -> None:
        req = pb.ValidateFlavorRequest(type=type)
        if properties is not None:
            c.to_value(properties, req.properties)
        c.allocation_to_pb(allocation, req.allocation)
        self._stub.Validate(req, timeout=self._timeout)

    @_call
    def prepare(self, type: str, properties: Any, spec: Spec, allocation: Allocation, index: Index) -> Spec:
        req = pb.PrepareRequest(type=type)
        if properties is not None:
            c.to_value(properties, req.properties)
        c.spec_to_pb(spec, req.spec)
        c.allocation_to_pb(allocation, req.allocation)
        c.index_to_pb(index, req.index)
        return c.spec_from_pb(self._stub.Prepare(req, timeout=self._timeout).spec)

    @_call
    def healthy(self, type: str, properties: Any, instance: Description) -> Health:
        req = pb.HealthyRequest(type=type)
        if properties is not None:
            c.to_value(properties, req.properties)
        c.description_to_pb(instance, req.instance)
        return Health(self._stub.Healthy(req, timeout=self._timeout).health)

    @_call
    def drain(self, type: str, properties: Any, instance: Description) -> None:
        req = pb.DrainRequest(type=type)
        if properties is not None:
            c.to_value(properties, req.properties)
        c.description_to_pb(instance, req.instance)
        self._stub.Drain(req, timeout=self._timeout)


class GroupClient(_Base):
    """GroupPlugin over gRPC."""

    @_call
    def commit_group(self, spec: GroupSpec, pretend: bool) -> str:
        req = pb.CommitGroupRequest(pretend=pretend)
        c.group_spec_to_pb(spec, req.spec)
        return self._stub.CommitGroup(req, timeout=self._timeout).details

    @_call
    def free_group(self, id: str) -> None:
        self._stub.FreeGroup(pb.GroupRequest(id=id), timeout=self._timeout)

    @_call
    def describe_group(self, id: str) -> GroupDescription:
        return c.group_description_from_pb(self._stub.DescribeGroup(pb.GroupRequest(id=id), timeout=self._timeout).description)

    @_call
    def server_role(self, id: str) -> dict | None:
        """The answering server's role in leader election (``ServerRole`` of DescribeGroup as a dict),
        None from a server that does not report one (an older mobykit, or another Group plugin)."""
        r = self._stub.DescribeGroup(pb.GroupRequest(id=id), timeout=self._timeout)
        if not r.HasField("server"):
            return None
        s = r.server
        return {"role": s.role, "term": s.term, "lease": s.lease, "leader": s.leader, "ttl": s.ttl, "name": s.name}

    @_call
    def destroy_group(self, id: str) -> None:
        self._stub.DestroyGroup(pb.GroupRequest(id=id), timeout=self._timeout)

    @_call
    def inspect_groups(self) -> list[GroupSpec]:
        return [c.group_spec_from_pb(s) for s in self._stub.InspectGroups(pb.InspectGroupsRequest(), timeout=self._timeout).groups]

    @_call
    def destroy_instances(self, id: str, instances: list[str]) -> None:
        self._stub.DestroyInstances(pb.DestroyInstancesRequest(id=id, instances=instances), timeout=self._timeout)

    @_call
    def size(self, id: str) -> int:
        return self._stub.Size(pb.GroupRequest(id=id), timeout=self._timeout).size

    @_call
    def set_size(self, id: str, size: int) -> None:
        if size < 0:
            raise errors.InvalidArgument(f"size: must be >= 0, got {size}")
        self._stub.SetSize(pb.SetSizeRequest(id=id, size=size), timeout=self._timeout)


class ImagesClient(_Base):
    """The built-image store over gRPC; returns the server's pb.Image messages."""

    @_call
    def build(self, spec_paths: list[str] = (), spec_yaml: list[str] = (), pull: bool = False) -> pb.Image:
        req = pb.BuildRequest(spec_paths=list(spec_paths), spec_yaml=list(spec_yaml), pull=pull)
        return self._stub.Build(req, timeout=None)  # builds take as long as they take

    @_call
    def get(self, image_id: str) -> pb.Image:
        return self._stub.Get(pb.GetImageRequest(id=image_id), timeout=self._timeout)

    @_call
    def list(self) -> list[pb.Image]:
        return list(self._stub.List(pb.ListImagesRequest(), timeout=self._timeout).images)


@dataclass
class Clients:
    instance: InstanceClient
    flavor: FlavorClient
    group: GroupClient
    images: ImagesClient
    channel: grpc.Channel

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Clients:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def target(address: str) -> tuple[str, bool]:
    """(gRPC target, is_tcp) for a user-written address."""
    if not address:
        raise errors.InvalidArgument(f"--server: no server address (set --server or ${ENV_SERVER})")
    if address.startswith("unix://"):
        return "unix:" + address[len("unix://") :], False
    if address.startswith("unix:"):
        return address, False
    if address.startswith("tcp://"):
        return address[len("tcp://") :], True
    if address.startswith("/"):
        return f"unix:{address}", False
    return address, True


def _env_tls() -> ClientTLS | None:
    ca = os.environ.get("MOBYKIT_TLS_CA")
    if not ca:
        return None
    cert, key = os.environ.get("MOBYKIT_TLS_CERT"), os.environ.get("MOBYKIT_TLS_KEY")
    return ClientTLS(Path(ca), Path(cert) if cert else None, Path(key) if key else None)


def connect(address: str | None = None, *, tls: ClientTLS | None = None, timeout: float | None = 30.0) -> Clients:
    """Clients for the server at ``address`` (default ``$MOBYKIT_SERVER``, else DEFAULT_ADDRESS). The channel connects
    lazily: an unreachable server shows up as Unavailable on the first call, naming the address."""
    if address is None:
        address = os.environ.get(ENV_SERVER) or DEFAULT_ADDRESS
    tgt, tcp = target(address)
    tls = tls or (_env_tls() if tcp else None)
    if tcp and tls is not None:
        try:
            creds = grpc.ssl_channel_credentials(
                root_certificates=tls.ca.read_bytes(),
                private_key=tls.key.read_bytes() if tls.key else None,
                certificate_chain=tls.cert.read_bytes() if tls.cert else None,
            )
        except OSError as e:
            raise errors.InvalidArgument(f"{e.filename}: cannot read TLS file: {e.strerror}") from None
        channel = grpc.secure_channel(tgt, creds)
    else:
        channel = grpc.insecure_channel(tgt)
    return Clients(
        instance=InstanceClient(pbg.InstanceStub(channel), address, timeout),
        flavor=FlavorClient(pbg.FlavorStub(channel), address, timeout),
        group=GroupClient(pbg.GroupStub(channel), address, timeout),
        images=ImagesClient(pbg.ImagesStub(channel), address, timeout),
        channel=channel,
    )
