"""``Boot: disk``: instances boot the image's ``qcow2-bios`` disk instead of its kernel and initrd.

Why a base and an overlay per VM: the disk of an image is immutable and the same for every VM, so
it is uploaded into the pool once per image id (``<hex>.qcow2``, owned by the daemon like every
volume) and each instance gets a small qcow2 overlay backed by it (``<instance>.qcow2``): reads
fall through to the base, the VM's writes stay in its overlay, and destroy removes the overlay
only. No VM ever opens the base for writing, so any number of them share it.

Why a marker volume: an upload cut short (the server killed mid-way) leaves a partial base behind,
and a base is never uploaded twice. ``<hex>.qcow2.published`` is made after the upload completed,
so a base without it is deleted and uploaded again, as ``.cmdline`` does for kernel boots.

What the disk holds is the image's own boot loader (syslinux on an MBR disk, booted by SeaBIOS)
with the kernel, initrd and command line of the build, so the domain has no ``<kernel>``; the disk
is made from the stored image's canonical tar on first use (``BootImage.format``), or earlier by
the moby flavor's Prepare when the instance properties say ``Boot: disk``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mobykit.errors import FailedPrecondition, InvalidArgument
from mobykit.providers.base import BootImage
from mobykit.providers.libvirt.properties import DISK_FORMAT
from mobykit.providers.libvirt.storage import Storage


def base_name(image_id: str) -> str:
    return f"{image_id.removeprefix('sha256:')}.qcow2"


def marker_name(image_id: str) -> str:
    return base_name(image_id) + ".published"


def overlay_name(instance_id: str) -> str:
    return f"{instance_id}.qcow2"  # "<instance>." like every volume destroy removes


def disk_file(image: BootImage) -> Path:
    """The image's qcow2 disk on this host, made from its canonical tar when first asked for."""
    qcow2 = [p for p in image.format(DISK_FORMAT) if p.name.endswith(".qcow2")]
    if len(qcow2) != 1:
        raise FailedPrecondition(f"image {image.id}: its {DISK_FORMAT} format has no single .qcow2 file")
    return qcow2[0]


def publish(storage: Storage, conn: Any, pool: Any, image: BootImage) -> None:
    """Upload the image's disk as the pool's base for it, unless a complete one is there. The
    caller holds the provider's publication lock."""
    if storage.volume(pool, marker_name(image.id)) is not None:
        return
    stale = storage.volume(pool, base_name(image.id))
    if stale is not None:
        stale.delete(0)  # no marker: an interrupted upload, never booted (create needs the marker)
    base = storage.upload(conn, pool, base_name(image.id), disk_file(image))
    try:
        storage.upload(conn, pool, marker_name(image.id), b"")
    except BaseException:
        base.delete(0)
        raise


def overlay(storage: Storage, pool: Any, image_id: str | None, instance_id: str) -> Any:
    """The instance's new overlay volume over its image's published base."""
    if not image_id:
        raise InvalidArgument("Properties.Image: Boot: disk boots a built image (sha256:...), and none is given")
    base = storage.volume(pool, base_name(image_id))
    if base is None or storage.volume(pool, marker_name(image_id)) is None:
        raise FailedPrecondition(
            f"image {image_id}: its disk is not published to libvirt pool {pool.name()} "
            "(the core publishes built images)"
        )
    return storage.overlay(pool, overlay_name(instance_id), base)
