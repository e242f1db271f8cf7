"""Where a disk image holds data, decided by its bytes, and copies that write only that data.

Why by content and not by the file system's holes alone: a disk image is mostly zeros (a 1 GiB
cloud disk holds some tens of MiB), and whether those zeros are holes depends on how the file
was written and on the file system it sits on. Deciding by content (``SEEK_DATA``/``SEEK_HOLE``
only to skip what is certainly zero) gives the same extents everywhere, so the GNU sparse map of
the gcp tar is byte-reproducible, and copies stay sparse on any file system.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

BLOCK = 4096  # the unit of zero detection: file system blocks, so copies punch whole-block holes
CHUNK = 1 << 20  # how much is read at a time


def _allocated(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) ranges that may hold data; everything between them reads as zeros."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # nothing but a hole up to the end
                return
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no hole support: read it all
                yield pos, size
                return
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        pos = end


def data_extents(path: Path, block: int = BLOCK) -> list[tuple[int, int]]:
    """Sorted, disjoint (offset, length) runs of ``block``-aligned blocks that are not all zero
    (the last block may be short). Depends only on the file's bytes."""
    zero = bytes(CHUNK)
    extents: list[tuple[int, int]] = []

    def add(start: int, end: int) -> None:
        if extents and extents[-1][0] + extents[-1][1] == start:
            extents[-1] = (extents[-1][0], end - extents[-1][0])
        else:
            extents.append((start, end - start))

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        scanned = 0
        for start, end in _allocated(f.fileno(), size):
            # Whole blocks, so results do not depend on where the file system's holes begin and end;
            # never a block twice, should two ranges share one.
            pos = max(start - start % block, scanned)
            end = scanned = min(size, -(-end // block) * block)
            f.seek(pos)
            while pos < end:
                chunk = f.read(min(CHUNK, end - pos))
                if not chunk:
                    break
                if chunk != zero[: len(chunk)]:
                    for i in range(0, len(chunk), block):
                        piece = chunk[i:i + block]
                        if piece.count(0) != len(piece):
                            add(pos + i, pos + i + len(piece))
                pos += len(chunk)
    return extents


def copy_into(src: Path, dst: Path, offset: int = 0) -> None:
    """Write the data of ``src`` into the existing file ``dst`` at ``offset``. The range it
    covers in ``dst`` must read as zeros already (a fresh, truncated file): zeros are skipped."""
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        for start, length in data_extents(src):
            fin.seek(start)
            fout.seek(offset + start)
            left = length
            while left:
                chunk = fin.read(min(CHUNK, left))
                if not chunk:
                    raise OSError(errno.EIO, f"{src}: shorter than while it was scanned")
                fout.write(chunk)
                left -= len(chunk)


def copy(src: Path, dst: Path) -> None:
    """A sparse copy of ``src`` at ``dst`` (same size, zeros left as holes)."""
    dst.unlink(missing_ok=True)
    with open(dst, "wb") as f:
        f.truncate(src.stat().st_size)
    copy_into(src, dst)


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src``, or a sparse copy across file systems. Disk images are
    linked from the build's scratch space, where other formats of the build convert them."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        copy(src, dst)
