"""Persistent disks of logical ids (``Volumes``) and Infrakit ``Attachments`` on GCE.

Why it works this way:
- A volume ``<group>-<lid>-<name>`` is the zonal disk of that name, escaped to GCE's name rules
  (``disk_name``), labelled ``mobykit-volume`` with NamespaceTags and the owner (labels are how
  ``volume ls`` finds them) and with the exact name in its description.
- GCE attaches existing disks at ``instances.insert`` (``disks[].source``), so a launch is one
  insert: disks are made first when missing (``disks.insert``, waited for), then the instance
  is inserted with them, ``autoDelete: false`` (a deleted instance never takes its volume along)
  and ``deviceName`` = the volume's name, so the guest sees ``/dev/disk/by-id/google-<name>``.
- A disk whose ``users`` include a live instance is refused to another (GCE would fail the insert
  with resourceInUseByAnotherResource, after the fact); one held by an instance being deleted is
  waited for (bounded), which is what a replacement of a quorum member meets.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from mobykit.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from mobykit.providers.gcp.api import AlreadyExists, Compute
from mobykit.providers.gcp.labels import from_labels, to_labels
from mobykit.providers.persistent import GROUP_TAG, Volume, owner, volume_name

VOLUME_TAG = "mobykit.volume"
LOGICAL_ID_TAG = "mobykit.logical_id"
DISK_TYPE = "pd-balanced"
GOING = ("STOPPING",)  # an instance being deleted: its disks are released when it is gone
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass
class Planned:
    """One insert's extra disks: (device name, disk self link), in order."""

    disks: list[tuple[str, str]]

    def body(self) -> list[dict[str, Any]]:
        return [{"boot": False, "auto_delete": False, "source": link, "device_name": device, "mode": "READ_WRITE"}
                for device, link in self.disks]


def disk_name(name: str) -> str:
    """``name`` as a GCE resource name: as it is when valid, else lower-cased with other characters
    as ``-`` and a hash of the exact name appended (two names never meet in one disk)."""
    if _NAME.match(name):
        return name
    plain = re.sub(r"[^a-z0-9-]", "-", name.lower())
    if not plain[:1].isalpha():
        plain = "v-" + plain
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{plain[:63 - 9].rstrip('-')}-{digest}"


def _get(compute: Compute, project: str, zone: str, name: str) -> Any | None:
    try:
        return compute.call(compute.disks.get, f"disks.get {name}", project=project, zone=zone, disk=name)
    except NotFound:
        return None


def plan(compute: Compute, project: str, zone: str, volumes: list[Volume], attachments: list[tuple[str, str]],
         tags: dict[str, str], logical_id: str | None, namespace: dict[str, str], timeout: float) -> Planned:
    """Check, make and wait for every disk this insert attaches; nothing is made on bad input."""
    for i, (did, kind) in enumerate(attachments):
        if kind.lower() not in ("", "disk", "persistent-disk", "pd"):
            raise InvalidArgument(f"Spec.Attachments[{i}].Type: {kind!r} is not a disk attachment "
                                  "(known: disk, persistent-disk, pd, or empty)")
        short = did.rstrip("/").rsplit("/", 1)[-1]
        if not _NAME.match(short):
            raise InvalidArgument(f"Spec.Attachments[{i}].ID: {did!r} is not a GCE disk name")
    if not volumes and not attachments:
        return Planned([])
    wanted: list[tuple[str, str, Volume | None, str]] = []  # (device, disk name, volume to make, its name)
    labels: dict[str, str] = {}
    if volumes:
        group, lid = owner(tags, logical_id)
        for v in volumes:
            full = volume_name(group, lid, v.name)
            wanted.append((v.name, disk_name(full), v, full))
        labels = {**namespace, GROUP_TAG: group, LOGICAL_ID_TAG: lid}
    found: dict[str, Any] = {}
    for i, (did, _kind) in enumerate(attachments):
        short = did.rstrip("/").rsplit("/", 1)[-1]
        disk = _get(compute, project, zone, short)
        if disk is None:
            raise InvalidArgument(f"Spec.Attachments[{i}].ID: no disk {short!r} in {project}/{zone}")
        found[short] = disk
        wanted.append((short, short, None, short))
    if len({device for device, _, _, _ in wanted}) != len(wanted):
        raise InvalidArgument("Spec.Attachments: a disk is attached twice (as a volume and an attachment)")
    for _device, name, _v, _full in wanted:
        disk = found.get(name) or _get(compute, project, zone, name)
        if disk is not None:
            found[name] = disk
            _wait_released(compute, project, zone, name, list(disk.users), timeout)
    for _device, name, v, full in wanted:
        if name not in found and v is not None:
            _make(compute, project, zone, name, v, {**labels, VOLUME_TAG: full})
    return Planned([(device, f"projects/{project}/zones/{zone}/disks/{name}") for device, name, _, _ in wanted])


