"""Instance properties and ids of the libvirt provider: what a request may say, checked before
anything touches libvirt, so a bad group spec fails at Validate naming the key."""

from __future__ import annotations

import re
import secrets
import threading
import time
from typing import Any

from mobykit.errors import InvalidArgument
from mobykit.providers import persistent
from mobykit.providers.libvirt import network

ID_PREFIX = "mobykit-"
ENV_URI = "MOBYKIT_LIBVIRT_URI"
DEFAULT_URI = "qemu:///session"
DEFAULT_POOL = "mobykit"

# property -> default; defaults are documented in the README table via this dict.
PROPERTY_DEFAULTS: dict[str, Any] = {
    "CPUs": 1,
    "Memory": 512,
    "Image": None,
    "Kernel": None,
    "Initrd": None,
    "Cmdline": None,
    "Publish": [],
    "URI": None,
    "Pool": None,
    "Boot": "kernel",
    "Volumes": [],
    "PrivateNetwork": None,  # the group's subnet, "10.77.0.0/24": a private segment (network.py)
}
BOOT_MODES = ("kernel", "disk")  # direct kernel boot, or the image's disk (an overlay per VM: diskboot.py)
DISK_FORMAT = "qcow2-bios"  # the output format Boot: disk boots (SeaBIOS, the machine's default firmware)
CONFIG_KEYS = ("URI", "Pool", "PoolPath", "DomainType", "Machine")
DEFAULT_CMDLINE = "console=ttyS0 panic=-1"
CREATE_GRACE = 300.0  # seconds after which an unfinished create is listed anyway (see the package docstring)

_PUBLISH = re.compile(
    r"^(?:(?P<addr>[0-9.]+):)?(?P<host>\d{0,5}):(?P<guest>\d{1,5})(?:/(?P<proto>tcp|udp))?$")
_IMAGE_ID = re.compile(r"^sha256:[0-9a-f]{64}$")
VOLUME_POOL_SUFFIX = "-volumes"  # persistent volumes live in a pool of their own: <Pool>-volumes
_ID = re.compile(rf"^{ID_PREFIX}(\d{{20}})-")

_id_lock = threading.Lock()
_last_ns = 0


def new_id() -> str:
    """A fresh instance id that sorts after every id this process made before."""
    global _last_ns
    with _id_lock:
        now = max(time.time_ns(), _last_ns + 1)
        _last_ns = now
    return f"{ID_PREFIX}{now:020d}-{secrets.token_hex(2)}"


def created_ns(instance_id: str) -> int | None:
    """Creation time (ns since the epoch) encoded in an instance id, or None for a foreign id."""
    m = _ID.match(instance_id)
    return int(m.group(1)) if m else None


def parse_publish(value: str, where: str = "Publish") -> tuple[str, int, int]:
    """``"8080:80"`` / ``"127.0.0.1:8080:80/tcp"`` -> (proto, host port, guest port). Loopback only.
    Host port 0 (``"0:80"``, ``":80"``, ``"127.0.0.1::80"``) means any free port, chosen at start."""
    m = _PUBLISH.match(value) if isinstance(value, str) else None
    if not m:
        raise InvalidArgument(
            f"{where}: {value!r} is not [HOSTPORT]:GUESTPORT[/tcp|udp] (HOSTPORT 0 or empty: any free port)"
        )
    addr = m.group("addr") or "127.0.0.1"
    if addr != "127.0.0.1":
        raise InvalidArgument(f"{where}: {value!r}: ports are only published on 127.0.0.1")
    host, guest = int(m.group("host") or 0), int(m.group("guest"))
    if not 0 <= host <= 65535:
        raise InvalidArgument(f"{where}: {value!r}: port {host} out of range")
    if not 1 <= guest <= 65535:
        raise InvalidArgument(f"{where}: {value!r}: port {guest} out of range")
    return m.group("proto") or "tcp", host, guest


def boot_mode(properties: dict[str, Any]) -> str:
    """``Boot``, with null or absent meaning the default (direct kernel boot)."""
    boot = properties.get("Boot")
    return PROPERTY_DEFAULTS["Boot"] if boot is None else boot


def volume_specs(properties: dict[str, Any]) -> list[tuple[str, int]]:
    """``Volumes`` as (name, size in GiB), in order; checked by validate_properties."""
    return [(v.name, v.size_gb) for v in persistent.parse(properties.get("Volumes"))]


def volume_name(group: str, logical_id: str, name: str) -> str:
    """The pool volume a logical id owns: ``<group>-<lid>-<name>`` (``providers.persistent``)."""
    persistent.check_owner(group, logical_id)
    return persistent.volume_name(group, logical_id, name)


def validate_properties(properties: dict[str, Any]) -> None:
    """Check instance properties; raise InvalidArgument naming the first bad key."""
    if not isinstance(properties, dict):
        raise InvalidArgument("Properties: must be an object")
    unknown = sorted(set(properties) - set(PROPERTY_DEFAULTS))
    if unknown:
        raise InvalidArgument(
            f"Properties: unknown key(s) {', '.join(unknown)} for libvirt "
            f"(known: {', '.join(PROPERTY_DEFAULTS)})"
        )
    for key in ("CPUs", "Memory"):
        v = properties.get(key, PROPERTY_DEFAULTS[key])
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InvalidArgument(f"Properties.{key}: must be a positive integer, got {v!r}")
    if properties.get("Memory", 512) < 64:
        raise InvalidArgument("Properties.Memory: at least 64 (MiB) is needed to boot a kernel")
    for key in ("Image", "Kernel", "Initrd", "Cmdline", "URI", "Pool", "Boot"):
        v = properties.get(key)
        if v is not None and not isinstance(v, str):
            raise InvalidArgument(f"Properties.{key}: must be a string, got {type(v).__name__}")
    image = properties.get("Image")
    if image is not None and not _IMAGE_ID.match(image):
        raise InvalidArgument(f"Properties.Image: {image!r} is not a built image id (sha256:<64 hex>)")
    if image and (properties.get("Kernel") or properties.get("Initrd")):
        raise InvalidArgument("Properties: give either Image or Kernel/Initrd, not both")
    if bool(properties.get("Kernel")) != bool(properties.get("Initrd")):
        raise InvalidArgument("Properties: Kernel and Initrd go together")
    boot = boot_mode(properties)
    if boot not in BOOT_MODES:
        raise InvalidArgument(f"Properties.Boot: {boot!r} is not one of {', '.join(BOOT_MODES)}")
    if boot == "disk" and any(properties.get(k) for k in ("Kernel", "Initrd", "Cmdline")):
        # The disk's boot loader has the kernel, initrd and command line the image was built with.
        raise InvalidArgument("Properties.Boot: disk boots a built Image's disk; Kernel, Initrd and Cmdline "
                              "go with Boot: kernel")
    persistent.parse([] if properties.get("Volumes") is None else properties["Volumes"])
    network.validate(properties)
    publish = properties.get("Publish", [])
    if not isinstance(publish, list):
        raise InvalidArgument("Properties.Publish: must be a list like [\"8080:80\"]")
    seen = set()
    for i, p in enumerate(publish):
        proto, host, _guest = parse_publish(p, f"Properties.Publish[{i}]")
        if host and (proto, host) in seen:  # any number of auto-assigned (0) ports
            raise InvalidArgument(f"Properties.Publish[{i}]: host port {host}/{proto} published twice")
        seen.add((proto, host))
