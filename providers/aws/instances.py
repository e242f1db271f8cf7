"""EC2 instances as ``Machine``s: launch, list, tag, terminate, read the console.

Why the calls look the way they do:
- RunInstances carries TagSpecifications (instance and its volumes), so an instance is never
  visible untagged: a listing by group tag sees it from its first moment, and a server that dies
  right after the call leaves nothing a group would not find and manage.
- ``ClientToken`` is new for each ``create`` and fixed across botocore's retries of that call
  (the token is part of the request botocore resends), so a retry of a RunInstances whose answer
  was lost returns the first instance instead of starting a second.
- Listings filter on the server (``tag:K=V`` for every tag, states pending and running, as
  Infrakit's AWS plugin lists) and are paginated, so an account with thousands of instances costs
  one or two pages per group, not a full scan. A stopped instance is not a member: its group
  replaces it, and the provider terminates it (``provider.AWSProvider.reap``), as an EC2 Auto
  Scaling group does with an instance that is not running.
- Tags are the only state: the logical id is the tag ``mobykit.logical_id``. Tags under ``aws:``
  belong to AWS and are never removed or written.
"""

from __future__ import annotations

import uuid
from typing import Any

from mobykit.errors import NotFound
from mobykit.providers.aws.clients import api
from mobykit.providers.aws.properties import LOGICAL_ID_TAG
from mobykit.providers.base import Machine

# Listed: the states of a machine that is, or is about to be, up (Infrakit's AWS plugin lists the
# same). Stopping/stopped ones are found separately, to be terminated (OFF_STATES);
# shutting-down/terminated are gone for the SPI.
LISTED_STATES = ("pending", "running")
OFF_STATES = ("stopping", "stopped")
EXISTING_STATES = LISTED_STATES + OFF_STATES  # what Destroy can still act on
STATE = {"pending": "pending", "running": "running", "stopping": "stopping", "stopped": "stopped",
         "shutting-down": "terminated", "terminated": "terminated"}
PAGE = 500


def tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in sorted(tags.items())]


def tag_dict(tags: list[dict[str, str]] | None) -> dict[str, str]:
    return {t["Key"]: t.get("Value", "") for t in tags or []}


def machine(inst: dict[str, Any]) -> Machine:
    """A DescribeInstances/RunInstances instance as a Machine (tags without ``aws:`` ones)."""
    tags = tag_dict(inst.get("Tags"))
    launched = inst.get("LaunchTime")
    props: dict[str, Any] = {
        "ImageId": inst.get("ImageId"),
        "InstanceType": inst.get("InstanceType"),
        "PrivateIpAddress": inst.get("PrivateIpAddress"),
        "PublicIpAddress": inst.get("PublicIpAddress"),
        "Placement": (inst.get("Placement") or {}).get("AvailabilityZone"),
    }
    if launched is not None:
        # What the moby flavor measures its health Deadline from.
        props["CreatedNs"] = int(launched.timestamp() * 1e9)
        props["Created"] = launched.isoformat()
    props = {k: v for k, v in props.items() if v is not None}
    own = {k: v for k, v in tags.items() if not k.startswith("aws:")}
    return Machine(id=inst["InstanceId"], tags=own, state=STATE.get(inst.get("State", {}).get("Name", ""), "pending"),
                   logical_id=tags.get(LOGICAL_ID_TAG), properties=props)


def run(ec2: Any, request: dict[str, Any]) -> Machine:
    """RunInstances for one instance; ``request`` is complete but for MinCount/MaxCount/ClientToken."""
    body = {**request, "MinCount": 1, "MaxCount": 1, "ClientToken": str(uuid.uuid4())}
    with api("RunInstances"):
        r = ec2.run_instances(**body)
    return machine(r["Instances"][0])


def describe(ec2: Any, tags: dict[str, str], ids: list[str] | None = None,
             states: tuple[str, ...] = LISTED_STATES) -> list[Machine]:
    """Instances in ``states`` with every one of ``tags`` (both filtered by EC2), sorted by id."""
    filters = [{"Name": "instance-state-name", "Values": list(states)}]
    filters += [{"Name": f"tag:{k}", "Values": [v]} for k, v in sorted(tags.items())]
    kwargs: dict[str, Any] = {"Filters": filters}
    if ids:
        kwargs["InstanceIds"] = ids
    else:
        kwargs["PaginationConfig"] = {"PageSize": PAGE}
    out = []
    try:
        with api("DescribeInstances"):
            for page in ec2.get_paginator("describe_instances").paginate(**kwargs):
                for reservation in page.get("Reservations", []):
                    out.extend(machine(i) for i in reservation.get("Instances", []))
    except NotFound:
        if ids:
            return []
        raise
    return sorted(out, key=lambda m: m.id)


def get(ec2: Any, instance_id: str) -> Machine:
    found = describe(ec2, {}, [instance_id])
    if not found:
        raise NotFound(f"aws: no live instance {instance_id!r}")
    return found[0]


def set_tags(ec2: Any, instance_id: str, tags: dict[str, str]) -> None:
    """Make the instance's own tags exactly ``tags`` (``aws:`` keys are left alone)."""
    current = get(ec2, instance_id).tags
    wanted = {k: v for k, v in tags.items() if not k.startswith("aws:")}
    changed = {k: v for k, v in wanted.items() if current.get(k) != v}
    removed = [k for k in current if k not in wanted and not k.startswith("aws:")]
    if changed:
        with api(f"CreateTags {instance_id}"):
            ec2.create_tags(Resources=[instance_id], Tags=tag_list(changed))
    if removed:
        with api(f"DeleteTags {instance_id}"):
            ec2.delete_tags(Resources=[instance_id], Tags=[{"Key": k} for k in sorted(removed)])


def terminate(ec2: Any, instance_id: str) -> None:
    """TerminateInstances; an instance that is gone (or never was) counts as terminated."""
    try:
        with api(f"TerminateInstances {instance_id}"):
            ec2.terminate_instances(InstanceIds=[instance_id])
    except NotFound:
        return


def console(ec2: Any, instance_id: str) -> str:
    """The serial console so far (botocore decodes the base64 Output); "" while EC2 has none."""
    try:
        with api(f"GetConsoleOutput {instance_id}"):
            r = ec2.get_console_output(InstanceId=instance_id)
    except NotFound:
        raise NotFound(f"aws: no instance {instance_id!r}") from None
    return r.get("Output") or ""


__all__ = ["LISTED_STATES", "OFF_STATES", "console", "describe", "get", "machine", "run", "set_tags", "tag_dict",
           "tag_list", "terminate"]
