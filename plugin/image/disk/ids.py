"""Every id a disk or ISO carries (disk and partition GUIDs, file system UUIDs and serials, ISO
volume ids) is derived from the image id, so the same image gives the same bytes and two images
never share an id. ``purpose`` separates the ids of one image ("esp", "root", "disk", ...)."""

from __future__ import annotations

import hashlib
import uuid


def _digest(image_id: str, purpose: str) -> bytes:
    return hashlib.sha256(f"mobykit:{purpose}:{image_id}".encode()).digest()


def uuid_for(image_id: str, purpose: str) -> uuid.UUID:
    """A random-format (version 4) UUID, stable for (image, purpose)."""
    return uuid.UUID(bytes=_digest(image_id, purpose)[:16], version=4)


def serial32(image_id: str, purpose: str) -> int:
    """A 32-bit serial (FAT volume id, MBR disk signature), never 0."""
    return int.from_bytes(_digest(image_id, purpose)[:4], "big") or 1


def short_hex(image_id: str, length: int = 12) -> str:
    """The image id's first hex digits, for labels and volume ids."""
    return image_id.removeprefix("sha256:")[:length]
