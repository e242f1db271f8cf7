"""``kernel+initrd``, and the kernel, initrd and cmdline every bootable format starts from.

``kernel+initrd`` splits the tar as LinuxKit's ``tarToInitrd`` does: ``boot/kernel`` ->
``NAME-kernel``, ``boot/cmdline`` -> ``NAME-cmdline``, ``boot/ucode.cpio`` (if any) goes first
and uncompressed in ``NAME-initrd.img`` (the kernel loads early microcode only from an
uncompressed cpio at the start), everything else under ``boot/`` is left out, and every other
entry becomes a compressed cpio newc appended after it, plus ``etc/mobykit/image-id``.

Where we differ: LinuxKit always gzips that cpio. Here it is LZ4 (legacy frame) when the kernel's
config says it unpacks LZ4 (``kconfig.py``), else gzip: under TCG the kernel unpacks the LZ4 cpio
several tenths of a second sooner, on every boot.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from mobykit.errors import BuildError
from mobykit.image import kconfig
from mobykit.image.lz4legacy import Lz4Legacy
from mobykit.image.outputs import IMAGE_ID_PATH, OutputContext, Staged, register
from mobykit.image.pgzip import ParallelGzip


def _copy_content(entry, out: BinaryIO) -> None:
    for chunk in entry.source.chunks() if entry.source is not None else ():
        out.write(chunk)


@dataclass(frozen=True)
class BootFiles:
    """The kernel, the initrd (early microcode first, then the compressed cpio with the image id) and
    the spec's kernel command line, as files in the build's scratch space."""

    kernel: Path
    initrd: Path
    cmdline: str  # for boot loader configs: one line, as the spec wrote it
    cmdline_bytes: bytes = b""  # boot/cmdline exactly (NAME-cmdline)


def _file_at(tree, path: str):
    """The file at ``path``, through a hard link (its content may sit on another path)."""
    entry = tree.get(path)
    if entry is not None and entry.type == "hardlink":
        entry = tree.get(entry.linkname)
    return entry if entry is not None and entry.type == "file" else None


def boot_files(ctx: OutputContext) -> BootFiles:
    """Kernel, initrd and cmdline of this build, made once however many formats need them."""
    if "boot" in ctx.shared:
        return ctx.shared["boot"]

    tree = ctx.canonical_tree()
    kernel = _file_at(tree, "boot/kernel")
    if kernel is None:
        raise BuildError(f"{ctx.tar_path}: no boot/kernel file, so there is no kernel to boot (is 'kernel:' set in the spec?)")
    cmdline = _file_at(tree, "boot/cmdline")
    ucode = _file_at(tree, "boot/ucode.cpio")
    config = kconfig.config_from_tree(tree)
    if config is None and kernel.source is not None:
        config = kconfig.config_from_bzimage(b"".join(kernel.source.chunks()))
    compression = kconfig.initrd_compression(config)
    # LinuxKit keeps nothing under boot/ in the initrd; Tree.remove hands the contents of any file
    # there to a hard link outside boot/, so no link in the cpio points into the removed part.
    tree.remove("boot")
    # The image knows its own id (the init's readiness line carries it). It cannot be inside the
    # canonical tar, whose hash the id is, so each bootable format adds it beside the tree.
    tree.add_bytes(IMAGE_ID_PATH, (ctx.image_id + "\n").encode(), mode=0o444)

    where = ctx.scratch("boot")
    files = BootFiles(kernel=where / "kernel", initrd=where / "initrd.img", cmdline="")  # cmdline below
    with open(files.kernel, "wb") as out:
        _copy_content(kernel, out)
    with open(files.initrd, "wb") as out:
        if ucode is not None:
            _copy_content(ucode, out)
        write_cpio(tree, out, ctx.mtime, compression)
    text = b"".join(cmdline.source.chunks()) if cmdline is not None and cmdline.source is not None else b""
    files = BootFiles(kernel=files.kernel, initrd=files.initrd, cmdline=text.decode("utf-8", "replace").strip(),
                      cmdline_bytes=text)
    ctx.shared["boot"] = files
    return files


def write_cpio(tree, out: BinaryIO, mtime: int, compression: str = "gzip") -> None:
    """``tree`` as a compressed cpio newc (what the kernel unpacks as an initramfs) onto ``out``:
    ``gzip`` (every kernel) or ``lz4`` (the legacy frame, for a kernel with CONFIG_RD_LZ4)."""
    from mobykit.image.cpio import write_newc

    stream = Lz4Legacy(out) if compression == "lz4" else ParallelGzip(out)
    try:
        write_newc(tree, stream, mtime)
    except BaseException:
        stream.abort()
        raise
    stream.close()


def link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        dst.hardlink_to(src)
    except OSError:
        shutil.copyfile(src, dst)


@register("kernel+initrd")
def output_kernel_initrd(ctx: OutputContext) -> list[Path]:
    """``NAME-kernel``, ``NAME-initrd.img``, ``NAME-cmdline`` (see the module docstring)."""
    boot = boot_files(ctx)
    with Staged(ctx.outdir) as staged:
        link_or_copy(boot.kernel, staged.path(f"{ctx.name}-kernel"))
        link_or_copy(boot.initrd, staged.path(f"{ctx.name}-initrd.img"))
        staged.path(f"{ctx.name}-cmdline").write_bytes(boot.cmdline_bytes)
        return staged.commit()
