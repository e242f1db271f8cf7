"""A tar archive holding one sparse file, in GNU's old format (what ``tar --format=oldgnu -S``
writes and what GCE's image import documents for ``disk.raw``).

Why by hand: Python's tarfile reads GNU sparse members but cannot write them, and GNU tar finds
holes with ``SEEK_HOLE``, which depends on how the file sits on its file system. A 1 GiB cloud
disk holds some tens of MiB; stored whole, its zeros alone would cost seconds of gzip. Here the
data runs come from the file's bytes (``disk.sparse.data_extents``), so the archive depends
only on the content, the name and the time.

Layout (GNU tar's manual, "GNU tar and sparse files", old GNU format): one 512-byte header of
type ``S`` with the real size and the first 4 (offset, length) data runs, extension blocks of
21 runs each when there are more, then the runs' bytes back to back (the header's size field is
their total), padded to 512; a final run of length 0 at the end of the file when it ends in a
hole (GNU tar extends the file to the real size from it); then the end-of-archive blocks.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from mobykit.image.disk.sparse import data_extents

BLOCK = 512
RECORD = 20 * BLOCK  # GNU tar's default blocking: archives are whole 10 KiB records
IN_HEADER = 4  # data runs in the header itself
IN_EXTENSION = 21  # data runs per extension block
OLDGNU_MAGIC = b"ustar  \0"  # magic "ustar " + version " \0": the old GNU format


def number(value: int, width: int) -> bytes:
    """A numeric field: octal digits and a NUL when they fit, else GNU's base-256 (high bit set,
    big-endian), which GNU tar, Go and Python read for sizes of 8 GiB and more."""
    if value < 0:
        raise ValueError("tar numbers are not negative")
    if value < 8 ** (width - 1):
        return b"%0*o\0" % (width - 1, value)
    if value >= 256 ** (width - 1):
        raise ValueError(f"{value} does not fit a {width}-byte tar field")
    return b"\x80" + value.to_bytes(width - 1, "big")


def _runs(runs: list[tuple[int, int]], count: int) -> bytes:
    out = b"".join(number(offset, 12) + number(length, 12) for offset, length in runs)
    return out.ljust(count * 24, b"\0")


def header(name: str, *, size: int, realsize: int, runs: list[tuple[int, int]], mtime: int, mode: int) -> bytes:
    """The ``S`` header block: ``size`` stored bytes standing for ``realsize`` bytes of file."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"{name!r}: longer than an old GNU tar name field")
    h = bytearray(BLOCK)
    h[0:len(raw)] = raw
    h[100:108] = number(mode, 8)
    h[108:116] = number(0, 8)  # uid
    h[116:124] = number(0, 8)  # gid
    h[124:136] = number(size, 12)
    h[136:148] = number(mtime, 12)
    h[156:157] = b"S"
    h[257:265] = OLDGNU_MAGIC
    h[265:269] = b"root"  # uname
    h[297:301] = b"root"  # gname
    h[386:482] = _runs(runs[:IN_HEADER], IN_HEADER)
    h[482] = 1 if len(runs) > IN_HEADER else 0  # isextended
    h[483:495] = number(realsize, 12)
    h[148:156] = b" " * 8  # the checksum counts its own field as spaces
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def extensions(runs: list[tuple[int, int]]) -> bytes:
    """The extension blocks for the runs after the header's first 4."""
    rest = runs[IN_HEADER:]
    blocks = []
    for i in range(0, len(rest), IN_EXTENSION):
        block = bytearray(BLOCK)
        block[0:504] = _runs(rest[i:i + IN_EXTENSION], IN_EXTENSION)
        block[504] = 1 if i + IN_EXTENSION < len(rest) else 0
        blocks.append(bytes(block))
    return b"".join(blocks)


def write(out: BinaryIO, path: Path, name: str, *, mtime: int, mode: int = 0o644) -> None:
    """Write a tar archive holding the file at ``path`` as the sparse member ``name`` (owner
    root:root, ``mode``, ``mtime``) to ``out``."""
    realsize = path.stat().st_size
    data = data_extents(path)
    runs = list(data)
    if not runs or runs[-1][0] + runs[-1][1] < realsize:
        runs.append((realsize, 0))
    stored = sum(length for _, length in data)
    written = 0

    def emit(chunk: bytes) -> None:
        nonlocal written
        out.write(chunk)
        written += len(chunk)

    emit(header(name, size=stored, realsize=realsize, runs=runs, mtime=mtime, mode=mode))
    emit(extensions(runs))
    with open(path, "rb") as f:
        for offset, length in data:
            f.seek(offset)
            left = length
            while left:
                chunk = f.read(min(1 << 20, left))
                if not chunk:
                    raise OSError(f"{path}: shorter than while it was scanned")
                emit(chunk)
                left -= len(chunk)
    emit(bytes(-written % BLOCK))
    emit(bytes(2 * BLOCK))  # end of archive
    emit(bytes(-written % RECORD))