def _make(compute: Compute, project: str, zone: str, name: str, v: Volume, tags: dict[str, str]) -> None:
    body = {"name": name, "size_gb": v.size_gb, "type": f"projects/{project}/zones/{zone}/diskTypes/{DISK_TYPE}",
            "labels": to_labels(tags), "description": tags[VOLUME_TAG]}
    try:
        op = compute.call(compute.disks.insert_unary, f"disks.insert {name}", project=project, zone=zone,
                          disk_resource=body, request_id=str(uuid.uuid4()))
        compute.wait(op, project, zone, f"disks.insert {name}")
    except AlreadyExists:
        pass  # made meanwhile by another create of this logical id: the next check refuses a second user


def _wait_released(compute: Compute, project: str, zone: str, name: str, users: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.05
    while users:
        for user in users:
            iname = user.rstrip("/").rsplit("/", 1)[-1]
            try:
                inst = compute.call(compute.instances.get, f"instances.get {iname}", project=project, zone=zone,
                                    instance=iname)
                status = inst.status
            except NotFound:
                status = "GONE"
            if status not in GOING and status != "GONE":
                raise FailedPrecondition(f"disk {name} is still attached to instance {iname} ({status}); "
                                         "destroy it first")
        if time.monotonic() > deadline:
            raise Unavailable(f"disk {name} not released by {', '.join(users)} within {timeout:g} s")
        time.sleep(delay)
        delay = min(delay * 2, 2.0)
        disk = _get(compute, project, zone, name)
        users = list(disk.users) if disk is not None else []


def listing(compute: Compute, project: str, zone: str, namespace: dict[str, str]) -> list[dict[str, Any]]:
    out = []
    for disk in compute.call(compute.disks.list, f"disks.list {zone}", project=project, zone=zone, max_results=500):
        tags = from_labels(dict(disk.labels), {})
        if VOLUME_TAG not in tags or not namespace.items() <= tags.items():
            continue
        out.append({"Name": disk.description or tags[VOLUME_TAG], "SizeGb": int(disk.size_gb),
                    "Instance": ",".join(u.rsplit("/", 1)[-1] for u in disk.users), "Id": disk.name, "Zone": zone,
                    "Owner": "/".join(t for t in (tags.get(GROUP_TAG), tags.get(LOGICAL_ID_TAG)) if t)})
    return out


def remove(compute: Compute, project: str, zone: str, name: str, namespace: dict[str, str]) -> bool:
    """Delete the volume ``name`` (its exact or disk name) in ``zone``; False when it has none."""
    for v in listing(compute, project, zone, namespace):
        if name not in (v["Name"], v["Id"]):
            continue
        if v["Instance"]:
            raise FailedPrecondition(f"volume {name!r} is attached to instance {v['Instance']}; destroy it first")
        op = compute.call(compute.disks.delete_unary, f"disks.delete {v['Id']}", project=project, zone=zone,
                          disk=v["Id"], request_id=str(uuid.uuid4()))
        compute.wait(op, project, zone, f"disks.delete {v['Id']}")
        return True
    return False
