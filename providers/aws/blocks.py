"""A raw disk as EBS snapshot blocks: 512 KiB each, all-zero ones skipped, uploaded in parallel.

Why the EBS direct APIs: they need no S3 bucket and no ``vmimport`` service role (what
ImportSnapshot needs), and write the snapshot directly. The real service takes exactly 512 KiB
blocks, each with its base64 SHA256 checksum, and CompleteSnapshot wants the number of blocks
written. A snapshot starts all zeros, so a zero block is never sent: our disks are sparse (a
1 GiB ``aws`` image holds a few MiB of data), and holes are found with SEEK_DATA/SEEK_HOLE
without reading them.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BLOCK = 512 * 1024
GIB = 1 << 30
PARALLEL = 32  # PutSnapshotBlock calls in flight (each one block in memory)
_ZERO = bytes(BLOCK)


@dataclass(frozen=True)
class Block:
    index: int
    data: bytes

    @property
    def checksum(self) -> str:
        return base64.b64encode(hashlib.sha256(self.data).digest()).decode()


def volume_gib(path: Path) -> int:
    """The snapshot's size: the disk rounded up to whole GiB (EBS volumes are sized in GiB)."""
    return max(1, -(-path.stat().st_size // GIB))


def _data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of the parts of the file that may hold data; the whole file without SEEK_DATA."""
    if not hasattr(os, "SEEK_DATA"):
        yield 0, size
        return
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole remains
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, min(end, size)
        pos = end


def nonzero_blocks(path: Path) -> Iterator[Block]:
    """The disk's 512 KiB blocks that are not all zeros, in index order (the last one zero-padded)."""
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        last = -1
        for start, end in _data_ranges(fd, size):
            first = max(start // BLOCK, last + 1)
            for index in range(first, -(-end // BLOCK)):
                data = os.pread(fd, BLOCK, index * BLOCK)
                last = index
                if len(data) < BLOCK:
                    data = data + bytes(BLOCK - len(data))
                if data != _ZERO:
                    yield Block(index, data)


def upload(put: Callable[[Block], Any], blocks: Iterator[Block], parallel: int = PARALLEL) -> int:
    """Call ``put`` for every block, ``parallel`` at a time (bounded: at most that many blocks are
    read ahead); returns how many were written. The first failure stops the upload and is raised."""
    if parallel <= 1:
        count = 0
        for b in blocks:
            put(b)
            count += 1
        return count
    count = 0
    lock = threading.Lock()
    with ThreadPoolExecutor(parallel, thread_name_prefix="ebs-put") as pool:
        pending: set[Future] = set()
        try:
            for b in blocks:
                if len(pending) >= parallel:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        f.result()
                pending.add(pool.submit(put, b))
                with lock:
                    count += 1
            for f in pending:
                f.result()
        except BaseException:
            for f in pending:
                f.cancel()
            raise
    return count
