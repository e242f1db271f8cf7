"""Zonal persistent disks of the fake Compute Engine: ``disks.insert/get/list/delete``, and the
attachment of an existing disk (``disks[].source``) by ``instances.insert``.

Faithful, from the v1 REST reference, where mobykit's volumes depend on it:
- a disk is CREATING until its insert operation is DONE, then READY; ``users`` lists the
  instances (URLs) it is attached to, set at the instance's insert and cleared when the instance
  is deleted (a disk attached with ``autoDelete: true`` is deleted with it);
- 404 for an unknown disk, 409 for a name in use, 400 for a name or label breaking GCE's rules;
- a READ_WRITE disk already attached to another instance cannot be attached
  (``resourceInUseByAnotherResource``), nor can a disk in use be deleted; a disk attaches only in
  its own zone.
"""

from __future__ import annotations

import uuid
from typing import Any

from gce_fake.state import BASE, NAME, ApiError, World, now_rfc3339


def _disk(w: World, project: str, zone: str, name: str) -> dict[str, Any]:
    w.zone(project, zone)
    disk = w.disks.get((project, zone, name))
    if disk is None:
        raise ApiError(404, "notFound", f"The resource 'projects/{project}/zones/{zone}/disks/{name}' was not found")
    return disk


def get(w: World, project: str, zone: str, name: str) -> dict[str, Any]:
    return dict(_disk(w, project, zone, name))


def list_disks(w: World, project: str, zone: str) -> list[dict[str, Any]]:
    w.zone(project, zone)
    return [dict(v) for (p, z, _), v in sorted(w.disks.items()) if p == project and z == zone]


def insert(w: World, project: str, zone: str, body: dict[str, Any], request_id: str | None) -> dict[str, Any]:
    if (replay := w._replay(request_id)) is not None:
        return replay
    w.zone(project, zone)
    name = body.get("name", "")
    if not NAME.match(name):
        raise ApiError(400, "invalid", f"Invalid value for field 'resource.name': '{name}'. Must be a match of "
                                       "regex '(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)'")
    labels = w._check_labels(body.get("labels"))
    try:
        size = int(body.get("sizeGb", "10"))
    except ValueError:
        raise ApiError(400, "invalid", f"Invalid value for field 'resource.sizeGb': '{body.get('sizeGb')}'.") from None
    if not 1 <= size <= 65536:
        raise ApiError(400, "invalid", f"Invalid value for field 'resource.sizeGb': '{size}'.")
    kind = body.get("type") or f"projects/{project}/zones/{zone}/diskTypes/pd-standard"
    if f"zones/{zone}/diskTypes/" not in kind:
        raise ApiError(400, "invalid", f"Invalid value for field 'resource.type': '{kind}'.")
    if (project, zone, name) in w.disks:
        raise ApiError(409, "alreadyExists", f"The resource 'projects/{project}/zones/{zone}/disks/{name}' "
                                             "already exists")
    link = f"{BASE}/projects/{project}/zones/{zone}/disks/{name}"
    disk = {"kind": "compute#disk", "id": str(next(w._ids)), "creationTimestamp": now_rfc3339(), "name": name,
            "description": body.get("description", ""), "sizeGb": str(size), "zone": f"{BASE}/projects/{project}/zones/{zone}",
            "status": "CREATING", "type": kind if kind.startswith("http") else f"{BASE}/{kind}", "labels": labels,
            "labelFingerprint": uuid.uuid4().hex[:12], "selfLink": link}
    w.disks[(project, zone, name)] = disk
    w._count("disks.insert")

    def ready() -> None:
        if w.disks.get((project, zone, name)) is disk:
            disk["status"] = "READY"

    return w._operation(project, zone, "insert", link, request_id, None, ready)


def delete(w: World, project: str, zone: str, name: str, request_id: str | None) -> dict[str, Any]:
    if (replay := w._replay(request_id)) is not None:
        return replay
    disk = _disk(w, project, zone, name)
    if disk.get("users"):
        raise ApiError(400, "resourceInUseByAnotherResource",
                       f"The disk resource '{disk['selfLink']}' is already being used by '{disk['users'][0]}'")
    disk["status"] = "DELETING"
    w._count("disks.delete")

    def gone() -> None:
        if w.disks.get((project, zone, name)) is disk:
            del w.disks[(project, zone, name)]

    return w._operation(project, zone, "delete", disk["selfLink"], request_id, None, gone)


def attach(w: World, project: str, zone: str, instance_link: str, source: str, mode: str,
           commit: bool = True) -> dict[str, Any]:
    """The existing disk ``source`` (URL or partial URL) for an instance being inserted in ``zone``:
    it must exist there, be READY and, for READ_WRITE, be attached to no other instance. ``commit``
    False only checks (every disk of an insert is checked before any is attached)."""
    parts = source.rstrip("/").split("/")
    try:
        i = parts.index("disks")
        dproject, dzone, name = parts[i - 3], parts[i - 1], parts[i + 1]
    except (ValueError, IndexError):
        raise ApiError(400, "invalid", f"Invalid value for field 'resource.disks[].source': '{source}'.") from None
    disk = w.disks.get((dproject, dzone, name))
    if disk is None:
        raise ApiError(404, "notFound", f"The resource 'projects/{dproject}/zones/{dzone}/disks/{name}' was not found")
    if dzone != zone:
        raise ApiError(400, "invalid", f"Invalid value for field 'resource.disks[].source': '{source}'. "
                                       f"Disk must be in the same zone as the instance ({zone}).")
    if disk["status"] != "READY":
        raise ApiError(400, "resourceNotReady", f"The resource '{disk['selfLink']}' is not ready")
    if mode != "READ_ONLY" and disk.get("users"):
        raise ApiError(400, "resourceInUseByAnotherResource",
                       f"The disk resource '{disk['selfLink']}' is already being used by '{disk['users'][0]}'")
    if not commit:
        return disk
    disk.setdefault("users", []).append(instance_link)
    disk["lastAttachTimestamp"] = now_rfc3339()
    return disk


def release(w: World, instance_link: str, attached: list[dict[str, Any]]) -> None:
    """An instance is gone: its disks lose it as a user; the ones with autoDelete go too."""
    for d in attached:
        key = next((k for k, v in w.disks.items() if v["selfLink"] == d.get("source")), None)
        if key is None:
            continue
        disk = w.disks[key]
        disk["users"] = [u for u in disk.get("users", []) if u != instance_link]
        if not disk["users"]:
            disk.pop("users")
            disk["lastDetachTimestamp"] = now_rfc3339()
            if d.get("autoDelete"):
                del w.disks[key]
