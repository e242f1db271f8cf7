"""moto in server mode in the test process, reached by boto3 over real HTTP, with faults and latency.

``MotoServer`` is moto's ``ThreadedMotoServer`` on 127.0.0.1 (a free port) whose WSGI app is
wrapped by ``Faults``: a middleware that can delay every AWS call and fail a share of them the
ways AWS does (throttling, 503 before the call is served, and 500 after it was served, i.e. an
answer lost on the way back, which is what ClientToken idempotency is for).

Where moto lacks a behaviour mobykit relies on, ``extend_moto`` patches moto's backend in this
process (so it only works for the in-process server) and every patch is undone on exit:
- GetConsoleOutput: moto returns a fixed Xen boot log. Here an instance whose AMI carries the tag
  ``mobykit.image`` prints what our init prints, ``mobykit: ready <image id>`` (there is no real
  guest: the readiness line stands for a boot that succeeded).
- RegisterImage: moto ignores TagSpecifications and BlockDeviceMappings and allows two AMIs of one
  name; here the AMI gets its tags, its root device boots the given snapshot (moto's auto-made
  snapshot is dropped) and a second AMI of a name is ``InvalidAMIName.Duplicate``, as on EC2.
- EBS direct snapshots: moto marks them completed at StartSnapshot; here they stay ``pending``
  until CompleteSnapshot, as on AWS (another server must wait for an upload in progress).
- ClientToken of RunInstances and StartSnapshot: moto makes a new instance/snapshot for a repeated
  token; here a repeated token returns the first one, as EC2 and EBS do.
- ImportSnapshot / DescribeImportSnapshotTasks (moto answers 500): a task that completes at once,
  making a snapshot of the S3 object's size.

``extend_moto`` also removes per-call CPU that moto spends on work whose answer never changes or
is thrown away (``_speed_up``: no answer changes), because in a benchmark this one Python process
serves every call of a group one after another, where the real service serves them on separate
machines: the directory listing of moto's own package (twice per request, ~180 stats each), the
``inspect`` scan of a response class for its action methods (per request), the tags of one resource
found by scanning every tag of the region (per instance per DescribeInstances filter: a listing's
cost grew with every instance and volume ever made), and RunInstances' scan of ~1,300 instance
type offerings whose result is only used when ``MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION`` is set.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

ACCOUNT = "123456789012"
IMAGE_TAG = "mobykit.image"


@dataclass
class Faults:
    """WSGI middleware in front of moto: ``latency`` seconds per call, and a ``rate`` (0..1) of calls
    failed, drawn from a seeded RNG; ``kinds`` picks among "throttle", "503" and "lost".
    ``record``: when a list, the parameters of every EC2 (query protocol) call are appended to it as
    the server received them (``{"Action": ..., "Filter.1.Name": ...}``, and ``"at"``: the
    ``time.monotonic()`` of its arrival), so a test can check what was filtered on the server.
    ``slow``: extra seconds for the EC2 actions named (``{"DescribeInstances": 1.5}``), after ``latency``."""

    app: Callable[..., Any]
    rate: float = 0.0
    latency: float = 0.0
    kinds: tuple[str, ...] = ("throttle", "503", "lost")
    seed: int = 0
    injected: dict[str, int] = field(default_factory=dict)
    calls: int = 0
    record: list[dict[str, str]] | None = None
    slow: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO", "").startswith("/moto-api"):
            return self.app(environ, start_response)
        params = self._params(environ) if self.record is not None or self.slow else None
        if params is not None and self.record is not None:
            with self._lock:
                if self.record is not None:
                    self.record.append({**params, "at": str(time.monotonic())})
        with self._lock:
            self.calls += 1
            kind = self._rng.choice(self.kinds) if self._rng.random() < self.rate else None
            if kind:
                self.injected[kind] = self.injected.get(kind, 0) + 1
        if self.latency:
            time.sleep(self.latency)
        if params and self.slow.get(params.get("Action", "")):
            time.sleep(self.slow[params["Action"]])
        rest_json = environ.get("PATH_INFO", "").startswith("/snapshots")  # the EBS direct APIs
        if kind == "throttle":
            return _error(start_response, rest_json, 429 if rest_json else 503,
                          "ThrottlingException" if rest_json else "RequestLimitExceeded", "Rate exceeded")
        if kind == "503":
            return _error(start_response, rest_json, 503, "ServiceUnavailable", "injected: service unavailable")
        if kind == "lost":
            body = b"".join(self.app(environ, lambda *a, **k: None))  # served, then the answer is lost
            del body
            return _error(start_response, rest_json, 500, "InternalError", "injected: answer lost")
        return self.app(environ, start_response)


    @staticmethod
    def _params(environ: dict[str, Any]) -> dict[str, str] | None:
        """An EC2 (query protocol) call's parameters; None for other calls."""
        if not environ.get("CONTENT_TYPE", "").startswith("application/x-www-form-urlencoded"):
            return None
        size = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(size)
        environ["wsgi.input"] = io.BytesIO(body)  # moto reads it again
        return {k: v[-1] for k, v in urllib.parse.parse_qs(body.decode(), keep_blank_values=True).items()}


