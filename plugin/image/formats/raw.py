"""``raw-bios`` (``NAME-bios.img``) and ``raw-efi`` (``NAME-efi.img``): bootable raw disks, and the
one place every disk format of a build gets its raw disk from (``disk``).

``raw-bios`` is an MBR disk with one active FAT partition booted by syslinux; ``raw-efi`` a GPT
disk with one EFI system partition booted by GRUB (layouts in ``mobykit.image.disk.bootdisk``).
Both start from the build's kernel, initrd and command line (``boot_files``); the root file
system is the initrd, so no ``root=`` is added. ``--size`` sets the disk size (default: the
smallest whole MiB that fits).

Sharing: a build makes each (firmware, size) disk once, in its scratch space; raw outputs link it,
the qcow2/vhd/vmdk formats convert it and aws/gcp (whole GiB) package it.
"""

from __future__ import annotations

from pathlib import Path

from mobykit.errors import InvalidArgument
from mobykit.image.disk import bootdisk, sparse
from mobykit.image.disk.bootdisk import BootDisk, Firmware
from mobykit.image.disk.partition import GIB, MIB, disk_size
from mobykit.image.formats.initrd import boot_files
from mobykit.image.outputs import OutputContext, Staged, register


def boot_disk(ctx: OutputContext, firmware: Firmware) -> BootDisk:
    """The partition contents for ``firmware`` (boot loader made once per build)."""
    key = f"bootdisk:{firmware}"
    if key not in ctx.shared:
        boot = boot_files(ctx)
        ctx.shared[key] = bootdisk.contents(firmware, kernel=boot.kernel, initrd=boot.initrd, cmdline=boot.cmdline,
                                            image_id=ctx.image_id, mtime=ctx.mtime,
                                            work=ctx.scratch(f"bootdisk-{firmware}"))
    return ctx.shared[key]


def disk(ctx: OutputContext, firmware: Firmware, *, fmt: str, whole_gib: bool = False) -> Path:
    """The raw disk image for ``firmware`` at the size ``fmt`` gets from ``--size``: whole MiB,
    or for cloud formats whole GiB (at least 1 GiB). Made once per build and size; the caller
    must not change the file (other formats link or read it)."""
    content = boot_disk(ctx, firmware)
    unit = GIB if whole_gib else MIB
    size = disk_size(content.min_size(), ctx.size, fmt=fmt, unit=unit, default=GIB if whole_gib else 0,
                     maximum=bootdisk.MAX_SIZE)
    key = f"disk:{firmware}:{size}"
    if key not in ctx.shared:
        path = ctx.scratch(f"disk-{firmware}") / f"{firmware}.img"
        ctx.shared[key] = content.write(path, size)
    return ctx.shared[key]


def claim(ctx: OutputContext, fmt: str, filename: str) -> None:
    """Refuse two formats of one build writing the same file (LinuxKit names both ``vhd`` and
    ``dynamic-vhd`` ``NAME.vhd``): the second would silently replace the first."""
    owners: dict[str, str] = ctx.shared.setdefault("disk-files", {})
    other = owners.setdefault(filename, fmt)
    if other != fmt:
        raise InvalidArgument(f"formats {other} and {fmt} both write {filename} (LinuxKit's file name for each); "
                              f"build them separately, with different --name values")


def publish(ctx: OutputContext, src: Path, filename: str) -> list[Path]:
    """Put the shared disk ``src`` in the outputs as ``filename``: a hard link the first time, a
    sparse copy after that, so no two outputs are one file (booting one writable would change
    the other, e.g. ``NAME-bios.img`` and aws's ``NAME.raw`` with ``--size 1G``)."""
    published: set[Path] = ctx.shared.setdefault("disk-published", set())
    with Staged(ctx.outdir) as staged:
        out = staged.path(filename)
        if src in published:
            sparse.copy(src, out)
        else:
            sparse.link_or_copy(src, out)
            published.add(src)
        return staged.commit()


@register("raw-bios")
def output_raw_bios(ctx: OutputContext) -> list[Path]:
    """``NAME-bios.img``: MBR, one active FAT partition, syslinux (see the module docstring)."""
    return publish(ctx, disk(ctx, "bios", fmt="raw-bios"), f"{ctx.name}-bios.img")


@register("raw-efi")
def output_raw_efi(ctx: OutputContext) -> list[Path]:
    """``NAME-efi.img``: GPT, one EFI system partition, GRUB as BOOTX64.EFI."""
    return publish(ctx, disk(ctx, "efi", fmt="raw-efi"), f"{ctx.name}-efi.img")
