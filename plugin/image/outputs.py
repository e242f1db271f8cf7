"""Output formats over the canonical tar, in the shape of LinuxKit's ``moby/output.go``: one
function per format name, each reading ``NAME.tar``'s canonical bytes and writing its files into
the staging directory. Every file is written under a temporary name and renamed only when the
whole format has succeeded, so a failed build leaves nothing half-written behind.

``kernel+initrd`` splits the tar as LinuxKit's ``tarToInitrd`` does: ``boot/kernel`` ->
``NAME-kernel``, ``boot/cmdline`` -> ``NAME-cmdline``, ``boot/ucode.cpio`` (if any) goes first
and uncompressed in ``NAME-initrd.img`` (the kernel loads early microcode only from an
uncompressed cpio at the start), everything else under ``boot/`` is left out, and every other
entry becomes a gzip-compressed cpio newc appended after it, plus ``etc/mobykit/image-id``.
"""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from mobykit.errors import BuildError
from mobykit.image.tree import Tree

FORMATS: dict[str, Callable[[OutputContext], list[Path]]] = {}
GZIP_LEVEL = 6
IMAGE_ID_PATH = "etc/mobykit/image-id"


@dataclass
class OutputContext:
    name: str
    outdir: Path  # the staging directory the build renames from
    tar_path: Path  # the canonical tar
    image_id: str  # "sha256:<hex>" of the canonical tar
    mtime: int  # the one timestamp of every output
    # The Tree the canonical tar was written from, when the build still holds it: the same entries
    # as the tar, so a format may use a copy of it instead of parsing the tar again.
    tree: Tree | None = None

    def canonical_tree(self) -> Tree:
        """A Tree of the canonical tar that the caller may change."""
        from mobykit.image.tree import read_tar

        return self.tree.copy() if self.tree is not None else read_tar(self.tar_path)


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


class ParallelGzip:
    """gzip -6 on every core, pigz's way: the stream is cut into fixed 1 MiB blocks, each block is
    deflated in a worker thread (zlib releases the GIL) with the previous block's last 32 KiB as
    its dictionary and ends on a sync flush, and the pieces are concatenated into ONE gzip member
    with the CRC of the whole stream. gunzip, the kernel and ``gzip -t`` see an ordinary gzip file.

    Why by hand: the initrd's compression is the bulk of a cold build, stdlib GzipFile uses one
    core, and the PyPI parallel gzip writers either write one member per block with per-block
    headers or bring in another compressor library (and with it other bytes). Output depends only
    on the input, the block size and zlib, so it is reproducible; the header is fixed (mtime 0,
    no file name, OS "unknown")."""

    BLOCK = 1 << 20
    WINDOW = 32 * 1024

    def __init__(self, raw: BinaryIO, level: int = GZIP_LEVEL, workers: int | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.raw, self.level = raw, level
        self.workers = workers or max(1, min(4, os.cpu_count() or 1))
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="initrd-gzip")
        self.pending: deque = deque()
        self.buf = bytearray()
        self.last = b""  # the tail of the previous block: the next block's dictionary
        self.crc = 0
        self.size = 0
        raw.write(b"\x1f\x8b\x08\x00" + b"\x00\x00\x00\x00" + b"\x00\xff")

    def _deflate(self, block: bytes, zdict: bytes, final: bool) -> bytes:
        if zdict:
            c = zlib.compressobj(self.level, zlib.DEFLATED, -zlib.MAX_WBITS, 8, zlib.Z_DEFAULT_STRATEGY, zdict)
        else:
            c = zlib.compressobj(self.level, zlib.DEFLATED, -zlib.MAX_WBITS)
        return c.compress(block) + c.flush(zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH)

    def _submit(self, block: bytes, final: bool) -> None:
        self.crc = zlib.crc32(block, self.crc)
        self.size += len(block)
        self.pending.append(self.pool.submit(self._deflate, block, self.last, final))
        self.last = block[-self.WINDOW:]
        while len(self.pending) > 2 * self.workers:  # bounded memory; results kept in order
            self.raw.write(self.pending.popleft().result())

    def write(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= self.BLOCK:
            block = bytes(self.buf[: self.BLOCK])
            del self.buf[: self.BLOCK]
            self._submit(block, final=False)

    def close(self) -> None:
        self._submit(bytes(self.buf), final=True)
        self.buf.clear()
        while self.pending:
            self.raw.write(self.pending.popleft().result())
        self.raw.write(struct.pack("<II", self.crc & 0xFFFFFFFF, self.size & 0xFFFFFFFF))
        self.pool.shutdown()

    def abort(self) -> None:
        for f in self.pending:
            f.cancel()
        self.pool.shutdown(wait=True)


def _copy_content(entry, out: BinaryIO) -> None:
    for chunk in entry.source.chunks() if entry.source is not None else ():
        out.write(chunk)


@register("kernel+initrd")
def output_kernel_initrd(ctx: OutputContext) -> list[Path]:
    """``NAME-kernel``, ``NAME-initrd.img``, ``NAME-cmdline`` (see the module docstring)."""
    from mobykit.image.cpio import write_newc

    tree = ctx.canonical_tree()

    def file_at(path: str):
        """The file at ``path``, through a hard link (its content may sit on another path)."""
        entry = tree.get(path)
        if entry is not None and entry.type == "hardlink":
            entry = tree.get(entry.linkname)
        return entry if entry is not None and entry.type == "file" else None

    kernel = file_at("boot/kernel")
    if kernel is None:
        raise BuildError(f"{ctx.tar_path}: no boot/kernel file, so there is no kernel for kernel+initrd (is 'kernel:' set in the spec?)")
    cmdline = file_at("boot/cmdline")
    ucode = file_at("boot/ucode.cpio")
    # LinuxKit keeps nothing under boot/ in the initrd; Tree.remove hands the contents of any file
    # there to a hard link outside boot/, so no link in the cpio points into the removed part.
    tree.remove("boot")
    # The image knows its own id (the init's readiness line carries it). It cannot be inside the
    # canonical tar, whose hash the id is, so each bootable format adds it beside the tree.
    tree.add_bytes(IMAGE_ID_PATH, (ctx.image_id + "\n").encode(), mode=0o444)

    staged = _Staged(ctx.outdir)
    try:
        with open(staged.path(f"{ctx.name}-kernel"), "wb") as out:
            _copy_content(kernel, out)
        with open(staged.path(f"{ctx.name}-initrd.img"), "wb") as out:
            if ucode is not None:
                _copy_content(ucode, out)
            gz = ParallelGzip(out)
            try:
                write_newc(tree, gz, ctx.mtime)
            except BaseException:
                gz.abort()
                raise
            gz.close()
        with open(staged.path(f"{ctx.name}-cmdline"), "wb") as out:
            if cmdline is not None:
                _copy_content(cmdline, out)
        return staged.commit()
    except BaseException:
        staged.discard()
        raise
