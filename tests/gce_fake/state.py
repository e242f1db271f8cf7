"""What the fake Compute Engine holds: instances, images, zone and global operations.

Faithful where mobykit's correctness depends on it, from the v1 REST reference:
- every mutation returns an Operation that goes PENDING -> RUNNING -> DONE, one step per poll
  (``operations.get`` or ``operations.wait``), and by time for nobody polling (``op_seconds``);
  its effect is final when it is DONE (an instance is RUNNING, an image READY, a deleted instance gone);
- ``requestId`` (a UUID) makes a mutation idempotent: the same id again returns the first
  operation and does nothing else, whatever the body says;
- 404 for unknown zones and resources, 409 for a name in use, 412 for a stale label or metadata
  fingerprint, 400 for a label, metadata key or resource name breaking GCE's rules;
- an image made with ``rawDisk.source`` reads that Cloud Storage object (when a storage endpoint is
  configured): a missing object fails the operation, as the real import does.

Health stands in for the guest: an instance booted from an image whose description holds a mobykit
image id (``sha256:<64 hex>``) prints ``mobykit: ready <id>`` on serial port 1 once it is RUNNING,
what mobykit's init prints on a real VM's ttyS0.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

BASE = "https://www.googleapis.com/compute/v1"
NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
METADATA_KEY = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
IMAGE_ID = re.compile(r"sha256:[0-9a-f]{64}")
STEPS = ("PENDING", "RUNNING", "DONE")


class ApiError(Exception):
    """An error answer: HTTP status, GCE reason and message (the JSON body real GCE sends)."""

    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message,
                          "errors": [{"message": self.message, "domain": "global", "reason": self.reason}]}}


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class Operation:
    body: dict[str, Any]
    created: float
    on_running: Any = None
    on_done: Any = None
    step: int = 0
    error: ApiError | None = None


@dataclass
class World:
    """The fake's state. ``zones`` exist in every project; ``op_seconds`` completes unpolled ops."""

    zones: tuple[str, ...] = ("us-central1-a", "us-central1-b", "europe-west1-b")
    op_seconds: float = 5.0
    storage_exists: Any = None  # callable(bucket, object) -> bool, or None: do not check
    instances: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    images: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    disks: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)  # disks.py
    operations: dict[str, Operation] = field(default_factory=dict)
    requests: dict[str, str] = field(default_factory=dict)  # requestId -> operation name
    serial: dict[tuple[str, str, str], str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # effects actually applied, by kind

    def __post_init__(self) -> None:
        self.lock = threading.RLock()
        self._ids = itertools.count(1000000000000000000)

    # -- helpers --------------------------------------------------------------------------------

    def zone(self, project: str, zone: str) -> dict[str, Any]:
        if zone not in self.zones:
            raise ApiError(404, "notFound", f"The resource 'projects/{project}/zones/{zone}' was not found")
        return {"kind": "compute#zone", "id": str(abs(hash(zone)) % 10**12), "name": zone, "status": "UP",
                "region": f"{BASE}/projects/{project}/regions/{zone.rsplit('-', 1)[0]}",
                "selfLink": f"{BASE}/projects/{project}/zones/{zone}"}

    def _count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def _operation(self, project: str, zone: str | None, kind: str, target: str, request_id: str | None,
                   on_running=None, on_done=None, error: ApiError | None = None) -> dict[str, Any]:
        name = f"operation-{int(time.time() * 1000)}-{uuid.uuid4().hex[:12]}"
        scope = f"{BASE}/projects/{project}/zones/{zone}" if zone else f"{BASE}/projects/{project}/global"
        body = {"kind": "compute#operation", "id": str(next(self._ids)), "name": name, "operationType": kind,
                "targetLink": target, "targetId": str(next(self._ids)), "status": "PENDING", "progress": 0,
                "user": "mobykit-test@example.iam.gserviceaccount.com", "insertTime": now_rfc3339(),
                "selfLink": f"{scope}/operations/{name}"}
        if zone:
            body["zone"] = f"{BASE}/projects/{project}/zones/{zone}"
        self.operations[name] = Operation(body, time.monotonic(), on_running, on_done, error=error)
        if request_id:
            self.requests[request_id] = name
        return dict(body)

    def _replay(self, request_id: str | None) -> dict[str, Any] | None:
        if request_id is None:
            return None
        try:
            uuid.UUID(request_id)
        except ValueError:
            raise ApiError(400, "invalid", f"Invalid value for field 'requestId': '{request_id}'. "
                                           "Must be a valid UUID.") from None
        name = self.requests.get(request_id)
        return None if name is None else self.poll(name, advance=False)

    # -- operations -------------------------------------------------------------------------------

    def poll(self, name: str, advance: bool = True) -> dict[str, Any]:
        op = self.operations.get(name)
        if op is None:
            raise ApiError(404, "notFound", f"The resource 'operations/{name}' was not found")
        by_time = 2 if time.monotonic() - op.created >= self.op_seconds else 0
        target = max(op.step + (1 if advance else 0), by_time)
        while op.step < min(target, 2):
            op.step += 1
            if op.step == 1:
                op.body.update(status="RUNNING", progress=50, startTime=now_rfc3339())
                if op.on_running:
                    op.on_running()
            else:
                op.body.update(status="DONE", progress=100, endTime=now_rfc3339())
                if op.on_done:
                    try:
                        op.on_done()
                    except ApiError as e:
                        op.error = e
                if op.error is not None:
                    op.body["error"] = {"errors": [{"code": op.error.reason.upper(), "message": op.error.message}]}
                    op.body["httpErrorStatusCode"] = op.error.code
                    op.body["httpErrorMessage"] = op.error.reason.upper()
        return dict(op.body)

    # -- instances --------------------------------------------------------------------------------

    def _instance(self, project: str, zone: str, name: str) -> dict[str, Any]:
        self.zone(project, zone)
        inst = self.instances.get((project, zone, name))
        if inst is None:
            raise ApiError(404, "notFound", f"The resource 'projects/{project}/zones/{zone}/instances/{name}' "
                                            "was not found")
        return inst

    def get_instance(self, project: str, zone: str, name: str) -> dict[str, Any]:
        return dict(self._instance(project, zone, name))

    def list_instances(self, project: str, zone: str) -> list[dict[str, Any]]:
        self.zone(project, zone)
        return [dict(v) for (p, z, _), v in sorted(self.instances.items()) if p == project and z == zone]

    @staticmethod
    def _check_labels(labels: Any) -> dict[str, str]:
        labels = labels or {}
        if len(labels) > 64:
            raise ApiError(400, "invalid", "Invalid value for field 'resource.labels': too many labels (max 64).")
        for k, v in labels.items():
            if not LABEL_KEY.match(k):
                raise ApiError(400, "invalid", f"Invalid value for field 'resource.labels': '{k}'. Label key "
                                               "must start with a lowercase letter and may contain only ...")
            if not isinstance(v, str) or not LABEL_VALUE.match(v):
                raise ApiError(400, "invalid", f"Invalid value for field 'resource.labels': '{v}'. Label value "
                                               "may contain only lowercase letters, digits, '_' and '-'.")
        return dict(labels)

    @staticmethod
    def _check_metadata(metadata: Any) -> list[dict[str, str]]:
        items = (metadata or {}).get("items") or []
        for item in items:
            if not METADATA_KEY.match(item.get("key", "")):
                raise ApiError(400, "invalid", f"Invalid value for field 'resource.metadata': "
                                               f"'{item.get('key')}'. Metadata key is invalid.")
        return [{"key": i["key"], "value": i.get("value", "")} for i in items]

    def _source_image(self, link: str) -> dict[str, Any]:
        m = re.search(r"projects/([^/]+)/global/images/([^/]+)$", link or "")
        image = self.images.get((m.group(1), m.group(2))) if m else None
        if image is None or image["status"] != "READY":
            raise ApiError(404 if image is None else 400, "notFound" if image is None else "resourceNotReady",
                           f"The resource '{link}' was not found" if image is None else f"The resource '{link}' "
                           "is not ready")
        return image

    def insert_instance(self, project: str, zone: str, body: dict[str, Any], request_id: str | None) -> dict:
        if (replay := self._replay(request_id)) is not None:
            return replay
        self.zone(project, zone)
        name = body.get("name", "")
        if not NAME.match(name):
            raise ApiError(400, "invalid", f"Invalid value for field 'resource.name': '{name}'. Must be a match of "
                                           "regex '(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)'")
        machine = body.get("machineType", "")
        if f"zones/{zone}/machineTypes/" not in machine:
            raise ApiError(400, "invalid", f"Invalid value for field 'resource.machineType': '{machine}'.")
        labels = self._check_labels(body.get("labels"))
        items = self._check_metadata(body.get("metadata"))
        boot = [d for d in body.get("disks") or [] if d.get("boot")]
        if len(boot) != 1:
            raise ApiError(400, "invalid", "Invalid value for field 'resource.disks': exactly one boot disk is required.")
        source = (boot[0].get("initializeParams") or {}).get("sourceImage", "")
        image = self._source_image(source)
        if (project, zone, name) in self.instances:
            raise ApiError(409, "alreadyExists", f"The resource 'projects/{project}/zones/{zone}/instances/{name}' "
                                                 "already exists")
        link = f"{BASE}/projects/{project}/zones/{zone}/instances/{quote(name)}"
        from gce_fake import disks as zonal_disks  # disks.py builds on this module

        given = body.get("disks") or []
        for commit in (False, True):  # every existing disk checked before any is attached
            for d in given:
                if d.get("source"):
                    zonal_disks.attach(self, project, zone, link, d["source"], d.get("mode", "READ_WRITE"), commit)

        def attached(i: int, d: dict[str, Any]) -> dict[str, Any]:
            if d.get("source"):
                disk = zonal_disks.attach(self, project, zone, link, d["source"], "READ_ONLY", commit=False)
                return {"source": disk["selfLink"], "deviceName": d.get("deviceName") or disk["name"],
                        "diskSizeGb": disk["sizeGb"]}
            return {"source": f"{BASE}/projects/{project}/zones/{zone}/disks/{name}-{i}",
                    "deviceName": d.get("deviceName") or f"persistent-disk-{i}",
                    "diskSizeGb": str((d.get("initializeParams") or {}).get("diskSizeGb", "10"))}

        inst = {"kind": "compute#instance", "id": str(next(self._ids)), "creationTimestamp": now_rfc3339(),
                "name": name, "description": body.get("description", ""), "machineType": machine,
                "status": "PROVISIONING", "zone": f"{BASE}/projects/{project}/zones/{zone}",
                "networkInterfaces": [{**nic, "name": f"nic{i}", "networkIP": f"10.128.0.{len(self.instances) % 250 + 2}"}
                                      for i, nic in enumerate(body.get("networkInterfaces") or [])],
                "disks": [{"kind": "compute#attachedDisk", "type": "PERSISTENT", "mode": d.get("mode", "READ_WRITE"),
                           "index": i, "boot": bool(d.get("boot")), "autoDelete": bool(d.get("autoDelete")),
                           **attached(i, d)}
                          for i, d in enumerate(given)],
                "metadata": {"kind": "compute#metadata", "fingerprint": uuid.uuid4().hex[:12], "items": items},
                "tags": {"items": list((body.get("tags") or {}).get("items") or []), "fingerprint": "42WmSpB8rSM="},
                "serviceAccounts": body.get("serviceAccounts") or [],
                "scheduling": body.get("scheduling") or {"automaticRestart": True},
                "labels": labels, "labelFingerprint": uuid.uuid4().hex[:12], "selfLink": link}
        self.instances[(project, zone, name)] = inst
        self._count("instances.insert")
        booted = IMAGE_ID.search(image.get("description", ""))

        def staging() -> None:
            if self.instances.get((project, zone, name)) is inst:
                inst["status"] = "STAGING"

        def running() -> None:
            if self.instances.get((project, zone, name)) is inst:
                inst["status"] = "RUNNING"
                lines = "SeaBIOS (version fake)\nBooting from Hard Disk 0...\n"
                if booted:
                    lines += f"mobykit: ready {booted.group(0)}\n"
                self.serial[(project, zone, name)] = lines

        return self._operation(project, zone, "insert", link, request_id, staging, running)

    def delete_instance(self, project: str, zone: str, name: str, request_id: str | None) -> dict[str, Any]:
        if (replay := self._replay(request_id)) is not None:
            return replay
        inst = self._instance(project, zone, name)
        inst["status"] = "STOPPING"
        self._count("instances.delete")

        def gone() -> None:
            if self.instances.get((project, zone, name)) is inst:
                del self.instances[(project, zone, name)]
                self.serial.pop((project, zone, name), None)
                from gce_fake import disks as zonal_disks

                zonal_disks.release(self, inst["selfLink"], inst["disks"])

        return self._operation(project, zone, "delete", inst["selfLink"], request_id, None, gone)

    def set_labels(self, project: str, zone: str, name: str, body: dict[str, Any], request_id: str | None) -> dict:
        if (replay := self._replay(request_id)) is not None:
            return replay
        inst = self._instance(project, zone, name)
        if body.get("labelFingerprint") != inst["labelFingerprint"]:
            raise ApiError(412, "conditionNotMet", "Labels fingerprint either invalid or resource labels have changed")
        inst["labels"] = self._check_labels(body.get("labels"))
        inst["labelFingerprint"] = uuid.uuid4().hex[:12]
        self._count("instances.setLabels")
        return self._operation(project, zone, "setLabels", inst["selfLink"], request_id)

    def set_metadata(self, project: str, zone: str, name: str, body: dict[str, Any], request_id: str | None) -> dict:
        if (replay := self._replay(request_id)) is not None:
            return replay
        inst = self._instance(project, zone, name)
        if body.get("fingerprint") != inst["metadata"]["fingerprint"]:
            raise ApiError(412, "conditionNotMet", "Supplied fingerprint does not match current metadata fingerprint.")
        inst["metadata"] = {"kind": "compute#metadata", "fingerprint": uuid.uuid4().hex[:12],
                            "items": self._check_metadata(body)}
        self._count("instances.setMetadata")
        return self._operation(project, zone, "setMetadata", inst["selfLink"], request_id)

    def serial_output(self, project: str, zone: str, name: str, start: int) -> dict[str, Any]:
        inst = self._instance(project, zone, name)
        text = self.serial.get((project, zone, name), "")
        start = max(0, min(start, len(text)))
        return {"kind": "compute#serialPortOutput", "contents": text[start:], "start": str(start),
                "next": str(len(text)), "selfLink": inst["selfLink"] + "/serialPort"}

    # -- images -----------------------------------------------------------------------------------

    def get_image(self, project: str, name: str) -> dict[str, Any]:
        image = self.images.get((project, name))
        if image is None:
            raise ApiError(404, "notFound", f"The resource 'projects/{project}/global/images/{name}' was not found")
        return dict(image)

    def list_images(self, project: str) -> list[dict[str, Any]]:
        return [dict(v) for (p, _), v in sorted(self.images.items()) if p == project]

    def insert_image(self, project: str, body: dict[str, Any], request_id: str | None) -> dict[str, Any]:
        if (replay := self._replay(request_id)) is not None:
            return replay
        name = body.get("name", "")
        if not NAME.match(name):
            raise ApiError(400, "invalid", f"Invalid value for field 'resource.name': '{name}'.")
        labels = self._check_labels(body.get("labels"))
        source = (body.get("rawDisk") or {}).get("source", "")
        m = re.match(r"^https://storage\.googleapis\.com/([^/]+)/(.+)$", source)
        if not m:
            raise ApiError(400, "invalid", f"Invalid value for field 'resource.rawDisk.source': '{source}'.")
        if (project, name) in self.images:
            raise ApiError(409, "alreadyExists", f"The resource 'projects/{project}/global/images/{name}' already exists")
        link = f"{BASE}/projects/{project}/global/images/{name}"
        image = {"kind": "compute#image", "id": str(next(self._ids)), "creationTimestamp": now_rfc3339(),
                 "name": name, "description": body.get("description", ""), "family": body.get("family", ""),
                 "sourceType": "RAW", "rawDisk": {"source": source, "containerType": "TAR"}, "status": "PENDING",
                 "labels": labels, "labelFingerprint": uuid.uuid4().hex[:12], "diskSizeGb": "1",
                 "selfLink": link}
        self.images[(project, name)] = image
        self._count("images.insert")

        def ready() -> None:
            if self.storage_exists is not None and not self.storage_exists(m.group(1), m.group(2)):
                image["status"] = "FAILED"
                raise ApiError(400, "invalid", f"The resource '{source}' is not accessible or does not exist")
            image["status"] = "READY"

        return self._operation(project, None, "insert", link, request_id, None, ready)

    def delete_image(self, project: str, name: str, request_id: str | None) -> dict[str, Any]:
        if (replay := self._replay(request_id)) is not None:
            return replay
        image = self.get_image(project, name)
        self._count("images.delete")

        def gone() -> None:
            self.images.pop((project, name), None)

        return self._operation(project, None, "delete", image["selfLink"], request_id, None, gone)
