"""A cpio "newc" (SVR4, magic 070701) writer with fixed metadata, for initramfs images.

Why hand-written: GNU ``cpio --reproducible`` still takes inode numbers and link counts from the
filesystem it reads, so two checkouts of the same tree give different bytes; Python has no cpio
module and the PyPI ones either read only or copy host metadata. newc is small enough (a 110-byte
ASCII header, NUL-terminated name, 4-byte padding) that writing it from our canonical entries is
the simplest way to be byte-reproducible.

Choices:
- inode numbers count up from 1 in archive order; every mtime is the build's one timestamp;
  directories have nlink 2, everything else 1 (the kernel ignores nlink except for hard links).
- hard links to a regular file are real newc hard links: every member of the group shares one
  inode number and nlink = group size; only the *last* member carries the data (the others have
  size 0). That is GNU cpio's convention; the kernel's initramfs unpacker, GNU ``cpio -i`` and
  bsdtar all rebuild the link from it, and the content is stored once. Hard links to anything else
  (symlinks, devices: rare and not linked by the kernel's unpacker) are written as copies.
- xattrs are dropped: newc has no place for them (LinuxKit's initrd drops them too).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import BinaryIO

from mobykit.errors import BuildError
from mobykit.image.tree import Entry, FileCache

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
_MODE_BITS = {
    "file": 0o100000,
    "dir": 0o040000,
    "symlink": 0o120000,
    "char": 0o020000,
    "block": 0o060000,
    "fifo": 0o010000,
}
_MAX = 0xFFFFFFFF
_FLUSH = 1 << 20


def header(
    name: bytes, *, ino: int, mode: int, uid: int, gid: int, nlink: int, mtime: int, size: int,
    rdevmajor: int = 0, rdevminor: int = 0,
) -> bytes:
    """One newc header plus the NUL-terminated, 4-byte padded name."""
    fields = (ino, mode, uid, gid, nlink, mtime, size, 0, 0, rdevmajor, rdevminor, len(name) + 1, 0)
    for value in fields:
        if not 0 <= value <= _MAX:
            raise BuildError(f"{name.decode('utf-8', 'replace')}: value {value} does not fit a cpio newc header")
    head = MAGIC + b"".join(b"%08X" % v for v in fields) + name + b"\0"
    return head + bytes(-len(head) % 4)


class _Buffered:
    """Gathers small writes into ~1 MiB blocks: one out.write per block, not per header."""

    def __init__(self, out: BinaryIO):
        self.out, self.buf, self.count = out, bytearray(), 0

    def write(self, data: bytes) -> None:
        self.buf += data
        self.count += len(data)
        if len(self.buf) >= _FLUSH:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            self.out.write(bytes(self.buf))
            self.buf.clear()


def write_newc(entries: Iterable[Entry], out: BinaryIO, mtime: int) -> None:
    """Write ``entries`` (canonical order: a hard link's target comes before the link) as a newc
    archive ending in TRAILER!!!. File contents are streamed from their sources."""
    entries = list(entries)
    by_path = {e.path: e for e in entries}
    # hard-link groups over regular files: holder path -> members in archive order
    groups: dict[str, list[str]] = {}
    for e in entries:
        if e.type == "hardlink":
            target = by_path.get(e.linkname)
            if target is None:
                raise BuildError(f"{e.path}: hard link to {e.linkname!r}, which is not in the archive")
            if target.type == "file":
                groups.setdefault(e.linkname, [e.linkname]).append(e.path)
    last_of = {members[-1]: holder for holder, members in groups.items()}

    w = _Buffered(out)
    files = FileCache()
    inos: dict[str, int] = {}
    next_ino = 1
    try:
        for e in entries:
            name = e.path.encode("utf-8", "surrogateescape")
            holder_path = e.linkname if e.type == "hardlink" else e.path
            # a link to a non-file is not in ``groups`` and is written as a copy of its target
            content = by_path[holder_path] if e.type == "hardlink" else e
            kind = content.type
            if holder_path in groups:
                if holder_path not in inos:
                    inos[holder_path] = next_ino
                    next_ino += 1
                ino = inos[holder_path]
                nlink = len(groups[holder_path])
                carries = last_of.get(e.path) == holder_path
            else:
                ino, next_ino = next_ino, next_ino + 1
                nlink = 2 if kind == "dir" else 1
                carries = True
            if kind == "symlink":
                data = content.linkname.encode("utf-8", "surrogateescape")
                size = len(data)
            else:
                data = b""
                size = content.size if kind == "file" and carries else 0
            rdev = (content.devmajor, content.devminor) if kind in ("char", "block") else (0, 0)
            w.write(header(
                name, ino=ino, mode=_MODE_BITS[kind] | (content.mode & 0o7777), uid=content.uid, gid=content.gid,
                nlink=nlink, mtime=mtime, size=size, rdevmajor=rdev[0], rdevminor=rdev[1],
            ))
            if data:
                w.write(data)
            elif size:
                if content.source is None:
                    raise BuildError(f"{e.path}: file of {size} bytes has no contents")
                written = 0
                for chunk in content.source.chunks(files):
                    written += len(chunk)
                    w.write(chunk)
                if written != size:
                    raise BuildError(f"{e.path}: contents are {written} bytes, the entry says {size}")
            if size % 4:
                w.write(bytes(4 - size % 4))
        w.write(header(TRAILER.encode(), ino=0, mode=0, uid=0, gid=0, nlink=1, mtime=0, size=0))
    finally:
        files.close()
    w.flush()
