"""What each bootable output format is to qemu, and which one a build name ``NAME`` has.

Every bootable format of ``mobykit build`` (LinuxKit's names and file names) boots in one of four
ways, and with one firmware:

- ``kernel``: qemu loads the kernel and initrd itself (``-kernel``/``-initrd``/``-append``):
  ``kernel+initrd``, ``tar-kernel-initrd`` (unpacked first), and ``kernel+squashfs``, whose root
  file system is a disk the loader initrd finds by the image id;
- ``cdrom``: the ISO on an IDE CD-ROM, booted by the firmware (ISOLINUX or GRUB in the ISO);
- ``disk``: the disk image on virtio-blk with qemu's name for its format (``raw``, ``qcow2``,
  ``vpc`` for both VHDs, ``vmdk``), booted by the firmware (syslinux or GRUB on the disk); ``gcp``
  is a ``disk.raw`` in a tar.gz, unpacked first.

Disks are attached with ``snapshot=on``: the guest may write, its writes go to a temporary
overlay qemu deletes, and the build output is never modified (an image is immutable; booting it
twice must boot the same bytes). ISOs are read-only CD-ROMs.

The firmware is the format's: SeaBIOS for the ``-bios`` and BIOS formats, OVMF for the ``-efi``
ones (``mobykit.run.firmware``). The cloud and VM-disk formats (``vhd``, ``dynamic-vhd``, ``vmdk``,
``aws``, ``gcp``) are the BIOS disk converted, as ``mobykit.image.formats`` makes them.

Which format ``NAME`` has: ``NAME.json`` (written by every build) lists the formats built; without
it, the files are looked for. When several are there, the first of ``LAYOUTS`` wins
(``kernel+initrd``: the quickest boot); ``--format`` picks one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mobykit.errors import InvalidArgument, NotFound
from mobykit.run import unpack
from mobykit.run.firmware import Firmware

Kind = Literal["kernel", "squashfs", "tarball", "cdrom", "disk", "gcp"]


@dataclass(frozen=True)
class Layout:
    """One bootable format: the files it writes after ``NAME`` (those the boot needs), how it boots."""

    format: str
    suffixes: tuple[str, ...]
    kind: Kind
    firmware: Firmware = "bios"
    disk_format: str = "raw"  # qemu's format name of a disk image


LAYOUTS: dict[str, Layout] = {
    layout.format: layout
    for layout in (
        Layout("kernel+initrd", ("-kernel", "-initrd.img"), "kernel"),
        Layout("kernel+squashfs", ("-kernel", "-squashfs-initrd.img", "-squashfs.img"), "squashfs"),
        Layout("tar-kernel-initrd", ("-initrd.tar",), "tarball"),
        Layout("iso-bios", (".iso",), "cdrom"),
        Layout("iso-efi", ("-efi.iso",), "cdrom", "efi"),
        Layout("iso-efi-initrd", ("-efi-initrd.iso",), "cdrom", "efi"),
        Layout("raw-bios", ("-bios.img",), "disk"),
        Layout("raw-efi", ("-efi.img",), "disk", "efi"),
        Layout("qcow2-bios", (".qcow2",), "disk", disk_format="qcow2"),
        Layout("qcow2-efi", ("-efi.qcow2",), "disk", "efi", "qcow2"),
        Layout("vhd", (".vhd",), "disk", disk_format="vpc"),
        Layout("dynamic-vhd", (".vhd",), "disk", disk_format="vpc"),
        Layout("vmdk", (".vmdk",), "disk", disk_format="vmdk"),
        Layout("aws", (".raw",), "disk"),
        Layout("gcp", (".img.tar.gz",), "gcp"),
    )
}
NOT_BOOTABLE = {"tar": "a root file system archive", "docker": "a docker build context"}


@dataclass(frozen=True)
class BootMedia:
    """What qemu boots, as files on this host: a kernel and initrd, a CD-ROM, a disk, or a kernel
    with a root disk (kernel+squashfs). ``cmdline`` only goes with a kernel; the other media carry
    their command line in their boot loader's configuration."""

    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = ""
    format: str = "kernel+initrd"
    firmware: Firmware = "bios"
    cdrom: Path | None = None
    disk: Path | None = None
    disk_format: str = "raw"


