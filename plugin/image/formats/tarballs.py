"""The tar formats besides ``tar`` itself, with LinuxKit's names and file names:

- ``tar-kernel-initrd`` -> ``NAME-initrd.tar``: ``kernel``, ``initrd.img``, ``cmdline`` and, when
  the kernel image has early microcode, ``ucode.cpio``, in that order, each 0644 root:root with
  the build's timestamp - LinuxKit's members exactly (the microcode is its own member, so
  ``initrd.img`` here is the initrd without it; an empty command line has no member, as there).
- ``docker`` -> ``NAME.docker``: the image's whole tree, ``boot/`` included, plus a ``Dockerfile``
  (``FROM scratch``, ``COPY . ./``, ``ENTRYPOINT ["/init"]``): a context ``docker build -`` takes,
  and a root file system ``docker import`` takes, every path once. LinuxKit's entry point is its
  init ``/bin/rc.init``; ours is ``/init``. A spec that ships its own ``/Dockerfile`` keeps it.
  Like every format the image can boot from, it carries ``etc/mobykit/image-id``.

Both are written from entries with the canonical tar's fixed metadata (``tree.tar_header``), so
they are byte-reproducible.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import BinaryIO

from mobykit.image.disk.rootfs import file_entry
from mobykit.image.formats.initrd import boot_files
from mobykit.image.outputs import IMAGE_ID_PATH, OutputContext, Staged, register
from mobykit.image.tree import Entry, tar_header, write_tar

DOCKERFILE = 'FROM scratch\nCOPY . ./\nENTRYPOINT ["/init"]\n'
CHUNK = 1 << 20


def _member(out: BinaryIO, name: str, size: int, mtime: int) -> None:
    out.write(tar_header(Entry(path=name, type="file", mode=0o644, size=size), mtime))


def _copy(out: BinaryIO, source: Path, skip: int = 0) -> int:
    """Copy ``source`` from byte ``skip`` on; pad to a whole tar block; return the bytes copied."""
    n = 0
    with open(source, "rb") as f:
        f.seek(skip)
        while data := f.read(CHUNK):
            out.write(data)
            n += len(data)
    out.write(bytes(-n % tarfile.BLOCKSIZE))
    return n


@register("tar-kernel-initrd")
def output_tar_kernel_initrd(ctx: OutputContext) -> list[Path]:
    """``NAME-initrd.tar`` (see the module docstring)."""
    boot = boot_files(ctx)
    ucode = file_entry(ctx.canonical_tree(), "boot/ucode.cpio")
    ucode_size = ucode.size if ucode is not None else 0
    with Staged(ctx.outdir) as staged:
        with open(staged.path(f"{ctx.name}-initrd.tar"), "wb") as out:
            _member(out, "kernel", boot.kernel.stat().st_size, ctx.mtime)
            _copy(out, boot.kernel)
            _member(out, "initrd.img", boot.initrd.stat().st_size - ucode_size, ctx.mtime)
            _copy(out, boot.initrd, skip=ucode_size)
            if boot.cmdline_bytes:
                _member(out, "cmdline", len(boot.cmdline_bytes), ctx.mtime)
                out.write(boot.cmdline_bytes + bytes(-len(boot.cmdline_bytes) % tarfile.BLOCKSIZE))
            if ucode_size:
                _member(out, "ucode.cpio", ucode_size, ctx.mtime)
                with open(boot.initrd, "rb") as f:
                    data = f.read(ucode_size)
                out.write(data + bytes(-ucode_size % tarfile.BLOCKSIZE))
            out.write(bytes(2 * tarfile.BLOCKSIZE))
        return staged.commit()


@register("docker")
def output_docker(ctx: OutputContext) -> list[Path]:
    """``NAME.docker`` (see the module docstring)."""
    tree = ctx.canonical_tree()
    if "Dockerfile" not in tree:
        tree.add_bytes("Dockerfile", DOCKERFILE.encode())
    tree.add_bytes(IMAGE_ID_PATH, (ctx.image_id + "\n").encode(), mode=0o444)
    with Staged(ctx.outdir) as staged:
        with open(staged.path(f"{ctx.name}.docker"), "wb") as out:
            write_tar(tree, out, ctx.mtime)
        return staged.commit()
