"""The provider-neutral part of persistent volumes (instance property ``Volumes``) for every
provider: checking the property, and who owns a volume.

A volume belongs to a logical id of a group (``<group>-<lid>-<name>``): a replacement holding the
same logical id takes it over, so a clustered member comes back as the same member with its data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mobykit.errors import InvalidArgument

GROUP_TAG = "infrakit.group"
MAX_VOLUMES = 16
# 20: what every provider's device naming takes (a virtio disk serial's limit is the tightest)
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,19}$")
_OWNER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$")  # group names, logical ids (IPs too)


@dataclass(frozen=True)
class Volume:
    """One entry of ``Volumes``: ``name`` as the guest sees it, ``size_gb`` when first made."""

    name: str
    size_gb: int


def parse(volumes: Any, where: str = "Properties.Volumes") -> list[Volume]:
    """``Volumes`` checked; InvalidArgument names the entry and key."""
    if volumes is None:
        return []
    if not isinstance(volumes, list):
        raise InvalidArgument(f'{where}: must be a list like [{{"Name": "data", "SizeGb": 1}}]')
    if len(volumes) > MAX_VOLUMES:
        raise InvalidArgument(f"{where}: at most {MAX_VOLUMES} volumes per instance, got {len(volumes)}")
    out: list[Volume] = []
    for i, v in enumerate(volumes):
        at = f"{where}[{i}]"
        if not isinstance(v, dict):
            raise InvalidArgument(f'{at}: must be an object like {{"Name": "data", "SizeGb": 1}}')
        unknown = sorted(set(v) - {"Name", "SizeGb"})
        if unknown:
            raise InvalidArgument(f"{at}.{unknown[0]}: unknown key (known: Name, SizeGb)")
        name, size = v.get("Name"), v.get("SizeGb")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidArgument(f"{at}.Name: {name!r} must be 1-20 lower-case letters, digits, '_' or '-' "
                                  "(the guest sees it as the disk's serial or device name)")
        if any(o.name == name for o in out):
            raise InvalidArgument(f"{at}.Name: {name!r} given twice")
        if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 16384:
            raise InvalidArgument(f"{at}.SizeGb: must be a whole number of GiB from 1 to 16384, got {size!r}")
        out.append(Volume(name, size))
    return out


def owner(tags: dict[str, str], logical_id: str | None) -> tuple[str, str]:
    """(group, logical id) that owns this instance's volumes; InvalidArgument when it has none
    (the group spec refuses Volumes without LogicalIDs at commit; this is a direct Provision)."""
    group = tags.get(GROUP_TAG)
    if not logical_id or not group:
        raise InvalidArgument("Properties.Volumes: volumes belong to a logical id (<group>-<logical id>-<name>, "
                              "kept across replacements); this instance has no logical id and group - give the "
                              "group Allocation.LogicalIDs")
    check_owner(group, logical_id)
    return group, logical_id


def check_owner(group: str, logical_id: str) -> None:
    """A group name and logical id that can name a volume on every provider."""
    for what, value in (("group name", group), ("logical id", logical_id)):
        if not _OWNER.match(value):
            raise InvalidArgument(f"Properties.Volumes: {what} {value!r} cannot name a volume "
                                  "(letters, digits, '.', '_', '-', ':', at most 63)")


def volume_name(group: str, logical_id: str, name: str) -> str:
    """``<group>-<lid>-<name>``, what ``mobykit volume ls`` shows and ``rm`` takes (``:`` of an
    IPv6 id as ``_``: a libvirt dir pool's volumes are file names)."""
    return f"{group}-{logical_id.replace(':', '_')}-{name}"
