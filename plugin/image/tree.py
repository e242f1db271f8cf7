"""The canonical tree: every file of the image, by path, with contents referenced and never held.

Why a tree of references: images are hundreds of megabytes, and the same layer file is grafted
into several bundles. An Entry points at its bytes (a range of an uncompressed layer tar in the
work directory, or a small in-memory blob), so the whole build stays in a few tens of MB of RAM.

Why canonical: the image id is the sha256 of the tar ``write_tar`` produces, and users rely on
"same inputs -> same id". So the tar depends on nothing but the set of entries: paths sorted by
their UTF-8 bytes (a parent always sorts before its children), every mtime the build's one
timestamp, no user/group names, numeric ids and modes kept, a PAX header only when ustar cannot
say it (long or non-ASCII names, xattrs — written in sorted order), and hard links rewritten so
the content sits on the member of each link group that sorts first.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

from mobykit.errors import BuildError

TYPES = ("file", "dir", "symlink", "hardlink", "char", "block", "fifo")
CHUNK = 1 << 20


@dataclass(frozen=True)
class BytesContent:
    """Contents held in memory: only for small generated files (configs, the files: section)."""

    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self) -> bytes:
        return self.data

    def chunks(self, files: FileCache | None = None) -> Iterator[bytes]:
        if self.data:
            yield self.data


@dataclass(frozen=True)
class FileContent:
    """``size`` bytes at ``offset`` in ``path`` (usually a member of an uncompressed layer tar)."""

    path: Path
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            return fh.read(self.size)

    def chunks(self, files: FileCache | None = None) -> Iterator[bytes]:
        """Yield the bytes in pieces of at most CHUNK; ``files`` keeps handles open across entries
        (a tree of 50k small files would otherwise open the same layer tar 50k times)."""
        own = files is None
        cache = files or FileCache()
        try:
            fh = cache.get(self.path)
            fh.seek(self.offset)
            left = self.size
            while left:
                data = fh.read(min(left, CHUNK))
                if not data:
                    raise BuildError(f"{self.path}: ended {left} bytes early reading a file of {self.size} bytes at offset {self.offset}")
                left -= len(data)
                yield data
        finally:
            if own:
                cache.close()


Content = BytesContent | FileContent


class FileCache:
    """A few open read handles, keyed by path (a build reads from a handful of layer tars)."""

    def __init__(self, limit: int = 64):
        self.limit = limit
        self.handles: dict[Path, BinaryIO] = {}

    def get(self, path: Path) -> BinaryIO:
        fh = self.handles.get(path)
        if fh is None:
            if len(self.handles) >= self.limit:
                self.close()
            fh = self.handles[path] = open(path, "rb")  # noqa: SIM115 - closed by close()
        return fh

    def close(self) -> None:
        for fh in self.handles.values():
            fh.close()
        self.handles.clear()


@dataclass
class Entry:
    """One path of the image. ``path`` is relative ("etc/passwd"): no leading or trailing slash."""

    path: str
    type: str
    mode: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    source: Content | None = None


def clean_path(path: str) -> str:
    """``/a//b/./c/`` -> ``a/b/c``; "" for the root. ``..`` is refused rather than resolved: in a
    tree that never follows symlinks there is no right answer for it, and in a hostile layer it
    is always an attempt to escape."""
    parts = [p for p in path.split("/") if p and p != "."]
    if ".." in parts:
        raise ValueError(f"{path!r}: '..' is not allowed in a path")
    return "/".join(parts)


def _parent(path: str) -> str:
    i = path.rfind("/")
    return path[:i] if i >= 0 else ""


class Tree:
    """Paths -> Entries. Adding is "later wins" (a layer over a lower one, the files: section over
    the images) and makes missing parent directories (0755, root-owned), as Docker's layer
    application does. Hard links are kept as a group around one holder entry, so removing or
    replacing the holder hands its content to a remaining link, as unlinking does on a disk."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self._children: dict[str, set[str]] = {"": set()}
        self._links: dict[str, set[str]] = {}  # holder path -> hardlink paths pointing at it

    def copy(self) -> Tree:
        """An independent tree with the same entries (entries are never changed in place)."""
        other = Tree()
        other._entries = dict(self._entries)
        other._children = {k: set(v) for k, v in self._children.items()}
        other._links = {k: set(v) for k, v in self._links.items()}
        return other

    # -- queries
    def get(self, path: str) -> Entry | None:
        return self._entries.get(clean_path(path))

    def __contains__(self, path: str) -> bool:
        return clean_path(path) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def children(self, path: str) -> list[str]:
        """Direct children of a directory, sorted (full paths)."""
        return sorted(self._children.get(clean_path(path), ()))

    def __iter__(self) -> Iterator[Entry]:
        """Entries in canonical order, hard links rewritten onto the first path of their group."""
        primary: dict[str, str] = {}  # holder -> first path of its group
        for holder, links in self._links.items():
            first = min(links | {holder})
            if first != holder:
                primary[holder] = first
        moved = {first: holder for holder, first in primary.items()}
        for path in sorted(self._entries):
            entry = self._entries[path]
            if path in moved:  # a link that now carries the content of its holder
                yield replace(self._entries[moved[path]], path=path)
            elif path in primary:  # the holder, now a link to the first path
                yield self._as_link(entry, primary[path])
            elif entry.type == "hardlink" and entry.linkname in primary:
                yield self._as_link(entry, primary[entry.linkname])
            else:
                yield entry

    def _as_link(self, entry: Entry, target: str) -> Entry:
        holder = self._entries[_holder_of(self, target)]
        return Entry(path=entry.path, type="hardlink", mode=holder.mode, uid=holder.uid, gid=holder.gid, linkname=target)

    # -- changes
    def add(self, entry: Entry) -> None:
        """Add or replace ``entry.path``. A directory over a directory keeps the children and takes
        the new metadata; anything else over a directory removes the directory's subtree."""
        if entry.type not in TYPES:
            raise ValueError(f"{entry.path}: unknown entry type {entry.type!r}")
        path = clean_path(entry.path)
        if not path:
            raise ValueError("the root directory cannot be an entry")
        if path != entry.path:
            entry = replace(entry, path=path)
        if entry.type == "hardlink":
            target = clean_path(entry.linkname)
            holder = self._entries.get(target)
            if holder is None:
                raise BuildError(f"{path}: hard link to {entry.linkname!r}, which is not in the tree")
            if holder.type == "dir":
                raise BuildError(f"{path}: hard link to directory {target!r}")
            if holder.type == "hardlink":
                target = holder.linkname
                holder = self._entries[target]
            if target == path:
                return  # a link to itself changes nothing
            entry = replace(entry, linkname=target, size=0, source=None, mode=holder.mode, uid=holder.uid, gid=holder.gid)
        self._make_parents(path)
        old = self._entries.get(path)
        if old is not None:
            if old.type == "dir" and entry.type == "dir":
                self._entries[path] = entry
                return
            self._drop(path, keep_in_parent=True)
        self._entries[path] = entry
        self._children[_parent(path)].add(path)
        if entry.type == "dir":
            self._children.setdefault(path, set())
        elif entry.type == "hardlink":
            self._links.setdefault(entry.linkname, set()).add(path)

    def _make_parents(self, path: str) -> None:
        missing = []
        parent = _parent(path)
        while parent:
            existing = self._entries.get(parent)
            if existing is not None:
                if existing.type != "dir":
                    raise BuildError(f"{path}: parent {parent!r} is a {existing.type}, not a directory")
                break
            missing.append(parent)
            parent = _parent(parent)
        for p in reversed(missing):
            self._entries[p] = Entry(path=p, type="dir", mode=0o755)
            self._children[_parent(p)].add(p)
            self._children[p] = set()

    def remove(self, path: str) -> None:
        """Remove ``path`` and, for a directory, everything under it (a whiteout). Absent: no-op."""
        path = clean_path(path)
        if path in self._entries:
            self._drop(path, keep_in_parent=False)

    def _drop(self, path: str, keep_in_parent: bool) -> None:
        entry = self._entries.pop(path)
        if not keep_in_parent:
            self._children[_parent(path)].discard(path)
        if entry.type == "dir":
            for child in list(self._children.pop(path, ())):
                self._drop(child, keep_in_parent=True)
        elif entry.type == "hardlink":
            links = self._links.get(entry.linkname)
            if links is not None:
                links.discard(path)
                if not links:
                    del self._links[entry.linkname]
        links = self._links.pop(path, None)
        if links:  # promote the first remaining link to hold the content
            heir = min(p for p in links if p in self._entries)
            self._entries[heir] = replace(entry, path=heir)
            rest = links - {heir}
            for p in rest:
                self._entries[p] = replace(self._entries[p], linkname=heir)
            if rest:
                self._links[heir] = rest

    def add_bytes(self, path: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
        self.add(Entry(path=path, type="file", mode=mode, uid=uid, gid=gid, size=len(data), source=BytesContent(bytes(data))))

    def add_dir(self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        self.add(Entry(path=path, type="dir", mode=mode, uid=uid, gid=gid))

    def add_symlink(self, path: str, target: str) -> None:
        self.add(Entry(path=path, type="symlink", mode=0o777, linkname=target))

    def graft(self, prefix: str, other: Tree) -> None:
        """Copy every entry of ``other`` under ``prefix`` ("" = at the root), later-wins over what
        is here. Hard links are re-pointed under the prefix."""
        prefix = clean_path(prefix)
        if prefix and prefix not in self._entries:
            self.add_dir(prefix)

        def moved(p: str) -> str:
            return f"{prefix}/{p}" if prefix else p

        for entry in other:  # canonical order: holders before their links, parents first
            changes: dict = {"path": moved(entry.path)}
            if entry.type == "hardlink":
                changes["linkname"] = moved(entry.linkname)
            self.add(replace(entry, **changes))


def _holder_of(tree: Tree, path: str) -> str:
    entry = tree._entries[path]
    return entry.linkname if entry.type == "hardlink" else path


# -- the canonical tar

_TARTYPE = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}
KIND_OF_TARTYPE = {
    tarfile.REGTYPE: "file",
    tarfile.AREGTYPE: "file",
    tarfile.CONTTYPE: "file",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}
XATTR_PREFIX = "SCHILY.xattr."


def tar_header(entry: Entry, mtime: int) -> bytes:
    """The header block(s) of one entry, with the fixed metadata. tarfile's PAX writer emits a
    plain ustar block unless a field does not fit, which is exactly "PAX only when needed"."""
    info = tarfile.TarInfo(entry.path)
    info.type = _TARTYPE[entry.type]
    info.mode = entry.mode & 0o7777
    info.uid, info.gid = entry.uid, entry.gid
    info.uname = info.gname = ""
    info.mtime = mtime
    info.size = entry.size if entry.type == "file" else 0
    info.linkname = entry.linkname if entry.type in ("symlink", "hardlink") else ""
    if entry.type in ("char", "block"):
        info.devmajor, info.devminor = entry.devmajor, entry.devminor
    if entry.xattrs:
        info.pax_headers = {
            XATTR_PREFIX + key: value.decode("utf-8", "surrogateescape") for key, value in sorted(entry.xattrs.items())
        }
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


class _HashingWriter:
    def __init__(self, out: BinaryIO):
        self.out = out
        self.sha = hashlib.sha256()
        self.count = 0

    def write(self, data: bytes) -> None:
        self.sha.update(data)
        self.out.write(data)
        self.count += len(data)


def write_tar(tree: Tree, out: BinaryIO, mtime: int) -> str:
    """Stream the canonical tar of ``tree`` to ``out``; return the sha256 hex of what was written."""
    w = _HashingWriter(out)
    files = FileCache()
    try:
        for entry in tree:
            w.write(tar_header(entry, mtime))
            if entry.type != "file" or not entry.size:
                continue
            if entry.source is None:
                raise BuildError(f"{entry.path}: file of {entry.size} bytes has no contents")
            written = 0
            for chunk in entry.source.chunks(files):
                written += len(chunk)
                w.write(chunk)
            if written != entry.size:
                raise BuildError(f"{entry.path}: contents are {written} bytes, the entry says {entry.size}")
            if entry.size % tarfile.BLOCKSIZE:
                w.write(bytes(tarfile.BLOCKSIZE - entry.size % tarfile.BLOCKSIZE))
    finally:
        files.close()
    w.write(bytes(2 * tarfile.BLOCKSIZE))
    return w.sha.hexdigest()


def entry_from_tarinfo(info: tarfile.TarInfo, path: str, source_path: Path, base: int = 0) -> Entry:
    """A tar member as an Entry whose contents are referenced at their offset in ``source_path``
    (``base`` = where the tar itself starts in that file). Used for trusted tars; layers.py does
    its own checks first."""
    kind = KIND_OF_TARTYPE[info.type]
    xattrs = {
        k[len(XATTR_PREFIX):]: v.encode("utf-8", "surrogateescape")
        for k, v in info.pax_headers.items()
        if k.startswith(XATTR_PREFIX)
    }
    source = FileContent(source_path, base + info.offset_data, info.size) if kind == "file" else None
    return Entry(
        path=path,
        type=kind,
        mode=info.mode & 0o7777,
        uid=info.uid,
        gid=info.gid,
        size=info.size if kind == "file" else 0,
        linkname=info.linkname if kind in ("symlink", "hardlink") else "",
        devmajor=info.devmajor if kind in ("char", "block") else 0,
        devminor=info.devminor if kind in ("char", "block") else 0,
        xattrs=xattrs,
        source=source,
    )


def read_tar(path: Path) -> Tree:
    """A tar on disk (such as the canonical tar) as a Tree whose contents point into that file."""
    path = Path(path)
    tree = Tree()
    try:
        with tarfile.open(path, "r:", encoding="utf-8", errors="surrogateescape") as tf:
            while (info := tf.next()) is not None:
                tf.members.clear()  # metadata only as we go; the Tree keeps what it needs
                name = clean_path(info.name)
                if not name:
                    continue
                if info.type not in KIND_OF_TARTYPE or info.issparse():
                    raise BuildError(f"{path}: {info.name}: unsupported tar member type {info.type!r}")
                entry = entry_from_tarinfo(info, name, path)
                if entry.type == "hardlink":
                    entry.linkname = clean_path(entry.linkname)
                tree.add(entry)
    except (tarfile.TarError, ValueError, OSError) as e:
        raise BuildError(f"{path}: not a readable tar: {e}") from e
    return tree
