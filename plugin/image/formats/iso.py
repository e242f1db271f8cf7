"""The ISO formats, with LinuxKit's names and file names:

- ``iso-bios`` -> ``NAME.iso``: ISOLINUX boots ``/boot/kernel`` with ``/boot/initrd.img`` (the
  whole root file system, as ``kernel+initrd`` makes it) and the spec's command line unchanged.
  A hybrid MBR makes the same file bootable from a disk or USB stick (LinuxKit runs isohybrid).
- ``iso-efi`` -> ``NAME-efi.iso``: GRUB (El Torito EFI image) boots ``/boot/kernel``; the root file
  system is the ISO itself, as in LinuxKit, and the command line gets ``root=/dev/sr0`` unless it
  has a ``root=`` (LinuxKit's rule). Where we differ: LinuxKit boots with no initrd (its kernels
  have the CD-ROM and isofs drivers built in); Debian's kernel has them as modules, so
  ``/boot/initrd.img`` is the small root loader of ``disk.rootfs`` (the image's busybox and
  modules), which mounts the ISO under a tmpfs overlay and starts the image's ``/init``.
- ``iso-efi-initrd`` -> ``NAME-efi-initrd.iso``: GRUB boots the kernel with the whole initrd, as
  ``iso-bios`` does with ISOLINUX; the command line is unchanged.

Every ISO: volume id ``MOBYKIT_<image id hex>``, dates from the build's timestamp, GRUB finds its
ISO by a marker file named after the image and the format (``/boot/mobykit-<id>-<format>``), so
another mobykit ISO in the same machine is never booted by mistake. Boot files are in ``/boot``
(LinuxKit puts them at the ISO root or in ``/boot``, depending on the format and version).
"""

from __future__ import annotations

from pathlib import Path

from mobykit.image.disk import fat, grub, ids, isolinux
from mobykit.image.disk.iso9660 import Staging, volume_id, write_iso
from mobykit.image.disk.rootfs import loader_initrd, root_tree
from mobykit.image.formats.initrd import boot_files
from mobykit.image.outputs import OutputContext, Staged, register

KERNEL = "/boot/kernel"
INITRD = "/boot/initrd.img"
EFI_IMAGE = "boot/efiboot.img"
CATALOG = "boot/boot.catalog"
ROOT_DEVICE = "root=/dev/sr0"  # the first CD-ROM, as LinuxKit's iso-efi assumes


def _marker(ctx: OutputContext, fmt: str) -> str:
    return f"/boot/mobykit-{ids.short_hex(ctx.image_id)}-{fmt}"


def _efi_image(ctx: OutputContext, where: Path, cmdline: str, marker: str) -> Path:
    """The El Torito EFI boot image: a FAT image holding GRUB as ``EFI/BOOT/BOOTX64.EFI``, its
    config embedded (boot ``/boot/kernel`` + ``/boot/initrd.img`` of the ISO holding ``marker``)."""
    loader = grub.efi_loader(where / "BOOTX64.EFI", grub.config(cmdline, marker=marker, kernel=KERNEL, initrd=INITRD),
                             mtime=ctx.mtime)
    return fat.make_image(where / "efiboot.img", {"EFI/BOOT/BOOTX64.EFI": loader}, label="EFIBOOT",
                          serial=ids.serial32(ctx.image_id, "iso-efi-fat"), mtime=ctx.mtime)


def _write_efi_iso(ctx: OutputContext, staging: Staging, out: Path, cmdline: str, fmt: str) -> None:
    marker = _marker(ctx, fmt)
    staging.add_bytes(marker, b"")
    staging.add_file(f"/{EFI_IMAGE}", _efi_image(ctx, staging.root.parent, cmdline, marker))
    guid = ids.uuid_for(ctx.image_id, f"{fmt}-gpt").hex
    write_iso(out, staging, volid=volume_id("MOBYKIT", ctx.image_id), mtime=ctx.mtime,
              mkisofs=["-e", EFI_IMAGE, "-no-emul-boot", "-c", CATALOG, "-hide", EFI_IMAGE,
                       # the EFI image is also a GPT partition, so the ISO boots from a disk too
                       "-efi-boot-part", "--efi-boot-image"],
              native=["-boot_image", "any", "cat_hidden=on", "-boot_image", "any", f"gpt_disk_guid={guid}"])


def _staged_output(ctx: OutputContext, filename: str, fill) -> list[Path]:
    """Run ``fill(staging, out)`` to write ``filename`` and commit it (or leave nothing)."""
    with Staged(ctx.outdir) as staged:
        work = ctx.scratch(filename)
        fill(Staging(work / "iso"), staged.path(filename))
        return staged.commit()


@register("iso-bios")
def output_iso_bios(ctx: OutputContext) -> list[Path]:
    """``NAME.iso`` (see the module docstring)."""
    boot = boot_files(ctx)

    def fill(staging: Staging, out: Path) -> None:
        staging.add_file(KERNEL, boot.kernel)
        staging.add_file(INITRD, boot.initrd)
        for name, source in isolinux.files().items():
            staging.add_file(f"/isolinux/{name}", source)
        staging.add_bytes("/isolinux/isolinux.cfg", isolinux.config(boot.cmdline, kernel=KERNEL, initrd=INITRD).encode())
        write_iso(out, staging, volid=volume_id("MOBYKIT", ctx.image_id), mtime=ctx.mtime,
                  mkisofs=["-b", "isolinux/isolinux.bin", "-c", "isolinux/boot.cat", "-no-emul-boot",
                           "-boot-load-size", "4", "-boot-info-table", "-isohybrid-mbr", str(isolinux.hybrid_mbr())])

    return _staged_output(ctx, f"{ctx.name}.iso", fill)


@register("iso-efi")
def output_iso_efi(ctx: OutputContext) -> list[Path]:
    """``NAME-efi.iso`` (see the module docstring)."""
    boot = boot_files(ctx)
    has_root = any(arg.startswith("root=") for arg in boot.cmdline.split())
    cmdline = boot.cmdline if has_root else f"{boot.cmdline} {ROOT_DEVICE}".strip()

    def fill(staging: Staging, out: Path) -> None:
        staging.add_entries(root_tree(ctx))
        staging.add_file(KERNEL, boot.kernel)
        staging.add_file(INITRD, loader_initrd(ctx))
        _write_efi_iso(ctx, staging, out, cmdline, "efi")

    return _staged_output(ctx, f"{ctx.name}-efi.iso", fill)


@register("iso-efi-initrd")
def output_iso_efi_initrd(ctx: OutputContext) -> list[Path]:
    """``NAME-efi-initrd.iso`` (see the module docstring)."""
    boot = boot_files(ctx)

    def fill(staging: Staging, out: Path) -> None:
        staging.add_file(KERNEL, boot.kernel)
        staging.add_file(INITRD, boot.initrd)
        _write_efi_iso(ctx, staging, out, boot.cmdline, "efi-initrd")

    return _staged_output(ctx, f"{ctx.name}-efi-initrd.iso", fill)
