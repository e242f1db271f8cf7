"""The LZ4 "legacy" frame, the LZ4 format the kernel unpacks an initramfs from (``Lz4Legacy``).

Why it matters: under TCG the kernel spends ~0.3-0.5 s inflating a 5 MB gzip initrd before
``/init`` runs; the same cpio in LZ4 unpacks in a fraction of that (measured in
bench/bench_boot.py --initrd, BENCHMARKS.md), at ~15% more bytes.

Why by hand: python-lz4 compresses the blocks (``lz4.block``), but writes only the modern LZ4
frame, and the kernel's ``decompress_unlz4`` reads only the legacy one (``lz4 -l``): the magic
``02 21 4C 18``, then blocks each preceded by its compressed size (32-bit little-endian), each
block at most 8 MiB uncompressed, no checksums, no end mark (the input's end is the end). That
framing is these few lines. Output depends only on the input and liblz4's HC level 9, so it is
reproducible for a given python-lz4.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from typing import BinaryIO

MAGIC = b"\x02\x21\x4c\x18"
BLOCK = 8 << 20  # the kernel decompresses each block into an 8 MiB buffer (LZ4_DEFAULT_UNCOMPRESSED_CHUNK_SIZE)
LEVEL = 9  # lz4 -9: past 9 HC compresses ~0.5% smaller at 5x the time


def _compress(block: bytes) -> bytes:
    import lz4.block

    data = lz4.block.compress(block, mode="high_compression", compression=LEVEL, store_size=False)
    return struct.pack("<I", len(data)) + data


class Lz4Legacy:
    """A write-only stream: ``write`` the uncompressed bytes, ``close`` to finish (or ``abort``).
    Blocks are compressed on every core (liblz4 runs without the GIL) and written in order."""

    def __init__(self, raw: BinaryIO, workers: int | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.raw = raw
        self.workers = workers or max(1, min(4, os.cpu_count() or 1))
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="initrd-lz4")
        self.pending: deque = deque()
        self.buf = bytearray()
        raw.write(MAGIC)

    def _submit(self, block: bytes) -> None:
        self.pending.append(self.pool.submit(_compress, block))
        while len(self.pending) > 2 * self.workers:  # bounded memory
            self.raw.write(self.pending.popleft().result())

    def write(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= BLOCK:
            block = bytes(self.buf[:BLOCK])
            del self.buf[:BLOCK]
            self._submit(block)

    def close(self) -> None:
        if self.buf:
            self._submit(bytes(self.buf))
            self.buf.clear()
        while self.pending:
            self.raw.write(self.pending.popleft().result())
        self.pool.shutdown()

    def abort(self) -> None:
        for f in self.pending:
            f.cancel()
        self.pool.shutdown(wait=True)


def decompress(data: bytes, limit: int | None = None) -> bytes:
    """The content of a legacy stream that runs to the end of ``data``, as the kernel reads it
    (it takes blocks until its input ends; a magic between blocks starts a concatenated stream).
    ``limit`` bounds the output (untrusted input)."""
    import lz4.block

    if not data.startswith(MAGIC):
        raise ValueError("not an LZ4 legacy stream (no 02 21 4C 18 magic)")
    out = bytearray()
    pos = len(MAGIC)
    while pos < len(data):
        if data[pos:pos + 4] == MAGIC:
            pos += 4
            continue
        if pos + 4 > len(data):
            raise ValueError(f"LZ4 legacy stream: truncated block size at byte {pos}")
        (size,) = struct.unpack_from("<I", data, pos)
        if pos + 4 + size > len(data):
            raise ValueError(f"LZ4 legacy stream: block at byte {pos} needs {size} bytes, {len(data) - pos - 4} left")
        try:
            out += lz4.block.decompress(data[pos + 4:pos + 4 + size], uncompressed_size=BLOCK)
        except lz4.block.LZ4BlockError as e:
            raise ValueError(f"LZ4 legacy stream: corrupt block at byte {pos}: {e}") from None
        pos += 4 + size
        if limit is not None and len(out) > limit:
            raise ValueError(f"LZ4 legacy stream: more than {limit} bytes")
    return bytes(out)
