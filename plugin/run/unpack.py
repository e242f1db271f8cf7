"""Boot files out of the two formats that pack them in an archive: ``tar-kernel-initrd`` and ``gcp``.

qemu cannot boot from inside a tar, so ``mobykit run qemu`` unpacks into the run's temp directory
(removed with it). Only the members the boot needs are read, by name, as regular files: nothing
in the archive chooses a path on this host.

Why holes are kept: a ``gcp`` disk is a whole number of GiB of mostly zeros (Compute Engine's
images are sized in GiB), stored sparse in the archive. Writing it back with its zero runs as holes
costs the blocks actually used, whether or not the archive marked the member sparse.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import IO

from mobykit.errors import InvalidArgument

CHUNK = 1 << 16  # the granularity of holes: a FAT, partition table or boot loader sector is data
_ZEROS = bytes(CHUNK)


def _members(tf: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    """Regular-file members by name (``./`` dropped); later members win, as tar extraction does."""
    return {m.name.removeprefix("./"): m for m in tf.getmembers() if m.isreg()}


def _copy(src: IO[bytes], dst: IO[bytes], *, sparse: bool = False) -> None:
    while chunk := src.read(CHUNK):
        if sparse and len(chunk) == CHUNK and chunk == _ZEROS:
            dst.seek(CHUNK, 1)
        else:
            dst.write(chunk)
    if sparse:
        dst.truncate()  # a file ending in a hole still has its full size


def kernel_initrd(archive: Path, scratch: Path) -> tuple[Path, Path, str]:
    """(kernel, initrd, command line) of a ``tar-kernel-initrd`` archive, written into ``scratch``.
    Its optional ``ucode.cpio`` (early microcode) goes in front of ``initrd.img``, which is how a
    boot loader given both passes them to the kernel."""
    kernel, initrd = scratch / "kernel", scratch / "initrd.img"
    with tarfile.open(archive) as tf:
        members = _members(tf)
        missing = [n for n in ("kernel", "initrd.img") if n not in members]
        if missing:
            raise InvalidArgument(f"{archive}: not a tar-kernel-initrd archive (no {', '.join(missing)} member)")
        with open(kernel, "wb") as out:
            _copy(tf.extractfile(members["kernel"]), out)  # type: ignore[arg-type]
        with open(initrd, "wb") as out:
            for name in ("ucode.cpio", "initrd.img"):
                if name in members:
                    _copy(tf.extractfile(members[name]), out)  # type: ignore[arg-type]
        cmdline = ""
        if "cmdline" in members:
            cmdline = tf.extractfile(members["cmdline"]).read().decode("utf-8", "replace").strip()  # type: ignore[union-attr]
    return kernel, initrd, cmdline


def gcp_disk(archive: Path, scratch: Path) -> Path:
    """The raw disk (``disk.raw``, Compute Engine's required name) of a ``gcp`` archive, sparse."""
    out_path = scratch / "disk.raw"
    with tarfile.open(archive, "r:*") as tf:
        # Read on in order rather than listing every member first: a compressed archive would be
        # decompressed twice to seek back to the disk.
        for member in tf:
            if member.isreg() and member.name.removeprefix("./") == "disk.raw":
                with open(out_path, "wb") as out:
                    _copy(tf.extractfile(member), out, sparse=True)  # type: ignore[arg-type]
                return out_path
    raise InvalidArgument(f"{archive}: not a gcp image archive (no disk.raw member)")