@dataclass(frozen=True)
class Output:
    """A bootable output of a build found on disk (``find``); ``prepare`` makes it bootable."""

    prefix: str
    layout: Layout

    @property
    def format(self) -> str:
        return self.layout.format

    @property
    def files(self) -> list[Path]:
        return [Path(self.prefix + s) for s in self.layout.suffixes]

    def missing(self) -> list[Path]:
        return [p for p in self.files if not p.is_file()]

    def cmdline(self) -> str:
        path = Path(self.prefix + "-cmdline")
        return path.read_text().strip() if path.is_file() else ""

    def prepare(self, scratch: Path) -> BootMedia:
        """The media qemu gets; archives are unpacked into ``scratch`` (the caller removes it)."""
        lay, files = self.layout, self.files
        if lay.kind == "kernel":
            return BootMedia(files[0], files[1], self.cmdline(), format=lay.format)
        if lay.kind == "squashfs":
            return BootMedia(files[0], files[1], self.cmdline(), format=lay.format, disk=files[2])
        if lay.kind == "tarball":
            kernel, initrd, cmdline = unpack.kernel_initrd(files[0], scratch)
            return BootMedia(kernel, initrd, cmdline, format=lay.format)
        if lay.kind == "cdrom":
            return BootMedia(format=lay.format, firmware=lay.firmware, cdrom=files[0])
        disk = unpack.gcp_disk(files[0], scratch) if lay.kind == "gcp" else files[0]
        return BootMedia(format=lay.format, firmware=lay.firmware, disk=disk, disk_format=lay.disk_format)


def _recorded_formats(prefix: str) -> list[str] | None:
    """The formats ``NAME.json`` says were built, or None without a readable one."""
    try:
        meta = json.loads(Path(prefix + ".json").read_text())
    except (OSError, ValueError):
        return None
    formats = meta.get("formats") if isinstance(meta, dict) else None
    return [f for f in formats if isinstance(f, str)] if isinstance(formats, list) else None


def check_format(fmt: str) -> Layout:
    """The layout of a bootable format name; InvalidArgument (exit 2) naming why another is not."""
    if fmt in NOT_BOOTABLE:
        raise InvalidArgument(f"--format {fmt}: not bootable ({NOT_BOOTABLE[fmt]}); "
                              f"bootable: {', '.join(LAYOUTS)}")
    if fmt not in LAYOUTS:
        raise InvalidArgument(f"--format {fmt!r}: unknown; bootable: {', '.join(LAYOUTS)}")
    return LAYOUTS[fmt]


def find(name: str | Path, fmt: str | None = None) -> Output:
    """The output of build ``name`` (a path prefix like ``out/minimal``) to boot: format ``fmt``,
    else the first bootable format it has (see the module docstring)."""
    prefix = str(name)
    if fmt is not None:
        out = Output(prefix, check_format(fmt))
        missing = out.missing()
        if missing:
            raise InvalidArgument(f"{prefix}: no {fmt} build here (missing {', '.join(map(str, missing))}); "
                                  f"build one with: mobykit build -f {fmt}")
        return out
    recorded = _recorded_formats(prefix)
    for layout in LAYOUTS.values():
        if recorded is not None and layout.format not in recorded:
            continue
        out = Output(prefix, layout)
        if not out.missing():
            return out
    if recorded is None:
        kernel = Output(prefix, LAYOUTS["kernel+initrd"])
        what = f"missing {', '.join(map(str, kernel.files))} and every other bootable format's files"
    elif bootable := [f for f in recorded if f in LAYOUTS]:
        what = f"files missing for {', '.join(bootable)}, the bootable formats {prefix}.json lists"
    else:
        what = f"{prefix}.json lists no bootable format: {', '.join(recorded) or 'none'}"
    raise NotFound(f"{prefix}: no bootable build here ({what}); build one with: mobykit build -f kernel+initrd")
