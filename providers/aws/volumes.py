"""EBS volumes of logical ids (``Volumes``) and Infrakit ``Attachments`` on AWS.

Why it works this way:
- A volume is found by its tag ``mobykit.volume`` = ``<group>-<lid>-<name>`` (with the core's
  NamespaceTags), not by a stored id: tags are the provider's only state, as for instances.
- An EBS volume lives in one availability zone and attaches only to an instance there, so a
  logical id whose volumes exist launches its instance in their zone; volumes made on first use
  are made in the zone EC2 picked for the instance (gp3, tagged at creation).
- Attaching needs a running instance, so ``create`` launches, waits for ``running`` and attaches
  each volume (``/dev/sdf``, ``/dev/sdg``, ... in order), waiting until EC2 reports it attached.
  ``DeleteOnTermination`` stays false: terminating an instance never deletes a volume.
- A volume attached to a live instance is refused to another (EC2 would refuse too, later and
  less clearly); one whose instance is shutting down is waited for until EC2 has released it,
  which is what a replacement of a quorum group's member meets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from mobykit.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from mobykit.providers.aws.clients import api
from mobykit.providers.aws.instances import tag_dict, tag_list
from mobykit.providers.aws.properties import LOGICAL_ID_TAG
from mobykit.providers.persistent import GROUP_TAG, Volume, owner, volume_name

VOLUME_TAG = "mobykit.volume"
VOLUME_TYPE = "gp3"
DEVICES = tuple(f"/dev/sd{c}" for c in "fghijklmnopqrstuvwxyz")  # EC2's suggested names for EBS data
ATTACHMENT_TYPES = ("", "ebs", "volume")
GONE_STATES = ("shutting-down", "terminated")  # an instance whose volumes are being released


@dataclass
class Planned:
    """What one launch attaches: ``found`` existing volume ids by device, ``make`` the volumes to
    create by device, and ``zone`` the zone they pin the instance to (None: EC2 picks)."""

    found: dict[str, str] = field(default_factory=dict)
    make: dict[str, tuple[str, Volume]] = field(default_factory=dict)  # device -> (tag value, volume)
    zone: str | None = None
    tags: dict[str, str] = field(default_factory=dict)  # what a made volume is tagged with besides its name

    def __bool__(self) -> bool:
        return bool(self.found or self.make)


def filters(namespace: dict[str, str], name: str | None = None) -> list[dict[str, Any]]:
    out = [{"Name": "tag:" + VOLUME_TAG, "Values": [name]} if name else {"Name": "tag-key", "Values": [VOLUME_TAG]}]
    return out + [{"Name": f"tag:{k}", "Values": [v]} for k, v in sorted(namespace.items())]


def describe(ec2: Any, **kwargs: Any) -> list[dict[str, Any]]:
    out = []
    with api("DescribeVolumes"):
        for page in ec2.get_paginator("describe_volumes").paginate(**kwargs):
            out.extend(page.get("Volumes", []))
    return out


def plan(ec2: Any, volumes: list[Volume], attachments: list[tuple[str, str]], tags: dict[str, str],
         logical_id: str | None, namespace: dict[str, str], zone: str | None) -> Planned:
    """Every check before anything is launched or made: bad input and volumes held by a live
    instance are refused here, so a refused launch leaves nothing behind."""
    for i, (vid, kind) in enumerate(attachments):
        if kind.lower() not in ATTACHMENT_TYPES:
            raise InvalidArgument(f"Spec.Attachments[{i}].Type: {kind!r} is not an EBS volume attachment "
                                  f"(known: ebs, volume, or empty)")
        if not vid.startswith("vol-"):
            raise InvalidArgument(f"Spec.Attachments[{i}].ID: {vid!r} is not an EBS volume id (vol-...)")
    if len(volumes) + len(attachments) > len(DEVICES):
        raise InvalidArgument(f"Properties.Volumes: at most {len(DEVICES)} volumes and attachments per instance")
    out = Planned(zone=zone)
    if not volumes and not attachments:
        return out
    devices = iter(DEVICES)
    zones: dict[str, str] = {}  # a volume's zone -> what it is, for the error naming both
    if volumes:
        group, lid = owner(tags, logical_id)
        out.tags = {**namespace, GROUP_TAG: group, LOGICAL_ID_TAG: lid}
        for v in volumes:
            name = volume_name(group, lid, v.name)
            device = next(devices)
            found = describe(ec2, Filters=filters(namespace, name))
            live = [f for f in found if f.get("State") not in ("deleting", "deleted", "error")]
            if len(live) > 1:
                raise FailedPrecondition(f"Properties.Volumes: {len(live)} EBS volumes are tagged {VOLUME_TAG}={name} "
                                         f"({', '.join(f['VolumeId'] for f in live)}); remove all but one")
            if live:
                out.found[device] = live[0]["VolumeId"]
                zones[live[0]["AvailabilityZone"]] = f"volume {name} ({live[0]['VolumeId']})"
            else:
                out.make[device] = (name, v)
    for i, (vid, _kind) in enumerate(attachments):
        try:
            found = describe(ec2, VolumeIds=[vid])
        except (NotFound, InvalidArgument):  # InvalidVolume.NotFound, InvalidVolumeID.Malformed
            found = []
        if not found:
            raise InvalidArgument(f"Spec.Attachments[{i}].ID: no EBS volume {vid!r} in this region")
        out.found[next(devices)] = vid
        zones[found[0]["AvailabilityZone"]] = f"attachment {vid}"
    if zone and zones and set(zones) != {zone}:
        other = next(z for z in zones if z != zone)
        raise InvalidArgument(f"Properties.RunInstancesInput.Placement.AvailabilityZone: {zone} but {zones[other]} "
                              f"is in {other} (EBS volumes attach only in their own zone)")
    if len(zones) > 1:
        raise FailedPrecondition("Properties.Volumes: the volumes are in different zones: "
                                 + ", ".join(f"{what} in {z}" for z, what in sorted(zones.items())))
    if zones:
        out.zone = next(iter(zones))
    return out


def wait_released(ec2: Any, volume_ids: list[str], timeout: float, poll: float) -> None:
    """Until none of ``volume_ids`` is attached: FailedPrecondition at once for one attached to a
    live instance, Unavailable when a shutting-down instance has not released one in ``timeout``."""
    if not volume_ids:
        return
    deadline = time.monotonic() + timeout
    while True:
        held = {}
        for vol in describe(ec2, VolumeIds=volume_ids):
            for a in vol.get("Attachments", []):
                if a.get("State") != "detached":
                    held[vol["VolumeId"]] = a.get("InstanceId", "")
        if not held:
            return
        states = _instance_states(ec2, sorted(set(held.values())))
        for vid, iid in sorted(held.items()):
            if states.get(iid, "terminated") not in GONE_STATES:
                raise FailedPrecondition(f"EBS volume {vid} is still attached to instance {iid} "
                                         f"({states.get(iid)}); destroy it first")
        if time.monotonic() > deadline:
            raise Unavailable(f"EBS volume(s) {', '.join(sorted(held))} not released by terminated instance(s) "
                              f"{', '.join(sorted(set(held.values())))} within {timeout:g} s")
        time.sleep(poll)


def _instance_states(ec2: Any, ids: list[str]) -> dict[str, str]:
    out = {}
    try:
        with api("DescribeInstances"):
            r = ec2.describe_instances(InstanceIds=ids)
    except NotFound:
        return {}
    for res in r.get("Reservations", []):
        for inst in res.get("Instances", []):
            out[inst["InstanceId"]] = inst.get("State", {}).get("Name", "")
    return out


def make(ec2: Any, planned: Planned, zone: str) -> dict[str, str]:
    """Create the planned volumes in ``zone`` (gp3, tagged at creation); device -> volume id."""
    made = {}
    for device, (name, v) in planned.make.items():
        tags = {**planned.tags, VOLUME_TAG: name}
        with api(f"CreateVolume {name}"):
            r = ec2.create_volume(AvailabilityZone=zone, Size=v.size_gb, VolumeType=VOLUME_TYPE,
                                  TagSpecifications=[{"ResourceType": "volume", "Tags": tag_list(tags)}])
        made[device] = r["VolumeId"]
    return made


def attach(ec2: Any, instance_id: str, volumes: dict[str, str], poll: float, timeout: float) -> None:
    """Wait for the instance to run, attach each volume at its device, and wait until attached."""
    if not volumes:
        return
    config = {"Delay": max(poll, 0.01), "MaxAttempts": max(1, int(timeout / max(poll, 0.01)))}
    ids = sorted(volumes.values())
    with api(f"wait volumes available {', '.join(ids)}"):
        ec2.get_waiter("volume_available").wait(VolumeIds=ids, WaiterConfig=config)
    with api(f"wait instance running {instance_id}"):
        ec2.get_waiter("instance_running").wait(InstanceIds=[instance_id], WaiterConfig=config)
    for device, vid in sorted(volumes.items()):
        with api(f"AttachVolume {vid} {instance_id} {device}"):
            ec2.attach_volume(VolumeId=vid, InstanceId=instance_id, Device=device)
    with api(f"wait volumes in-use {', '.join(ids)}"):
        ec2.get_waiter("volume_in_use").wait(VolumeIds=ids, WaiterConfig=config)


def listing(ec2: Any, namespace: dict[str, str]) -> list[dict[str, Any]]:
    """The persistent volumes of this region (``mobykit volume ls``)."""
    out = []
    for vol in describe(ec2, Filters=filters(namespace)):
        tags = tag_dict(vol.get("Tags"))
        attached = [a.get("InstanceId", "") for a in vol.get("Attachments", []) if a.get("State") != "detached"]
        out.append({"Name": tags.get(VOLUME_TAG, ""), "SizeGb": vol.get("Size", 0), "Instance": ",".join(attached),
                    "Id": vol["VolumeId"], "Zone": vol.get("AvailabilityZone", ""),
                    "Owner": "/".join(t for t in (tags.get(GROUP_TAG), tags.get(LOGICAL_ID_TAG)) if t)})
    return out


def remove(ec2: Any, name: str, namespace: dict[str, str]) -> bool:
    """Delete the volumes tagged ``name``; False when there is none; FailedPrecondition when attached."""
    found = [v for v in describe(ec2, Filters=filters(namespace, name)) if v.get("State") not in ("deleting", "deleted")]
    for vol in found:
        for a in vol.get("Attachments", []):
            if a.get("State") != "detached":
                raise FailedPrecondition(f"volume {name!r} ({vol['VolumeId']}) is attached to instance "
                                         f"{a.get('InstanceId')}; destroy it first")
    for vol in found:
        with api(f"DeleteVolume {vol['VolumeId']}"):
            ec2.delete_volume(VolumeId=vol["VolumeId"])
    return bool(found)
