"""Making ``qemu-img``'s VHD files reproducible: the footer's timestamp and unique id.

Why a hand-written fix-up: qemu-img (``-O vpc``) stamps every VHD footer with the time of the
conversion and a random unique id, has no option to set either, and no Python library writes
VHDs we could use instead. Both are plain fields of the 512-byte footer (Microsoft's "Virtual
Hard Disk Image Format Specification", footer format), which a fixed VHD has once at its end and
a dynamic one also as a copy at offset 0; the dynamic disk header qemu writes has neither. Each
footer is rewritten with the build's time and an id derived from the image, and its checksum (one's
complement of the byte sum, the checksum field taken as zero) recomputed.
"""

from __future__ import annotations

import struct
import uuid
from pathlib import Path

FOOTER = 512
COOKIE = b"conectix"
EPOCH = 946684800  # 2000-01-01 00:00:00 UTC: VHD times count seconds from here
TIMESTAMP = slice(24, 28)  # big-endian u32
CHECKSUM = slice(64, 68)  # big-endian u32
UNIQUE_ID = slice(68, 84)  # 16 bytes


def checksum(footer: bytes) -> int:
    """The footer checksum: one's complement of the sum of its bytes without the checksum field."""
    return ~(sum(footer[:CHECKSUM.start]) + sum(footer[CHECKSUM.stop:])) & 0xFFFFFFFF


def fixed_footer(footer: bytes, *, mtime: int, unique_id: uuid.UUID) -> bytes:
    """``footer`` with the timestamp of ``mtime`` (times before 2000 become 2000), ``unique_id``
    and the checksum that goes with them."""
    if len(footer) != FOOTER or footer[:8] != COOKIE:
        raise ValueError("not a VHD footer (no 'conectix' cookie)")
    out = bytearray(footer)
    out[TIMESTAMP] = struct.pack(">I", max(0, mtime - EPOCH) & 0xFFFFFFFF)
    out[UNIQUE_ID] = unique_id.bytes
    out[CHECKSUM] = struct.pack(">I", checksum(out))
    return bytes(out)


def fix(path: Path, *, mtime: int, unique_id: uuid.UUID) -> None:
    """Rewrite every footer of the VHD at ``path`` (the last 512 bytes and, for a dynamic VHD,
    the copy at the start)."""
    with open(path, "r+b") as f:
        size = f.seek(0, 2)
        if size < FOOTER:
            raise ValueError(f"{path}: too short for a VHD ({size} bytes)")
        offsets = [size - FOOTER]
        f.seek(0)
        if f.read(len(COOKIE)) == COOKIE and size > FOOTER:
            offsets.insert(0, 0)
        for offset in offsets:
            f.seek(offset)
            footer = fixed_footer(f.read(FOOTER), mtime=mtime, unique_id=unique_id)
            f.seek(offset)
            f.write(footer)
