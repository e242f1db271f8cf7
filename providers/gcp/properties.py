"""What a ``mobykit/gcp`` request and the ``providers.gcp`` config section may say, checked before
any API call so a bad group spec fails at Validate naming the key and creates nothing.

Instance properties are Infrakit's GCE plugin shape, so an Infrakit user's existing properties work
as they are; ``Image`` is a mobykit image id (``sha256:<64 hex>``, published by the core before
create) or, as in Infrakit, any GCE source image (``projects/P/global/images/family/F``, a URL).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from mobykit.errors import InvalidArgument
from mobykit.providers import persistent

ENV_ENDPOINT = "MOBYKIT_GCP_ENDPOINT"
CONFIG_KEYS = ("Project", "Zone", "Zones", "Bucket", "Endpoint")
DEFAULT_PREFIX = "mobykit"
DEFAULT_MACHINE_TYPE = "e2-small"
DEFAULT_NETWORK = "default"
DEFAULT_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
DISK_KEYS = ("Boot", "Type", "SizeGb", "AutoDelete")
IMAGE_ID = re.compile(r"^sha256:[0-9a-f]{64}$")
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")

# property -> (type(s), default); the README's table is this dict.
PROPERTY_TYPES: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "Project": (str, None),
    "Zone": (str, None),
    "NamePrefix": (str, DEFAULT_PREFIX),
    "MachineType": (str, DEFAULT_MACHINE_TYPE),
    "Network": (str, DEFAULT_NETWORK),
    "Subnetwork": (str, None),
    "PrivateIP": (str, None),
    "Tags": (list, []),
    "Scopes": (list, list(DEFAULT_SCOPES)),
    "Preemptible": (bool, False),
    "Description": (str, ""),
    "Disks": (list, []),
    "Image": (str, None),
    # The flat keys of Infrakit's older GCE plugin (infrakit.gcp), read into the boot disk and Image.
    "DiskSizeMb": (int, None),
    "DiskType": (str, None),
    "DiskImage": (str, None),
    "AutoDeleteDisk": (bool, None),
    "Connect": (bool, False),  # the interactive serial console (metadata serial-port-enable)
    "Volumes": (list, []),  # a logical id's persistent disks (volumes.py)
}
LEGACY_DISK_KEYS = ("DiskSizeMb", "DiskType", "AutoDeleteDisk")


@dataclass(frozen=True)
class Disk:
    boot: bool = True
    type: str = "pd-standard"
    size_gb: int = 10
    auto_delete: bool = True


@dataclass
class InstanceProperties:
    """Checked instance properties with defaults filled in (project and zone still unresolved)."""

    project: str | None
    zone: str | None
    name_prefix: str
    machine_type: str
    network: str
    subnetwork: str | None
    private_ip: str | None
    tags: list[str]
    scopes: list[str]
    preemptible: bool
    description: str
    disks: list[Disk]
    image: str | None
    connect: bool = False
    volumes: list[persistent.Volume] = field(default_factory=list)


@dataclass
class GCPConfig:
    """The ``providers.gcp`` section (NamespaceTags already taken by the core)."""

    project: str | None = None
    zones: list[str] = field(default_factory=list)  # Zone first, then Zones
    bucket: str | None = None
    endpoint: str | None = None

    @classmethod
    def parse(cls, config: dict[str, Any]) -> GCPConfig:
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown:
            raise InvalidArgument(f"providers.gcp: unknown key(s) {', '.join(unknown)} "
                                  f"(known: {', '.join(CONFIG_KEYS)}, NamespaceTags)")
        for key in ("Project", "Zone", "Bucket", "Endpoint"):
            if config.get(key) is not None and not isinstance(config[key], str):
                raise InvalidArgument(f"providers.gcp.{key}: must be a string, got {type(config[key]).__name__}")
        zones = config.get("Zones") or []
        if not isinstance(zones, list) or not all(isinstance(z, str) and z for z in zones):
            raise InvalidArgument("providers.gcp.Zones: must be a list of zone names")
        ordered = ([config["Zone"]] if config.get("Zone") else []) + [z for z in zones if z != config.get("Zone")]
        endpoint = config.get("Endpoint") or os.environ.get(ENV_ENDPOINT) or None
        return cls(project=config.get("Project") or None, zones=ordered, bucket=config.get("Bucket") or None,
                   endpoint=endpoint)


def _type_name(t: type | tuple[type, ...]) -> str:
    names = {str: "a string", list: "a list", bool: "true or false", int: "an integer", dict: "an object"}
    return names.get(t, str(t)) if isinstance(t, type) else " or ".join(names.get(x, str(x)) for x in t)


def _disks(value: list[Any]) -> list[Disk]:
    disks = []
    for i, d in enumerate(value):
        where = f"Properties.Disks[{i}]"
        if not isinstance(d, dict):
            raise InvalidArgument(f"{where}: must be an object with {', '.join(DISK_KEYS)}")
        unknown = sorted(set(d) - set(DISK_KEYS))
        if unknown:
            raise InvalidArgument(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(DISK_KEYS)})")
        for key, t in (("Boot", bool), ("AutoDelete", bool), ("Type", str)):
            if key in d and not isinstance(d[key], t):
                raise InvalidArgument(f"{where}.{key}: must be {_type_name(t)}, got {d[key]!r}")
        size = d.get("SizeGb", 10)
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise InvalidArgument(f"{where}.SizeGb: must be a positive integer, got {size!r}")
        disks.append(Disk(boot=d.get("Boot", i == 0), type=d.get("Type") or "pd-standard", size_gb=size,
                          auto_delete=d.get("AutoDelete", True)))
    if disks and sum(d.boot for d in disks) != 1:
        raise InvalidArgument("Properties.Disks: exactly one disk must have Boot: true")
    return disks


def parse(properties: Any) -> InstanceProperties:
    """Check ``properties``; InvalidArgument names the first bad key."""
    if not isinstance(properties, dict):
        raise InvalidArgument(f"Properties: must be an object, got {type(properties).__name__}")
    unknown = sorted(set(properties) - set(PROPERTY_TYPES))
    if unknown:
        raise InvalidArgument(f"Properties: unknown key(s) {', '.join(unknown)} for gcp "
                              f"(known: {', '.join(PROPERTY_TYPES)})")
    values: dict[str, Any] = {}
    for key, (t, default) in PROPERTY_TYPES.items():
        v = properties.get(key)
        if v is None:
            values[key] = default
            continue
        if not isinstance(v, t) or (t is not bool and isinstance(v, bool)):
            raise InvalidArgument(f"Properties.{key}: must be {_type_name(t)}, got {v!r}")
        values[key] = v
    for key in ("Tags", "Scopes"):
        if not all(isinstance(x, str) and x for x in values[key]):
            raise InvalidArgument(f"Properties.{key}: must be a list of strings")
    for i, tag in enumerate(values["Tags"]):
        if not _NAME.match(tag):
            raise InvalidArgument(f"Properties.Tags[{i}]: {tag!r} is not a GCE network tag (lower case, digits, -)")
    prefix = values["NamePrefix"]
    if not re.match(r"^[a-z][-a-z0-9]{0,48}$", prefix):
        raise InvalidArgument(f"Properties.NamePrefix: {prefix!r} must be lower case letters, digits and -, "
                              "starting with a letter, at most 49 characters")
    image = values["Image"] or values["DiskImage"]
    if image is not None and image.startswith("sha256:") and not IMAGE_ID.match(image):
        raise InvalidArgument(f"Properties.Image: {image!r} is not a built image id (sha256:<64 hex>)")
    disks = _disks(values["Disks"])
    legacy = [k for k in LEGACY_DISK_KEYS if values[k] is not None]
    if legacy and disks:
        raise InvalidArgument(f"Properties: give either Disks or {', '.join(legacy)}, not both")
    if legacy:
        mb = values["DiskSizeMb"]
        if mb is not None and mb < 1:
            raise InvalidArgument(f"Properties.DiskSizeMb: must be a positive integer, got {mb!r}")
        disks = [Disk(boot=True, type=values["DiskType"] or "pd-standard",
                      size_gb=-(-mb // 1024) if mb else 10,
                      auto_delete=True if values["AutoDeleteDisk"] is None else values["AutoDeleteDisk"])]
    return InstanceProperties(
        project=values["Project"], zone=values["Zone"], name_prefix=prefix, machine_type=values["MachineType"],
        network=values["Network"], subnetwork=values["Subnetwork"], private_ip=values["PrivateIP"],
        tags=list(values["Tags"]), scopes=list(values["Scopes"]), preemptible=values["Preemptible"],
        description=values["Description"], disks=disks, image=image, connect=values["Connect"],
        volumes=persistent.parse(properties.get("Volumes")))


def instance_name(prefix: str, logical_id: str | None, suffix: str) -> str:
    """The instance's name: its logical id when that is a valid GCE name, else ``prefix-suffix``."""
    if logical_id and _NAME.match(logical_id):
        return logical_id
    return f"{prefix}-{suffix}"
