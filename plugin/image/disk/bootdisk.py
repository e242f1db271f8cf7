"""The two bootable disk layouts every disk format is made from: one FAT partition holding the
kernel, the initrd and a boot loader, on an MBR disk booted by BIOS (syslinux) or on a GPT disk
booted by UEFI (GRUB as ``EFI/BOOT/BOOTX64.EFI``, the removable-media path firmware looks for).

As in LinuxKit's raw formats, the root file system is the initrd (the whole image tree), so the
command line needs no ``root=``: the spec's command line goes to the boot loader unchanged.

Why FAT and not ext4 for the BIOS disk too: one partition type serves both firmwares (a UEFI ESP
must be FAT), mkfs.fat + mtools need no root and no loop device, and both are byte-reproducible
(``disk.fat``). Every id is derived from the image id (``disk.ids``), every time is ``mtime``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mobykit.image.disk import fat, grub, ids, partition, syslinux
from mobykit.image.disk.partition import ALIGN, ESP_TYPE, FAT_MBR_TYPES, SECTOR, Label, Partition

Firmware = Literal["bios", "efi"]
FS_LABEL = "MOBYKIT"
MAX_SIZE = (2 << 40, "a FAT partition, like an MBR, counts 512-byte sectors in 32 bits")


@dataclass(frozen=True)
class BootDisk:
    """What goes on a bootable disk for ``firmware``: the files of its one FAT partition."""

    firmware: Firmware
    files: dict[str, Path]  # path on the FAT file system -> source file
    image_id: str
    mtime: int

    @property
    def label(self) -> Label:
        return "dos" if self.firmware == "bios" else "gpt"

    def min_size(self) -> int:
        """The smallest disk (whole MiB) these files fit on, with room for the boot loader."""
        return partition.overhead(self.label) + fat.size_for(self.files)

    def write(self, path: Path, size: int) -> Path:
        """Write the whole disk of ``size`` bytes (at least ``min_size()``, whole MiB) at ``path``;
        its one partition fills it. Intermediate files go beside ``path``."""
        part_size = size - partition.overhead(self.label)
        part_image = path.with_name(f".{path.name}.part")
        try:
            fat.make_image(part_image, self.files, size=part_size, label=FS_LABEL,
                           serial=ids.serial32(self.image_id, f"fat-{self.firmware}"), mtime=self.mtime,
                           hidden_sectors=ALIGN // SECTOR)
            if self.firmware == "bios":
                syslinux.install(part_image, mtime=self.mtime)
                part = Partition(part_size, FAT_MBR_TYPES[fat.fat_bits(part_image)], part_image, bootable=True)
                table = partition.layout("dos", ids.serial32(self.image_id, "mbr"), size, [part])
                return partition.write(path, table, mbr_code=syslinux.mbr_code())
            part = Partition(part_size, ESP_TYPE, part_image, uuid=ids.uuid_for(self.image_id, "esp"),
                             name="EFI System Partition")
            table = partition.layout("gpt", ids.uuid_for(self.image_id, "gpt-disk"), size, [part])
            return partition.write(path, table)
        finally:
            part_image.unlink(missing_ok=True)


def marker(image_id: str) -> str:
    """The file GRUB's embedded config searches for: this image's partition, even with other
    mobykit disks attached."""
    return f"/boot/mobykit-{ids.short_hex(image_id)}"


def contents(firmware: Firmware, *, kernel: Path, initrd: Path, cmdline: str, image_id: str, mtime: int,
             work: Path) -> BootDisk:
    """The partition's files for ``firmware``; the boot loader's files are written into ``work``.
    No ``root=`` is added to ``cmdline``: the initrd is the root file system. A newline in it
    (a YAML block scalar) becomes a space: a config line cannot hold one, the kernel reads both
    as separators."""
    cmdline = " ".join(cmdline.splitlines()).strip()
    if firmware == "bios":
        cfg = work / "syslinux.cfg"
        cfg.write_text(syslinux.config(cmdline, kernel="/kernel", initrd="/initrd.img"))
        files = {"syslinux.cfg": cfg, "kernel": kernel, "initrd.img": initrd}
    elif firmware == "efi":
        mark = marker(image_id)
        (work / "marker").write_text(image_id + "\n")
        loader = grub.efi_loader(work / "BOOTX64.EFI", grub.config(cmdline, marker=mark), mtime=mtime)
        files = {"EFI/BOOT/BOOTX64.EFI": loader, "boot/kernel": kernel, "boot/initrd.img": initrd,
                 mark.lstrip("/"): work / "marker"}
    else:
        raise ValueError(f"unknown firmware {firmware!r}")
    return BootDisk(firmware=firmware, files=files, image_id=image_id, mtime=mtime)
