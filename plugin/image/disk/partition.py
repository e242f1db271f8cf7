"""Partitioned disk images: MBR or GPT written by sfdisk, file system images placed at their
partitions, and the size rule every disk format shares.

Layout: partitions start at 1 MiB and are whole MiB (what every current partitioner does, and
what Azure's VHD rule and 4 KiB-sector disks want); a GPT disk keeps its last MiB for the backup
table. sfdisk is given every id (MBR disk signature, GPT disk and partition GUIDs), derived from
the image id by the caller, so its output depends only on its input.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mobykit.errors import InvalidArgument
from mobykit.image.disk import sparse, tools

SECTOR = 512
MIB = 1 << 20
GIB = 1 << 30
ALIGN = MIB
MBR_BOOT_CODE = 440  # bytes of boot code before the disk signature in sector 0

ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"  # GPT: EFI system partition
# MBR partition types of FAT file systems, by FAT width (LBA variants: the partition may lie
# beyond what CHS addressing reaches).
FAT_MBR_TYPES = {12: "1", 16: "e", 32: "c"}

Label = Literal["dos", "gpt"]


@dataclass(frozen=True)
class Partition:
    """One partition: ``size`` bytes (whole MiB) holding the file system image ``image``."""

    size: int
    type: str  # sfdisk's type: an MBR id in hex ("c") or a GPT type GUID
    image: Path | None = None
    bootable: bool = False  # MBR "active" flag, which BIOS boot code looks for
    uuid: uuid.UUID | None = None  # GPT partition GUID
    name: str = ""  # GPT partition name


@dataclass(frozen=True)
class Layout:
    """A whole disk: its table, its id and its partitions, laid out one after another from 1 MiB."""

    label: Label
    disk_id: str  # "0x1234abcd" (MBR disk signature) or a GUID (GPT)
    size: int
    partitions: tuple[Partition, ...]

    def offsets(self) -> list[int]:
        starts, pos = [], ALIGN
        for p in self.partitions:
            starts.append(pos)
            pos += p.size
        return starts

    def sfdisk_script(self) -> str:
        lines = [f"label: {self.label}", f"label-id: {self.disk_id}", "unit: sectors"]
        if self.label == "gpt":
            lines.append(f"first-lba: {ALIGN // SECTOR}")
        lines.append("")
        for start, p in zip(self.offsets(), self.partitions, strict=True):
            fields = [f"start={start // SECTOR}", f"size={p.size // SECTOR}", f"type={p.type}"]
            if p.bootable:
                fields.append("bootable")
            if p.uuid is not None:
                fields.append(f"uuid={str(p.uuid).upper()}")
            if p.name:
                fields.append(f'name="{p.name}"')
            lines.append(", ".join(fields))
        return "\n".join(lines) + "\n"


def overhead(label: Label) -> int:
    """Bytes of a disk outside its partitions: the first MiB, and for GPT the last (backup table)."""
    return ALIGN + (ALIGN if label == "gpt" else 0)


def round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def _human(n: int) -> str:
    for unit, suffix in ((1 << 40, "T"), (GIB, "G"), (MIB, "M"), (1024, "K")):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    if n >= MIB:
        return f"{n / MIB:.1f}M"
    return f"{n} bytes"


def disk_size(needed: int, requested: int | None, *, fmt: str, unit: int = MIB, default: int = 0,
              maximum: tuple[int, str] | None = None) -> int:
    """The size of a ``fmt`` disk: ``requested`` (``--size``) rounded up to ``unit``, else the larger
    of ``default`` and ``needed`` rounded up. A ``--size`` below what the image needs, or beyond
    ``maximum`` (bytes, why), is refused here, before anything is written, naming
    the option, the size needed and the format."""
    if requested is None:
        return max(default, round_up(needed, unit))
    if requested < needed:
        raise InvalidArgument(
            f"--size {_human(requested)} is too small for {fmt}: the image needs at least "
            f"{_human(round_up(needed, unit))} ({needed} bytes)")
    size = round_up(requested, unit)
    if maximum is not None and size > maximum[0]:
        raise InvalidArgument(f"--size {_human(requested)} is too large for {fmt}: at most {_human(maximum[0])} "
                              f"({maximum[1]})")
    return size


def write(path: Path, layout: Layout, *, mbr_code: bytes = b"") -> Path:
    """Write the whole disk at ``path``: a sparse file of ``layout.size`` bytes, the partition
    table, each partition's image at its offset, and ``mbr_code`` (BIOS boot code) in sector 0."""
    if len(mbr_code) > MBR_BOOT_CODE:
        raise ValueError(f"MBR boot code is {len(mbr_code)} bytes; at most {MBR_BOOT_CODE} fit before the table")
    end = overhead(layout.label) + sum(p.size for p in layout.partitions)
    if end > layout.size or any(p.size % ALIGN for p in layout.partitions):
        raise ValueError(f"partitions do not fit a {layout.size}-byte disk in whole MiB: {layout}")
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(layout.size)
    # --no-reread/--no-tell-kernel: a plain file, not a block device; -q: no chatter on stdout.
    tools.run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(path)],
              input=layout.sfdisk_script().encode())
    for start, p in zip(layout.offsets(), layout.partitions, strict=True):
        if p.image is not None:
            if p.image.stat().st_size > p.size:
                raise ValueError(f"{p.image} is larger than its {p.size}-byte partition")
            sparse.copy_into(p.image, path, start)
    if mbr_code:
        with open(path, "r+b") as f:
            f.write(mbr_code)
    return path


def layout(label: Label, disk_id: str | int | uuid.UUID, size: int, partitions: Sequence[Partition]) -> Layout:
    """A Layout with ``disk_id`` in sfdisk's spelling (a 32-bit MBR signature or a GPT GUID)."""
    if label == "dos":
        text = f"0x{int(disk_id):08x}" if not isinstance(disk_id, str) else disk_id
    else:
        text = str(disk_id).upper()
    return Layout(label=label, disk_id=text, size=size, partitions=tuple(partitions))
