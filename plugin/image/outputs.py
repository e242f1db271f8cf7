"""Output formats over the canonical tar, in the shape of LinuxKit's ``moby/output.go``: one
function per format name, each reading ``NAME.tar``'s canonical bytes and writing its files into
the staging directory. Every file is written under a temporary name and renamed only when the
whole format has succeeded, so a failed build leaves nothing half-written behind.

``kernel+initrd`` splits the tar as LinuxKit's ``tarToInitrd`` does: ``boot/kernel`` ->
``NAME-kernel``, ``boot/cmdline`` -> ``NAME-cmdline``, ``boot/ucode.cpio`` (if any) goes first
and uncompressed in ``NAME-initrd.img`` (the kernel loads early microcode only from an
uncompressed cpio at the start), everything else under ``boot/`` is left out, and every other
entry becomes a gzip-compressed cpio newc appended after it.
"""

from __future__ import annotations

import gzip
import os
import queue
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from mobykit.errors import BuildError

FORMATS: dict[str, Callable[[OutputContext], list[Path]]] = {}
GZIP_LEVEL = 6


@dataclass
class OutputContext:
    name: str
    outdir: Path  # the staging directory the build renames from
    tar_path: Path  # the canonical tar
    image_id: str  # "sha256:<hex>" of the canonical tar
    mtime: int  # the one timestamp of every output


def register(name: str) -> Callable[[Callable[[OutputContext], list[Path]]], Callable[[OutputContext], list[Path]]]:
    def deco(fn: Callable[[OutputContext], list[Path]]) -> Callable[[OutputContext], list[Path]]:
        FORMATS[name] = fn
        return fn

    return deco


class _Staged:
    """Files written under ``.NAME.tmp`` and renamed together by ``commit``; removed on failure."""

    def __init__(self, outdir: Path):
        self.outdir = Path(outdir)
        self.files: list[tuple[Path, Path]] = []

    def path(self, name: str) -> Path:
        final = self.outdir / name
        tmp = self.outdir / f".{name}.tmp"
        self.files.append((tmp, final))
        return tmp

    def commit(self) -> list[Path]:
        for tmp, final in self.files:
            os.replace(tmp, final)
        return [final for _, final in self.files]

    def discard(self) -> None:
        for tmp, _ in self.files:
            tmp.unlink(missing_ok=True)


@register("tar")
def output_tar(ctx: OutputContext) -> list[Path]:
    """``NAME.tar``: the canonical tar itself (a hard link when it is on the same filesystem)."""
    staged = _Staged(ctx.outdir)
    tmp = staged.path(f"{ctx.name}.tar")
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(ctx.tar_path, tmp)
        except OSError:
            shutil.copyfile(ctx.tar_path, tmp)
        return staged.commit()
    except BaseException:
        staged.discard()
        raise


class _ThreadedGzip:
    """gzip in a worker thread: zlib releases the GIL while it compresses, so the cpio writer
    (reading file contents, formatting headers) and the compressor run on both cores. Fixed
    header (mtime 0, no file name) so the output is reproducible."""

    def __init__(self, raw: BinaryIO, level: int = GZIP_LEVEL):
        self.gz = gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=level, mtime=0)
        self.q: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="initrd-gzip", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (data := self.q.get()) is not None:
            if self.error is None:
                try:
                    self.gz.write(data)
                except BaseException as e:  # reported to the writer thread
                    self.error = e

    def write(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(data)

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        self.gz.close()

    def abort(self) -> None:
        self.error = self.error or BuildError("aborted")
        self.q.put(None)
        self.thread.join()


def _copy_content(entry, out: BinaryIO) -> None:
    for chunk in entry.source.chunks() if entry.source is not None else ():
        out.write(chunk)


@register("kernel+initrd")
def output_kernel_initrd(ctx: OutputContext) -> list[Path]:
    """``NAME-kernel``, ``NAME-initrd.img``, ``NAME-cmdline`` (see the module docstring)."""
    from mobykit.image.cpio import write_newc
    from mobykit.image.tree import read_tar

    tree = read_tar(ctx.tar_path)
    kernel = tree.get("boot/kernel")
    if kernel is None or kernel.type != "file":
        raise BuildError(f"{ctx.tar_path}: no boot/kernel file, so there is no kernel for kernel+initrd (is 'kernel:' set in the spec?)")
    cmdline = tree.get("boot/cmdline")
    ucode = tree.get("boot/ucode.cpio")
    # LinuxKit keeps nothing under boot/ in the initrd; Tree.remove hands the contents of any file
    # there to a hard link outside boot/, so no link in the cpio points into the removed part.
    tree.remove("boot")

    staged = _Staged(ctx.outdir)
    try:
        with open(staged.path(f"{ctx.name}-kernel"), "wb") as out:
            _copy_content(kernel, out)
        with open(staged.path(f"{ctx.name}-initrd.img"), "wb") as out:
            if ucode is not None and ucode.type == "file":
                _copy_content(ucode, out)
            gz = _ThreadedGzip(out)
            try:
                write_newc(tree, gz, ctx.mtime)
            except BaseException:
                gz.abort()
                raise
            gz.close()
        with open(staged.path(f"{ctx.name}-cmdline"), "wb") as out:
            if cmdline is not None and cmdline.type == "file":
                _copy_content(cmdline, out)
        return staged.commit()
    except BaseException:
        staged.discard()
        raise
