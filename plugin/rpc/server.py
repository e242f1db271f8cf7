"""mobykit's gRPC server: the Instance, Flavor, Group and Images services over the SPI objects.

Why the plugins are injected (``Plugins``): the server only adapts messages; which instance core,
flavors and group controller exist depends on what is installed and configured, and tests pass
in-memory ones. A missing plugin answers UNIMPLEMENTED instead of failing the whole server.
Reflection and grpc.health.v1 are always on, so grpcurl and load balancers work without the proto.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import stat
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mobykit.core.errors import classify
from mobykit.errors import InvalidArgument
from mobykit.rpc import convert as c
from mobykit.rpc import logthrottle
from mobykit.rpc.decodeguard import DecodeGuard
from mobykit.rpc.gen import mobykit_pb2 as pb
from mobykit.rpc.gen import mobykit_pb2_grpc as pbg
from mobykit.rpc.limits import clip
from mobykit.rpc.plugins import Plugins, Unimplemented
from mobykit.spi.types import DestroyReason

log = logging.getLogger("mobykit.rpc")

SERVICE_NAMES = tuple(pb.DESCRIPTOR.services_by_name[s].full_name for s in ("Instance", "Flavor", "Group", "Images"))


def rpc(method: Callable) -> Callable:
    """Turn mobykit errors into gRPC statuses; the server keeps serving after any of them.

    An unexpected exception is a bug: ``classify`` logs its traceback, and the log throttle
    (``mobykit.rpc.logthrottle``, installed by ``make_server``) keeps its repeats to one line a
    minute. Messages are clipped, since a message quoting a huge field would not fit gRPC's
    trailer and the caller would get RESOURCE_EXHAUSTED instead of the real status."""
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self, request, context):
        log.debug("call %s.%s", type(self).__name__, name)
        try:
            return method(self, request, context)
        except Unimplemented as e:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, clip(str(e)))
        except Exception as e:  # every failure becomes a status, never a dropped connection
            code, message = classify(e, f"{type(self).__name__}.{name}")
            context.abort(getattr(grpc.StatusCode, code), clip(message))

    return wrapper


def destroy_reason(text: str) -> DestroyReason:
    try:
        return DestroyReason(text or "terminate")
    except ValueError:
        raise InvalidArgument(f"reason: must be 'terminate' or 'rolling_update', got {text!r}") from None


class InstanceService(pbg.InstanceServicer):
    def __init__(self, plugins: Plugins):
        self.plugins = plugins

    @property
    def p(self):
        if self.plugins.instance is None:
            raise Unimplemented("no instance plugin is configured on this server")
        return self.plugins.instance

    @rpc
    def Validate(self, req, ctx):
        self.p.validate(req.type, c.from_value(req.properties, req.HasField("properties")))
        return pb.ValidateResponse(type=req.type, ok=True)

    @rpc
    def Provision(self, req, ctx):
        if not req.HasField("spec"):
            raise InvalidArgument("spec: required")
        return pb.ProvisionResponse(type=req.type, id=self.p.provision(req.type, c.spec_from_pb(req.spec)))

    @rpc
    def Label(self, req, ctx):
        if not req.instance:
            raise InvalidArgument("instance: required")
        self.p.label(req.type, req.instance, dict(req.labels))
        return pb.LabelResponse(type=req.type, ok=True)

    @rpc
    def Destroy(self, req, ctx):
        if not req.instance:
            raise InvalidArgument("instance: required")
        self.p.destroy(req.type, req.instance, destroy_reason(req.reason))
        return pb.DestroyResponse(type=req.type, ok=True)

    @rpc
    def DescribeInstances(self, req, ctx):
        out = pb.DescribeInstancesResponse(type=req.type)
        for d in self.p.describe_instances(req.type, dict(req.tags), req.properties):
            c.description_to_pb(d, out.descriptions.add())
        return out


class FlavorService(pbg.FlavorServicer):
    def __init__(self, plugins: Plugins):
        self.plugins = plugins

    @rpc
    def Validate(self, req, ctx):
        props = c.from_value(req.properties, req.HasField("properties"))
        self.plugins.flavor(req.type).validate(req.type, props, c.allocation_from_pb(req.allocation))
        return pb.ValidateResponse(type=req.type, ok=True)

    @rpc
    def Prepare(self, req, ctx):
        props = c.from_value(req.properties, req.HasField("properties"))
        spec = self.plugins.flavor(req.type).prepare(
            req.type, props, c.spec_from_pb(req.spec), c.allocation_from_pb(req.allocation), c.index_from_pb(req.index)
        )
        out = pb.PrepareResponse(type=req.type)
        c.spec_to_pb(spec, out.spec)
        return out

    @rpc
    def Healthy(self, req, ctx):
        if not req.HasField("instance") or not req.instance.id:
            raise InvalidArgument("instance.id: required")
        props = c.from_value(req.properties, req.HasField("properties"))
        h = self.plugins.flavor(req.type).healthy(req.type, props, c.description_from_pb(req.instance))
        return pb.HealthyResponse(type=req.type, health=c.health_to_pb(h))

    @rpc
    def Drain(self, req, ctx):
        if not req.HasField("instance") or not req.instance.id:
            raise InvalidArgument("instance.id: required")
        props = c.from_value(req.properties, req.HasField("properties"))
        self.plugins.flavor(req.type).drain(req.type, props, c.description_from_pb(req.instance))
        return pb.DrainResponse(type=req.type, ok=True)


class GroupService(pbg.GroupServicer):
    def __init__(self, plugins: Plugins):
        self.plugins = plugins

    @property
    def g(self):
        if self.plugins.group is None:
            raise Unimplemented("no group plugin is configured on this server")
        return self.plugins.group

    @staticmethod
    def _id(req) -> str:
        if not req.id:
            raise InvalidArgument("id: a group id is required")
        return req.id

    @rpc
    def CommitGroup(self, req, ctx):
        if not req.spec.id:
            raise InvalidArgument("spec.id: a group id is required")
        details = self.g.commit_group(c.group_spec_from_pb(req.spec), req.pretend)
        return pb.CommitGroupResponse(id=req.spec.id, details=details or "")

    @rpc
    def FreeGroup(self, req, ctx):
        self.g.free_group(self._id(req))
        return pb.GroupResponse(id=req.id)

    @rpc
    def DescribeGroup(self, req, ctx):
        d = self.g.describe_group(self._id(req))
        out = pb.DescribeGroupResponse(id=req.id)
        c.group_description_to_pb(d, out.description)
        role = getattr(self.g, "role", None)
        r = role() if callable(role) else None
        if r is not None:
            out.server.CopyFrom(pb.ServerRole(role=r.role, term=r.term, lease=r.lease, leader=r.leader,
                                              ttl=r.ttl, name=r.name))
        return out

    @rpc
    def DestroyGroup(self, req, ctx):
        self.g.destroy_group(self._id(req))
        return pb.GroupResponse(id=req.id)

    @rpc
    def InspectGroups(self, req, ctx):
        out = pb.InspectGroupsResponse()
        for s in self.g.inspect_groups():
            c.group_spec_to_pb(s, out.groups.add())
        return out

    @rpc
    def DestroyInstances(self, req, ctx):
        self.g.destroy_instances(self._id(req), list(req.instances))
        return pb.GroupResponse(id=req.id)

    @rpc
    def Size(self, req, ctx):
        return pb.SizeResponse(id=req.id, size=self.g.size(self._id(req)))

    @rpc
    def SetSize(self, req, ctx):
        self.g.set_size(self._id(req), req.size)
        return pb.GroupResponse(id=req.id)


def _store():
    """mobykit.image.store when it is installed; UNIMPLEMENTED otherwise."""
    try:
        from mobykit.image import store
    except ModuleNotFoundError as e:
        if e.name != "mobykit.image.store":
            raise
        raise Unimplemented("the built-image store (mobykit.image.store) is not available on this server") from None
    return store


class ImagesService(pbg.ImagesServicer):
    def __init__(self, plugins: Plugins):
        self.plugins = plugins

    def _cache_kwargs(self) -> dict[str, Any]:
        from mobykit.core.instance import configured_cache

        return {"cache": configured_cache(self.plugins.config)}

    @rpc
    def Build(self, req, ctx):
        store = _store()
        if not req.spec_paths and not req.spec_yaml:
            raise InvalidArgument("spec_paths/spec_yaml: at least one spec is required")
        from mobykit.core import paths
        from mobykit.spec.load import SpecSource

        # Paths are checked against the server's allowed roots (naming spec_paths[i]); inline
        # YAML is parsed from the request, its relative paths taken from the first root.
        sources = [SpecSource(name=p, path=paths.resolve(p, f"spec_paths[{i}]"), field=f"spec_paths[{i}]")
                   for i, p in enumerate(req.spec_paths)]
        sources += [SpecSource(name=f"spec_yaml[{i}]", text=text, base=paths.current().base(), field=f"spec_yaml[{i}]")
                    for i, text in enumerate(req.spec_yaml)]
        image = store.build_and_store(sources, pull=req.pull, field="spec", **self._cache_kwargs())
        return c.image_to_pb(image)

    @rpc
    def Get(self, req, ctx):
        if not req.id:
            raise InvalidArgument("id: an image id (sha256:...) is required")
        return c.image_to_pb(_store().get(req.id, **self._cache_kwargs()))

    @rpc
    def List(self, req, ctx):
        store = _store()
        lister = getattr(store, "list_images", None) or getattr(store, "list", None)
        if lister is None:
            raise Unimplemented("this image store cannot list its images")
        out = pb.ListImagesResponse()
        for image in sorted(lister(**self._cache_kwargs()), key=lambda i: i.id):
            out.images.append(c.image_to_pb(image))
        return out


# -- listening ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSFiles:
    cert: Path
    key: Path
    client_ca: Path


@dataclass(frozen=True)
class Listen:
    """One address: ``unix:PATH`` or ``tcp://HOST:PORT``."""

    kind: str  # "unix" | "tcp"
    target: str  # path, or host:port

    @classmethod
    def parse(cls, text: str) -> Listen:
        if text.startswith("unix://"):
            path = text[len("unix://") :]
        elif text.startswith("unix:"):
            path = text[len("unix:") :]
        elif text.startswith("tcp://"):
            hostport = text[len("tcp://") :]
            host, sep, port = hostport.rpartition(":")
            if not sep or not host or not port.isdigit() or int(port) > 65535:
                raise InvalidArgument(f"--listen {text}: expected tcp://HOST:PORT")
            return cls("tcp", hostport)
        else:
            raise InvalidArgument(f"--listen {text}: expected unix:PATH or tcp://HOST:PORT")
        if not path:
            raise InvalidArgument(f"--listen {text}: empty socket path")
        return cls("unix", str(Path(path).absolute()))

    def __str__(self) -> str:
        return f"unix:{self.target}" if self.kind == "unix" else f"tcp://{self.target}"