def _error(start_response: Callable[..., Any], rest_json: bool, status: int, code: str, message: str) -> list[bytes]:
    reason = {429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}[status]
    if rest_json:
        body = json.dumps({"message": message}).encode()
        headers = [("Content-Type", "application/json"), ("x-amzn-ErrorType", code)]
    else:
        body = (f"<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors>"
                f"<RequestID>{uuid.uuid4()}</RequestID></Response>").encode()
        headers = [("Content-Type", "text/xml")]
    start_response(f"{status} {reason}", headers + [("Content-Length", str(len(body)))])
    return [body]


class MotoServer(ThreadedMotoServer):
    """``ThreadedMotoServer`` on 127.0.0.1:<free port> with ``self.faults`` in front of its app."""

    def __init__(self) -> None:
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self.faults = Faults(DomainDispatcherApplication(create_backend_app))

    def _server_entry(self) -> None:
        self._server = make_server(self._ip_address, self._port, self.faults, True,
                                   request_handler=MotoRequestHandler)
        self._server_ready_event.set()
        self._server.serve_forever()

    @property
    def url(self) -> str:
        host, port = self.get_host_and_port()
        return f"http://{host}:{port}"

    def reset(self) -> None:
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")).read()
        self.faults.rate, self.faults.latency, self.faults.record, self.faults.slow = 0.0, 0.0, None, {}


def ec2_backend(region: str) -> Any:
    from moto.ec2.models import ec2_backends

    return ec2_backends[ACCOUNT][region]


