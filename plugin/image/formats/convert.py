"""Disk formats converted from the build's raw disk with ``qemu-img convert`` (qemu-utils):
``qcow2-bios`` (``NAME.qcow2``), ``qcow2-efi`` (``NAME-efi.qcow2``), ``vhd`` (fixed, ``NAME.vhd``),
``dynamic-vhd`` (``NAME.vhd`` too, as in LinuxKit) and ``vmdk`` (streamOptimized, ``NAME.vmdk``).

The raw disk is the one ``raw-bios``/``raw-efi`` publish (``formats.raw.disk``, made once per
build), so every format boots the same way; vhd, dynamic-vhd and vmdk are BIOS disks, as
LinuxKit's are (Hyper-V generation 1 and Azure, VMware's default firmware).

Reproducible: qemu-img's qcow2 output depends only on its input; its VHD footers carry the time
and a random id and its VMDK descriptor a random CID and the output's file name, which
``disk.vhd`` and ``disk.vmdk`` rewrite from the image id and the build's time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from mobykit.errors import InvalidArgument
from mobykit.image.disk import ids, tools, vhd, vmdk
from mobykit.image.disk.bootdisk import Firmware
from mobykit.image.formats.raw import claim, disk
from mobykit.image.outputs import OutputContext, Staged, register


def convert(ctx: OutputContext, fmt: str, firmware: Firmware, filename: str, qemu_format: str,
            options: Sequence[str] = (), fixup: Callable[[Path, int], None] | None = None) -> list[Path]:
    """Convert the build's raw ``firmware`` disk to ``qemu_format`` as the output ``filename``,
    then apply ``fixup`` to the written file (given with the disk's virtual size)."""
    claim(ctx, fmt, filename)
    raw = disk(ctx, firmware, fmt=fmt)
    with Staged(ctx.outdir) as staged:
        out = staged.path(filename)
        out.unlink(missing_ok=True)
        opts = ["-o", ",".join(options)] if options else []
        tools.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", qemu_format, *opts, str(raw), str(out)],
                  mtime=ctx.mtime)
        if fixup is not None:
            fixup(out, raw.stat().st_size)
        return staged.commit()


def _vhd(ctx: OutputContext, fmt: str, subformat: str) -> list[Path]:
    # force_size: the footer records the raw disk's exact size, not one rounded to a CHS geometry
    # (Azure needs whole MiB, which our disks are).
    return convert(ctx, fmt, "bios", f"{ctx.name}.vhd", "vpc", (f"subformat={subformat}", "force_size=on"),
                   lambda path, size: vhd.fix(path, mtime=ctx.mtime, unique_id=ids.uuid_for(ctx.image_id, f"{fmt}:{size}")))


@register("qcow2-bios")
def output_qcow2_bios(ctx: OutputContext) -> list[Path]:
    """``NAME.qcow2``: the raw-bios disk as qcow2."""
    return convert(ctx, "qcow2-bios", "bios", f"{ctx.name}.qcow2", "qcow2")


@register("qcow2-efi")
def output_qcow2_efi(ctx: OutputContext) -> list[Path]:
    """``NAME-efi.qcow2``: the raw-efi disk as qcow2."""
    return convert(ctx, "qcow2-efi", "efi", f"{ctx.name}-efi.qcow2", "qcow2")


@register("vhd")
def output_vhd(ctx: OutputContext) -> list[Path]:
    """``NAME.vhd``: the raw-bios disk as a fixed VHD (the raw disk and a 512-byte footer)."""
    return _vhd(ctx, "vhd", "fixed")


@register("dynamic-vhd")
def output_dynamic_vhd(ctx: OutputContext) -> list[Path]:
    """``NAME.vhd``: the raw-bios disk as a dynamic (sparse) VHD."""
    return _vhd(ctx, "dynamic-vhd", "dynamic")


@register("vmdk")
def output_vmdk(ctx: OutputContext) -> list[Path]:
    """``NAME.vmdk``: the raw-bios disk as a streamOptimized VMDK (compressed grains; what vSphere
    and OVAs import)."""
    filename = f"{ctx.name}.vmdk"
    if '"' in filename:
        raise InvalidArgument(f"--name {ctx.name!r}: a vmdk names its own file in quotes, so the name cannot hold '\"'")
    return convert(ctx, "vmdk", "bios", filename, "vmdk", ("subformat=streamOptimized",),
                   lambda path, size: vmdk.fix(path, cid=ids.serial32(ctx.image_id, f"vmdk:{size}"), extent_name=filename))
