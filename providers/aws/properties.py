"""Instance properties and server config of the AWS provider, checked before any call is made.

The properties keep Infrakit's AWS plugin shape (``{RunInstancesInput, Tags}``) so its users'
specs carry over; ``RunInstancesInput`` is checked field by field against botocore's own EC2
service model, so a misspelt or ill-typed field names itself (``Properties.RunInstancesInput.
Placement.AvailabilityZon``) at Validate instead of failing a RunInstances call minutes later.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import functools
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from mobykit.errors import InvalidArgument
from mobykit.providers import persistent

PROPERTY_KEYS = ("RunInstancesInput", "Tags", "Region", "Image", "Volumes")
CONFIG_KEYS = ("Region", "Import", "Bucket")
IMPORT_MODES = ("ebs", "s3")
# RunInstances fields the provider owns: one instance per Provision, tagged at launch, one token
# per call. A spec that sets them would silently fight the group controller, so they are refused.
OWNED_FIELDS = ("MinCount", "MaxCount", "ClientToken", "DryRun")
IMAGE_TAG = "mobykit.image"
LOGICAL_ID_TAG = "mobykit.logical_id"
_IMAGE_ID = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class Settings:
    """The ``providers.aws`` section of the serve config (``NamespaceTags`` is the core's)."""

    region: str | None = None
    import_mode: str = "ebs"
    bucket: str | None = None

    @classmethod
    def parse(cls, config: dict[str, Any] | None) -> Settings:
        config = dict(config or {})
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown:
            raise InvalidArgument(
                f"providers.aws: unknown key(s) {', '.join(unknown)} (known: {', '.join(CONFIG_KEYS)}, NamespaceTags)"
            )
        for key in CONFIG_KEYS:
            value = config.get(key)
            if value is not None and not isinstance(value, str):
                raise InvalidArgument(f"providers.aws.{key}: must be a string, got {type(value).__name__}")
        mode = config.get("Import") or "ebs"
        if mode not in IMPORT_MODES:
            raise InvalidArgument(f"providers.aws.Import: {mode!r} is not one of {', '.join(IMPORT_MODES)}")
        if mode == "s3" and not config.get("Bucket"):
            raise InvalidArgument("providers.aws.Bucket: required with Import: s3 (the bucket ImportSnapshot reads)")
        region = config.get("Region")
        if region:
            check_region(region, "providers.aws.Region")
        return cls(region=region or None, import_mode=mode, bucket=config.get("Bucket") or None)


@dataclass
class InstanceProperties:
    """One Provision's properties, parsed: what RunInstances gets besides tags, token and init."""

    run: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    region: str | None = None
    image: str | None = None  # a built image id (sha256:...), published as an AMI
    volumes: list[persistent.Volume] = field(default_factory=list)  # the logical id's EBS volumes

    @property
    def explicit_ami(self) -> str | None:
        return self.run.get("ImageId")


def parse(properties: Any) -> InstanceProperties:
    """Check instance properties; InvalidArgument names the first bad key."""
    if not isinstance(properties, dict):
        raise InvalidArgument(f"Properties: must be an object, got {type(properties).__name__}")
    unknown = sorted(set(properties) - set(PROPERTY_KEYS))
    if unknown:
        raise InvalidArgument(
            f"Properties.{unknown[0]}: unknown key for aws (known: {', '.join(PROPERTY_KEYS)})"
        )
    run = properties.get("RunInstancesInput") or {}
    if not isinstance(run, dict):
        raise InvalidArgument(f"Properties.RunInstancesInput: must be an object, got {type(run).__name__}")
    for key in OWNED_FIELDS:
        if key in run and not (key in ("MinCount", "MaxCount") and run[key] == 1):
            raise InvalidArgument(f"Properties.RunInstancesInput.{key}: set by mobykit (one instance per Provision)")
    check_shape(run, _run_instances_shape(), "Properties.RunInstancesInput")
    tags = properties.get("Tags") or {}
    if not isinstance(tags, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
        raise InvalidArgument("Properties.Tags: must be an object of strings")
    for key in tags:
        if key.startswith("aws:"):
            raise InvalidArgument(f"Properties.Tags.{key}: the aws: prefix is reserved by AWS")
    region = properties.get("Region")
    if region is not None:
        if not isinstance(region, str) or not region:
            raise InvalidArgument(f"Properties.Region: must be a region name, got {region!r}")
        check_region(region, "Properties.Region")
    image = properties.get("Image")
    if image is not None and (not isinstance(image, str) or not _IMAGE_ID.match(image)):
        raise InvalidArgument(f"Properties.Image: {image!r} is not a built image id (sha256:<64 hex>)")
    volumes = persistent.parse(properties.get("Volumes"))
    # Image or ImageId is required only to launch (``provider.create``): a group spec is validated
    # before the moby flavor's Prepare has written the Image into it.
    return InstanceProperties(run=dict(run), tags=dict(tags), region=region, image=image, volumes=volumes)


def user_data(init: str, run: dict[str, Any]) -> str | None:
    """What goes in UserData (boto3 base64-encodes it): the init, else the spec's own UserData, which
    Infrakit's specs carry base64-encoded (Go's SDK wants it so) and is decoded back here."""
    if init:
        return init
    given = run.get("UserData")
    if not given:
        return None
    try:
        return base64.b64decode(given, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return given  # plain text: taken as written


def private_ip(logical_id: str | None) -> str | None:
    """A LogicalID that is an IPv4 address becomes the instance's private IP (Infrakit's quorum groups)."""
    if not logical_id:
        return None
    try:
        return str(ipaddress.IPv4Address(logical_id))
    except ValueError:
        return None


@functools.cache
def known_regions() -> frozenset[str]:
    import botocore.session

    session = botocore.session.get_session()
    out: set[str] = set()
    for partition in session.get_available_partitions():
        out.update(session.get_available_regions("ec2", partition_name=partition))
    return frozenset(out)


def check_region(region: str, where: str) -> None:
    if region not in known_regions():
        raise InvalidArgument(f"{where}: unknown region {region!r} (not an EC2 region botocore knows)")


@functools.cache
def _run_instances_shape():
    import botocore.session

    return botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape


_SCALARS: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "long": (int,),
    "boolean": (bool,),
    "double": (int, float),
    "float": (int, float),
    "blob": (str, bytes),
    "timestamp": (str, int, float),
}


def check_shape(value: Any, shape: Any, where: str) -> None:
    """``value`` must fit botocore shape ``shape`` (structures, lists, maps, scalars, enums)."""
    kind = shape.type_name
    if kind == "structure":
        if not isinstance(value, dict):
            raise InvalidArgument(f"{where}: must be an object ({shape.name}), got {type(value).__name__}")
        members = shape.members
        for key, item in value.items():
            if key not in members:
                close = difflib.get_close_matches(str(key), list(members), n=1, cutoff=0.75)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise InvalidArgument(f"{where}.{key}: unknown field of {shape.name}{hint}")
            check_shape(item, members[key], f"{where}.{key}")
        return
    if kind == "list":
        if not isinstance(value, list):
            raise InvalidArgument(f"{where}: must be a list, got {type(value).__name__}")
        for i, item in enumerate(value):
            check_shape(item, shape.member, f"{where}[{i}]")
        return
    if kind == "map":
        if not isinstance(value, dict):
            raise InvalidArgument(f"{where}: must be an object, got {type(value).__name__}")
        for k, item in value.items():
            check_shape(item, shape.value, f"{where}.{k}")
        return
    allowed = _SCALARS.get(kind, (object,))
    if isinstance(value, bool) and bool not in allowed:
        raise InvalidArgument(f"{where}: must be a {kind}, got a boolean")
    if not isinstance(value, allowed):
        raise InvalidArgument(f"{where}: must be a {kind}, got {type(value).__name__}")
    enum = getattr(shape, "enum", None)
    if enum and value not in enum:
        shown = ", ".join(enum[:8]) + (", ..." if len(enum) > 8 else "")
        raise InvalidArgument(f"{where}: {value!r} is not one of {shown}")