@contextlib.contextmanager
def extend_moto() -> Iterator[None]:
    """Apply the backend extensions listed in the module docstring; undo them on exit."""
    from moto.core.responses import ActionResult
    from moto.ebs.models import EBSBackend
    from moto.ebs.responses import EBSResponse
    from moto.ec2.models import EC2Backend
    from moto.ec2.responses.amis import AmisResponse
    from moto.ec2.responses.general import General
    from moto.ec2.responses.instances import InstanceResponse
    from moto.ec2.utils import Base64EncodedString

    saved: list[tuple[Any, str, Any]] = []
    tokens_lock = threading.Lock()

    def patch(owner: Any, name: str, value: Any) -> None:
        saved.append((owner, name, owner.__dict__[name]))
        setattr(owner, name, value)

    original_console = General.get_console_output

    def get_console_output(self: Any) -> Any:
        instance = self.ec2_backend.get_instance(self._get_param("InstanceId"))
        ami = self.ec2_backend.amis.get(instance.image_id)
        image = (ami.get_tags() and {t["key"]: t["value"] for t in ami.get_tags()}.get(IMAGE_TAG)) if ami else None
        if not image:
            return original_console(self)
        text = f"Linux version 6.1.0 (moto)\nmobykit: ready {image}\n"
        return ActionResult({"InstanceId": instance.id, "Output": Base64EncodedString.from_raw_string(text)})

    def register_image(self: Any) -> Any:
        from moto.ec2.exceptions import EC2ClientError

        self.error_on_dryrun()
        name = self._get_param("Name")
        for ami in list(self.ec2_backend.amis.values()):
            if name and ami.name == name and ami.owner_id == self.current_account:
                raise EC2ClientError("InvalidAMIName.Duplicate", f"AMI name {name} is already in use by AMI {ami.id}")
        image = self.ec2_backend.register_image(name, self._get_param("Description", ""))
        tags = self._parse_tag_specification().get("image", {})
        if tags:
            self.ec2_backend.create_tags([image.id], tags)
        for m in self._get_param("BlockDeviceMappings", []):
            sid = (m.get("Ebs") or {}).get("SnapshotId")
            if sid and sid in self.ec2_backend.snapshots:
                auto = image.ebs_snapshot
                image.ebs_snapshot = self.ec2_backend.snapshots[sid]
                image.root_device_name = m.get("DeviceName") or image.root_device_name
                self.ec2_backend.snapshots.pop(auto.id, None)
        return ActionResult({"ImageId": image.id})

    original_start, original_complete = EBSBackend.start_snapshot, EBSBackend.complete_snapshot
    original_start_response = EBSResponse.start_snapshot
    snapshot_tokens: dict[str, Any] = {}

    def start_snapshot_response(self: Any) -> Any:
        token = self._get_param("ClientToken")
        with tokens_lock:
            if token and token in snapshot_tokens:
                return snapshot_tokens[token]
            result = original_start_response(self)
            if token:
                snapshot_tokens[token] = result
            return result

    def start_snapshot(self: Any, *args: Any, **kwargs: Any) -> Any:
        snap = original_start(self, *args, **kwargs)
        self.ec2_backend.snapshots[snap.snapshot_id].status = "pending"
        return snap

    def complete_snapshot(self: Any, snapshot_id: str) -> str:
        out = original_complete(self, snapshot_id)
        if snapshot_id in self.ec2_backend.snapshots:
            self.ec2_backend.snapshots[snapshot_id].status = "completed"
        return out

    original_run = EC2Backend.run_instances

    def run_instances(self: Any, *args: Any, **kwargs: Any) -> Any:
        from moto import settings

        if not settings.EC2_ENABLE_INSTANCE_TYPE_VALIDATION and not kwargs.get("launch_template"):
            # moto computes whether the type is offered (a scan of ~1,300 offerings) and uses the
            # answer only when validation is on; marking the type "default" skips just that scan
            # (without a launch template nothing else reads the flag).
            kwargs["is_instance_type_default"] = True
        token = kwargs.get("client_token")
        with tokens_lock:
            seen = self.__dict__.setdefault("_mobykit_tokens", {})
            if token and token != "ABCDE" and token in seen:
                return seen[token]
            reservation = original_run(self, *args, **kwargs)
            if token:
                seen[token] = reservation
            return reservation

    def import_snapshot(self: Any) -> Any:
        bucket = self._get_param("DiskContainer.UserBucket.S3Bucket")
        key = self._get_param("DiskContainer.UserBucket.S3Key")
        from moto.s3.models import s3_backends

        obj = s3_backends[ACCOUNT]["aws"].get_object(bucket, key)
        gib = max(1, -(-obj.size // (1 << 30)))
        volume = self.ec2_backend.create_volume(size=gib, zone_name=f"{self.region}a")
        snap = self.ec2_backend.create_snapshot(volume.id, "imported")
        self.ec2_backend.delete_volume(volume.id)
        task = f"import-snap-{uuid.uuid4().hex[:17]}"
        self.ec2_backend.__dict__.setdefault("_mobykit_imports", {})[task] = {
            "ImportTaskId": task, "SnapshotTaskDetail": {"Status": "completed", "SnapshotId": snap.id,
                                                         "DiskImageSize": float(obj.size), "Format": "RAW"}}
        return ActionResult({"ImportTaskId": task, "SnapshotTaskDetail": {"Status": "active"}})

    def describe_import_snapshot_tasks(self: Any) -> Any:
        tasks = self.ec2_backend.__dict__.get("_mobykit_imports", {})
        ids = self._get_param("ImportTaskIds", []) or list(tasks)
        return ActionResult({"ImportSnapshotTasks": [tasks[i] for i in ids if i in tasks]})

    _speed_up(patch)
    patch(General, "get_console_output", get_console_output)
    patch(AmisResponse, "register_image", register_image)
    patch(EBSBackend, "start_snapshot", start_snapshot)
    patch(EBSBackend, "complete_snapshot", complete_snapshot)
    patch(EBSResponse, "start_snapshot", start_snapshot_response)
    # run_instances comes from a mixin: set on EC2Backend itself, and removed again on exit.
    saved.append((EC2Backend, "run_instances", EC2Backend.__dict__.get("run_instances")))
    EC2Backend.run_instances = run_instances
    for name, fn in (("import_snapshot", import_snapshot),
                     ("describe_import_snapshot_tasks", describe_import_snapshot_tasks)):
        saved.append((InstanceResponse, name, InstanceResponse.__dict__.get(name)))
        _set_or_del(InstanceResponse, name, fn)
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            _set_or_del(owner, name, value)


def _speed_up(patch: Callable[[Any, str, Any], None]) -> None:
    """The CPU savings listed in the module docstring; each returns what moto's own code returns."""
    import functools

    import moto.backends
    import moto.core.responses
    from moto.ec2.models.core import TaggedEC2Resource
    from moto.ec2.utils import EC2_PREFIX_TO_RESOURCE, get_prefix

    modules = tuple(moto.backends.list_of_moto_modules())  # the installed package does not change
    patch(moto.backends, "list_of_moto_modules", lambda: modules)

    methods = functools.lru_cache(maxsize=None)(moto.core.responses.method_names_from_class)
    patch(moto.core.responses, "method_names_from_class", lambda clazz: list(methods(clazz)))

    def get_tags(self: Any) -> list[dict[str, str]]:
        # What describe_tags(filters={"resource-id": [id]}) returns, read from the one resource's
        # entry instead of by matching every resource id of the region against a pattern.
        if not self.id:
            return []
        tags = self.ec2_backend.tags.get(self.id) or {}
        kind = EC2_PREFIX_TO_RESOURCE.get(get_prefix(self.id), "")
        return [{"resource_id": self.id, "key": k, "value": v, "resource_type": kind} for k, v in tags.items()]

    patch(TaggedEC2Resource, "get_tags", get_tags)


def _set_or_del(owner: Any, name: str, value: Any) -> None:
    if value is None:
        if name in owner.__dict__:
            delattr(owner, name)
    else:
        setattr(owner, name, value)


@contextlib.contextmanager
def extended_moto() -> Iterator[MotoServer]:
    """A started MotoServer with the tests' backend extensions (``extend_moto``), stopped after."""
    server = MotoServer()
    server.start()
    try:
        with extend_moto():
            yield server
    finally:
        server.stop()


@contextlib.contextmanager
def aws_env(url: str, region: str = "us-east-1") -> Iterator[None]:
    """Point boto3's standard chain at the server: endpoint, region and dummy credentials, no IMDS."""
    keys = {"AWS_ENDPOINT_URL": url, "AWS_REGION": region, "AWS_DEFAULT_REGION": region,
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "MOTO_EC2_LOAD_DEFAULT_AMIS": "false"}  # moto's hundreds of public AMIs slow every listing
    drop = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
    old = {k: os.environ.get(k) for k in (*keys, *drop)}
    os.environ.update(keys)
    for k in drop:
        os.environ.pop(k, None)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def sparse_disk(path: Any, size: int, data: dict[int, bytes]) -> None:
    """A sparse file of ``size`` bytes with ``data`` written at the given offsets."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, chunk in data.items():
            f.seek(offset)
            f.write(chunk)


__all__ = ["ACCOUNT", "Faults", "MotoServer", "aws_env", "ec2_backend", "extend_moto", "sparse_disk"]
