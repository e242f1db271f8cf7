"""Parallel gzip that writes one ordinary gzip member (see ``ParallelGzip``)."""

from __future__ import annotations

import os
import struct
import zlib
from collections import deque
from typing import BinaryIO

GZIP_LEVEL = 6


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
