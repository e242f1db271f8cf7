"""FAT images (EFI system partitions, the El Torito EFI image of an ISO, syslinux boot partitions),
made with dosfstools and mtools, byte-reproducible.

How: ``mkfs.fat --invariant`` with the volume id given (no clock, no random id), then ``mcopy -m``
from a staging copy whose files and directories carry the build's one timestamp, with
``SOURCE_DATE_EPOCH`` set so mtools stamps nothing else with the time of day. The image is a plain
file; a disk format writes it into its partition.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from mobykit.image.disk import tools

SECTOR = 512
MIB = 1 << 20
FAT_EPOCH = 315619200  # 1980-01-02 UTC: FAT cannot store earlier times (mtools would wrap 1970 to 2098)


def size_for(files: Mapping[str, Path], slack: int = 2 * MIB) -> int:
    """A FAT size that holds ``files`` (rounded up to whole MiB, with room for the tables)."""
    data = sum(((p.stat().st_size + 4095) // 4096) * 4096 for p in files.values())
    need = int(data * 1.05) + slack + 64 * 1024 * (len(files) + 1)
    return max(MIB * 2, -(-need // MIB) * MIB)


def make_image(path: Path, files: Mapping[str, Path], *, size: int | None = None, label: str = "EFI",
               serial: int = 1, mtime: int = 0, hidden_sectors: int = 0) -> Path:
    """Write a FAT image of ``size`` bytes (default ``size_for(files)``) at ``path`` holding
    ``files`` (image path -> source file), every entry stamped ``mtime``. ``hidden_sectors`` is
    the partition's start on its disk, for a partition image (the boot sector records it; boot
    code that reads the partition through the BIOS, as syslinux's does, may rely on it)."""
    size = size or size_for(files)
    mtime = max(mtime, FAT_EPOCH)
    staging = path.parent / f".{path.name}.files"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for dest in sorted(files):
            target = staging / dest.strip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(files[dest], target)
        for dirpath, dirnames, filenames in os.walk(staging, topdown=False):
            for name in dirnames + filenames:
                os.utime(os.path.join(dirpath, name), (mtime, mtime), follow_symlinks=False)
        path.unlink(missing_ok=True)
        with open(path, "wb") as f:
            f.truncate(size)
        tools.run(["mkfs.fat", "--invariant", "-i", f"{serial:08X}", "-n", label[:11].upper(),
                   *(["-h", str(hidden_sectors)] if hidden_sectors else []), str(path)], mtime=mtime)
        tops = sorted(staging.iterdir())
        if tops:
            tools.run(["mcopy", "-m", "-s", "-Q", "-i", str(path), *map(str, tops), "::/"], mtime=mtime)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def fat_bits(path: Path) -> int:
    """12, 16 or 32: the FAT width mkfs.fat chose for the image at ``path`` (for the MBR type byte).
    Read from the boot sector: FAT32 has no root directory entries (offset 17) and 0 in the
    16-bit sectors-per-FAT field (offset 22); FAT12 and FAT16 differ by cluster count (< 4085)."""
    with open(path, "rb") as f:
        bs = f.read(SECTOR)
    le = int.from_bytes
    bytes_per_sector, per_cluster, reserved, fats = le(bs[11:13], "little"), bs[13], le(bs[14:16], "little"), bs[16]
    root_entries, fat16_size = le(bs[17:19], "little"), le(bs[22:24], "little")
    if root_entries == 0 and fat16_size == 0:
        return 32
    total = le(bs[19:21], "little") or le(bs[32:36], "little")
    root_sectors = -(-(root_entries * 32) // bytes_per_sector)
    clusters = (total - reserved - fats * fat16_size - root_sectors) // per_cluster
    return 12 if clusters < 4085 else 16