def clear_stale_socket(path: Path) -> None:
    """Remove a socket file left by a dead server; refuse to steal one that is still served."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise InvalidArgument(f"{path}: exists and is not a socket; refusing to replace it")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
    except OSError:
        path.unlink()  # nobody answers: stale
        return
    finally:
        s.close()
    raise InvalidArgument(f"{path}: another server is listening on this socket")


@contextlib.contextmanager
def private_umask():
    """Sockets are created 0600 from the start (no window where others could connect)."""
    old = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(old)


def make_server(
    plugins: Plugins,
    listens: list[Listen],
    *,
    tls: TLSFiles | None = None,
    insecure: bool = False,
    max_workers: int = 16,
) -> tuple[grpc.Server, list[str]]:
    """A started gRPC server on every address; returns it and the bound addresses (a tcp port of 0
    is replaced by the one the kernel chose). TCP without TLS needs ``insecure=True``."""
    for listen in listens:  # checked before anything is bound, so a refusal leaves nothing behind
        if listen.kind == "tcp" and tls is None and not insecure:
            raise InvalidArgument(
                f"--listen {listen}: TCP needs --tls-cert, --tls-key and --tls-client-ca (or --insecure)"
            )
    logthrottle.install()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        interceptors=[DecodeGuard()],  # undecodable requests: INVALID_ARGUMENT, not INTERNAL + traceback
    )
    pbg.add_InstanceServicer_to_server(InstanceService(plugins), server)
    pbg.add_FlavorServicer_to_server(FlavorService(plugins), server)
    pbg.add_GroupServicer_to_server(GroupService(plugins), server)
    pbg.add_ImagesServicer_to_server(ImagesService(plugins), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("",) + SERVICE_NAMES:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        SERVICE_NAMES + (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    creds = None
    if tls is not None:
        try:
            creds = grpc.ssl_server_credentials(
                [(tls.key.read_bytes(), tls.cert.read_bytes())],
                root_certificates=tls.client_ca.read_bytes(),
                require_client_auth=True,
            )
        except OSError as e:
            raise InvalidArgument(f"{e.filename}: cannot read TLS file: {e.strerror}") from None
    bound = []
    made: list[Path] = []
    try:
        with private_umask():
            for listen in listens:
                if listen.kind == "unix":
                    clear_stale_socket(Path(listen.target))
                    made.append(Path(listen.target))
                    _add_port(server.add_insecure_port, listen, target=f"unix:{listen.target}")
                    bound.append(str(listen))
                    continue
                if creds is not None:
                    port = _add_port(server.add_secure_port, listen, creds)
                else:
                    port = _add_port(server.add_insecure_port, listen)
                host = listen.target.rpartition(":")[0]
                bound.append(f"tcp://{host}:{port}")
            server.start()
    except BaseException:
        # One address failed: release the others, so a refused start leaves no socket behind.
        server.stop(None)
        for path in made:
            path.unlink(missing_ok=True)
        raise
    for listen in listens:
        if listen.kind == "unix":
            os.chmod(listen.target, 0o600)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    server.mobykit_health = health_servicer  # type: ignore[attr-defined]  (so stop() can report NOT_SERVING)
    return server, bound


def _add_port(add, listen: Listen, *creds, target: str | None = None) -> int:
    try:
        port = add(target or listen.target, *creds)
    except RuntimeError as e:
        raise InvalidArgument(f"--listen {listen}: cannot bind: {e}") from None
    if not port:
        raise InvalidArgument(f"--listen {listen}: cannot bind (address in use or not local)")
    return port


def stop(server: grpc.Server, grace: float = 30.0) -> None:
    """Graceful stop: refuse new calls, let in-flight ones finish (up to ``grace`` seconds), then
    log how many throttled log lines were held back."""
    h = getattr(server, "mobykit_health", None)
    if h is not None:
        h.enter_graceful_shutdown()
    server.stop(grace).wait()
    logthrottle.THROTTLE.flush()


__all__ = ["Listen", "Plugins", "TLSFiles", "make_server", "stop"]
