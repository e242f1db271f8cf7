"""Untrusted image layers -> one flattened Tree, without ever extracting anything to disk.

Why this shape: layers come from registries we do not control. Each layer blob is decompressed
once, its sha256 checked on the way, into an uncompressed tar in ``work/``; only tar *headers* are
then read, and file contents are referenced by (tar, offset, size). No path from a layer is ever
used as a filesystem path, so no entry can write outside ``work/`` whatever it contains.

Flattening follows the OCI image-spec layer rules: lower layers first; in each layer the
whiteouts (``.wh.NAME``) and opaque markers (``.wh..wh..opq``) apply to the layers below only,
so they are applied before the layer's own entries; other ``.wh..wh.*`` (aufs bookkeeping) are
ignored. Missing parents are made 0755, as Docker's unpacker does.

Refused, with ImageError(image, layer, path):
- names with a ``..`` component (a leading ``/`` or ``./`` is stripped, as tar does);
- an entry whose parent in the flattened tree is a symlink or a non-directory (we never follow a
  symlink to place an entry — that is how "write through a symlink" attacks work);
- a hard link to a path that is not (yet) in the tree, to a directory, or with ``..``;
- char/block devices outside ``dev/``; unknown member types (sparse, volume, multi-volume);
- setuid/setgid regular files that are also world-writable: setuid is legitimate (ping, su),
  but a world-writable one is either broken or a planted privilege escalation, so we refuse it;
- decompression bombs: more uncompressed bytes than Limits.max_total_bytes for the image, a layer
  expanding more than max_ratio times its compressed size (once past ratio_floor), more than
  max_entries entries, or a path/link name longer than max_path bytes (or a component > 255);
- a blob whose sha256 is not its digest, truncated or corrupt compression or tar data.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from mobykit.errors import BuildError, ImageError
from mobykit.image.tree import KIND_OF_TARTYPE, BytesContent, Entry, FileContent, Tree, entry_from_tarinfo

CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
NAME_MAX = 255  # Linux's limit on one path component: longer ones could never be unpacked at boot

# Layer media types we unpack, and the compression each one declares. The magic bytes decide
# which decompressor runs (as containerd does); the digest check makes the content trustworthy,
# and a mislabelled-but-valid layer (e.g. an uncompressed tar typed tar.gzip) still unpacks.
MEDIA_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "plain",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "plain",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "plain",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}


@dataclass(frozen=True)
class Limits:
    """Bounds on what one image may expand to (decompression-bomb protection)."""

    max_total_bytes: int = 16 << 30  # uncompressed bytes, all layers of one image
    max_ratio: int = 1000  # uncompressed / compressed, per layer ...
    ratio_floor: int = 64 << 20  # ... checked once a layer has produced this many bytes
    max_entries: int = 1_000_000  # tar members, all layers of one image
    max_path: int = 4096  # bytes in an entry's path or link name


@dataclass
class _Where:
    """What an error names, and the budget shared by all layers of one image."""

    image: str | None
    layer: str | None = None
    limits: Limits = field(default_factory=Limits)
    total_bytes: int = 0
    entries: int = 0

    def error(self, message: str, path: str | None = None) -> ImageError:
        return ImageError(message, image=self.image, layer=self.layer, path=path)


class _Reader(Protocol):
    def read(self, n: int, /) -> bytes: ...


class _HashingReader:
    def __init__(self, fh: BinaryIO):
        self.fh = fh
        self.sha = hashlib.sha256()
        self.count = 0

    def read(self, n: int) -> bytes:
        data = self.fh.read(n)
        self.sha.update(data)
        self.count += len(data)
        return data


def compression_of(head: bytes) -> str:
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "plain"


def _next_member(src: _Reader, buf: bytes, magic: bytes, where: _Where, what: str) -> bytes | None:
    """Between two compressed members: skip zero padding; None at the end of the input, else
    the buffered input starting at the next member's magic (anything else is an error)."""
    while True:
        buf = buf.lstrip(b"\0")
        if len(buf) < len(magic):
            more = src.read(CHUNK)
            if not more:
                if buf:
                    raise where.error(f"garbage after the {what} data")
                return None
            buf += more
            continue
        if not buf.startswith(magic):
            raise where.error(f"garbage after the {what} data")
        return buf


def _gunzip(src: _Reader, emit: Callable[[bytes], None], where: _Where) -> None:
    """Every gzip member in turn (concatenated gzip is valid). Output is bounded per call, so a
    bomb is stopped by ``emit`` before it is materialised."""
    buf = _next_member(src, b"", GZIP_MAGIC, where, "gzip")
    while buf is not None:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        while not d.eof:
            if not buf:
                buf = src.read(CHUNK)
                if not buf:  # input ended: drain what zlib still holds, then it must be done
                    while out := d.decompress(b"", CHUNK):
                        emit(out)
                    if not d.eof:
                        raise where.error("truncated gzip data")
                    break
            try:
                out = d.decompress(buf, CHUNK)
            except zlib.error as e:
                raise where.error(f"corrupt gzip data: {e}") from None
            if out:
                emit(out)
            buf = d.unconsumed_tail
        buf = _next_member(src, d.unused_data + buf, GZIP_MAGIC, where, "gzip")


def _unzstd(src: _Reader, emit: Callable[[bytes], None], where: _Where) -> None:
    """zstd frames in turn. Input goes in 2 KiB pieces because one decompress call returns all it
    can: 2 KiB of zstd expands to at most ~64 MiB, which bounds memory under a bomb."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    buf = _next_member(src, b"", ZSTD_MAGIC, where, "zstd")
    while buf is not None:
        d = dctx.decompressobj()
        pos = 0
        while not d.eof:
            if pos >= len(buf):
                buf, pos = src.read(CHUNK), 0
                if not buf:
                    raise where.error("truncated zstd data")
            piece = buf[pos : pos + 2048]
            pos += len(piece)
            try:
                out = d.decompress(piece)
            except zstandard.ZstdError as e:
                raise where.error(f"corrupt zstd data: {e}") from None
            if out:
                emit(out)
        buf = _next_member(src, bytes(d.unused_data) + buf[pos:], ZSTD_MAGIC, where, "zstd")


def _copy(src: _Reader, emit: Callable[[bytes], None], where: _Where) -> None:
    while data := src.read(CHUNK):
        emit(data)


_DECOMPRESS = {"gzip": _gunzip, "zstd": _unzstd, "plain": _copy}


def decompress_layer(blob: BinaryIO, digest: str, compressed_size: int, dest: Path, where: _Where) -> Path:
    """Blob -> uncompressed tar at ``dest`` (written to a temp name, renamed when the digest has
    been verified; removed on any error)."""
    algo, _, expected = digest.partition(":")
    if algo != "sha256":
        raise where.error(f"unsupported digest algorithm {algo!r}")
    limits = where.limits
    tmp = dest.with_name(dest.name + ".partial")
    src = _HashingReader(blob)
    head = src.read(4)
    kind = compression_of(head)
    produced = 0
    try:
        with open(tmp, "wb") as out:

            def emit(data: bytes) -> None:
                nonlocal produced
                produced += len(data)
                if where.total_bytes + produced > limits.max_total_bytes:
                    raise where.error(
                        f"decompression bomb: image expands beyond the limit of {limits.max_total_bytes} bytes"
                    )
                if produced > limits.ratio_floor and produced > limits.max_ratio * max(compressed_size, 1):
                    raise where.error(
                        f"decompression bomb: layer of {compressed_size} bytes expands more than "
                        f"{limits.max_ratio} times (limit max_ratio)"
                    )
                out.write(data)

            try:
                _DECOMPRESS[kind](_Prefixed(head, src), emit, where)
            except ImageError:
                # a tampered blob is reported as such, not as whatever its bytes broke
                while src.read(CHUNK):
                    pass
                if src.sha.hexdigest() != expected:
                    raise where.error(f"digest mismatch: blob content is sha256:{src.sha.hexdigest()}") from None
                raise
            while src.read(CHUNK):  # hash whatever follows the compressed stream
                pass
        if src.sha.hexdigest() != expected:
            raise where.error(f"digest mismatch: blob content is sha256:{src.sha.hexdigest()}")
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    where.total_bytes += produced
    return dest


class _Prefixed:
    """Replays the magic bytes already read (and hashed) before the rest of the stream."""

    def __init__(self, head: bytes, src: _HashingReader):
        self.head, self.src = head, src

    def read(self, n: int) -> bytes:
        if self.head:
            data, self.head = self.head, b""
            return data + self.src.read(max(n - len(data), 0))
        return self.src.read(n)


# -- applying one uncompressed tar to the tree


def _norm(name: str, where: _Where, entry: str | None = None) -> str:
    """``entry``: the member being checked, when ``name`` is its link target."""
    parts = [p for p in name.split("/") if p and p != "."]
    if ".." in parts:
        what = f"link target {name!r}" if entry is not None else "path"
        raise where.error(f"{what} escapes the root ('..' component)", path=entry or name)
    path = "/".join(parts)
    if any(len(p.encode("utf-8", "surrogateescape")) > NAME_MAX for p in parts):
        raise where.error(f"a path component is longer than {NAME_MAX} bytes", path=entry or name)
    if len(path.encode("utf-8", "surrogateescape")) > where.limits.max_path:
        raise where.error(f"path longer than {where.limits.max_path} bytes", path=name[:200] + "...")
    return path


def _check_parents(tree: Tree, path: str, where: _Where, name: str) -> None:
    """The nearest existing ancestor must be a directory (the tree guarantees all above it are)."""
    parent = path.rpartition("/")[0]
    while parent:
        existing = tree.get(parent)
        if existing is not None:
            if existing.type == "symlink":
                raise where.error(f"parent {parent!r} is a symlink (entries are never placed through symlinks)", path=name)
            if existing.type != "dir":
                raise where.error(f"parent {parent!r} is a {existing.type}, not a directory", path=name)
            return
        parent = parent.rpartition("/")[0]




def _read_headers(fh: BinaryIO, start: int, end: int, where: _Where) -> list[tarfile.TarInfo]:
    """Every member header of the tar in ``fh`` between ``start`` and ``end``. tarfile stops
    silently at a bad header after the first, so we check that only zero blocks follow where it
    stopped: a corrupt or truncated layer is an error, never a silently shorter image."""
    fh.seek(start)
    members: list[tarfile.TarInfo] = []
    try:
        tf = tarfile.open(fileobj=fh, mode="r:", encoding="utf-8", errors="surrogateescape")
        while (info := tf.next()) is not None:
            tf.members.clear()
            where.entries += 1
            if where.entries > where.limits.max_entries:
                raise where.error(f"more than {where.limits.max_entries} entries in the image (limit max_entries)")
            if info.type in KIND_OF_TARTYPE and KIND_OF_TARTYPE[info.type] == "file" and info.offset_data + info.size > end:
                raise where.error("truncated: file data runs past the end of the layer", path=info.name)
            members.append(info)
        stop = tf.offset
    except tarfile.TarError as e:
        raise where.error(f"not a valid tar: {e}") from None
    fh.seek(stop)
    left = end - stop
    while left > 0:
        data = fh.read(min(left, CHUNK))
        if not data:
            break
        if data.strip(b"\0"):
            raise where.error(f"corrupt tar header at offset {stop - start}")
        left -= len(data)
    return members


def apply_tar(tree: Tree, source: Path, where: _Where, start: int = 0, end: int | None = None) -> None:
    """Apply one layer (an uncompressed tar in ``source`` from ``start`` to ``end``) onto ``tree``."""
    if end is None:
        end = source.stat().st_size
    with open(source, "rb") as fh:
        members = _read_headers(fh, start, end, where)
    # Whiteouts first: they hide what the layers below put there, never this layer's own entries.
    for info in members:
        base = info.name.rstrip("/").rpartition("/")[2]
        if not base.startswith(WHITEOUT):
            continue
        path = _norm(info.name, where)
        parent = path.rpartition("/")[0]
        if _hidden(parent):
            continue
        if base == OPAQUE:
            if parent:
                for child in tree.children(parent):
                    tree.remove(child)
            else:  # an opaque root hides every lower layer
                for child in tree.children(""):
                    tree.remove(child)
        elif base.startswith(WHITEOUT + WHITEOUT):
            continue  # aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs)
        else:
            target = base[len(WHITEOUT):]
            if target in ("", ".", ".."):
                raise where.error("whiteout names no file", path=info.name)
            tree.remove(f"{parent}/{target}" if parent else target)
    for info in members:
        if _hidden(info.name):
            continue
        _add_member(tree, info, source, where)


def _hidden(name: str) -> bool:
    """Whiteout markers, and anything inside a ``.wh.*`` directory (aufs's ``.wh..wh.plnk``),
    are never entries of the image."""
    return any(part.startswith(WHITEOUT) for part in name.split("/"))


def _add_member(tree: Tree, info: tarfile.TarInfo, source: Path, where: _Where) -> None:
    name = info.name
    path = _norm(name, where)
    if not path:
        return  # the root directory's own entry: the image root is not an entry
    kind = KIND_OF_TARTYPE.get(info.type)
    if kind is None or info.issparse():
        raise where.error(f"unsupported tar member type {info.type!r}", path=name)
    mode = info.mode & 0o7777
    if kind == "file" and mode & 0o6000 and mode & 0o002:
        raise where.error(f"world-writable setuid/setgid file (mode {mode:o})", path=name)
    if kind in ("char", "block") and not path.startswith("dev/"):
        raise where.error(f"{kind} device node outside /dev", path=name)
    if len(info.linkname.encode("utf-8", "surrogateescape")) > where.limits.max_path:
        raise where.error(f"link name longer than {where.limits.max_path} bytes", path=name)
    _check_parents(tree, path, where, name)
    entry = entry_from_tarinfo(info, path, source)
    if kind == "hardlink":
        target = _norm(info.linkname, where, entry=name)
        existing = tree.get(target) if target else None
        if existing is None:
            raise where.error(f"hard link to {info.linkname!r}, which is not in the tree (yet)", path=name)
        if existing.type == "dir":
            raise where.error(f"hard link to directory {info.linkname!r}", path=name)
        if target == path:
            return
        entry.linkname = target
    elif kind == "symlink" and not info.linkname:
        raise where.error("symlink with an empty target", path=name)
    tree.add(entry)


def unpack_image(cache, image, work: Path, limits: Limits = Limits()) -> Tree:  # noqa: B008 - frozen
    """Flatten ``image``'s layers (an ImageInfo) into a Tree whose contents live in ``work/``."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    where = _Where(image=str(image.ref), limits=limits)
    tree = Tree()
    for layer in image.layers:
        where.layer = layer.digest
        if layer.media_type and layer.media_type not in MEDIA_TYPES:
            raise where.error(f"unsupported layer media type {layer.media_type!r}")
        dest = work / (layer.digest.replace(":", "-") + ".tar")
        if dest.exists():  # already decompressed and verified for another image in this build
            where.total_bytes += dest.stat().st_size
            if where.total_bytes > limits.max_total_bytes:
                raise where.error(f"decompression bomb: image expands beyond the limit of {limits.max_total_bytes} bytes")
        else:
            with cache.open_blob(layer.digest) as blob:
                decompress_layer(blob, layer.digest, layer.size or cache.blob_path(layer.digest).stat().st_size, dest, where)
        apply_tar(tree, dest, where)
    return tree


def unpack_tar_entry(entry: Entry, work: Path, image: str | None = None, limits: Limits = Limits()) -> Tree:  # noqa: B008
    """A tar that is itself a file inside an image (a kernel image's ``kernel.tar`` of modules) as
    a Tree, with the same hostile-entry rules. An uncompressed tar in a layer is read where it
    lies; a compressed or in-memory one is first written to ``work/``."""
    where = _Where(image=image, limits=limits)
    tree = Tree()
    src = entry.source
    if src is None:
        return tree
    head = src.read()[:4] if isinstance(src, BytesContent) else _peek(src)
    if isinstance(src, FileContent) and compression_of(head) == "plain":
        apply_tar(tree, Path(src.path), where, start=src.offset, end=src.offset + src.size)
        return tree
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    raw = work / "tar-entry.in"
    sha = hashlib.sha256()
    with open(raw, "wb") as out:
        for chunk in src.chunks():
            sha.update(chunk)
            out.write(chunk)
    dest = work / f"{sha.hexdigest()}.tar"
    try:
        with open(raw, "rb") as blob:
            decompress_layer(blob, "sha256:" + sha.hexdigest(), src.size, dest, where)
    finally:
        raw.unlink(missing_ok=True)
    apply_tar(tree, dest, where)
    return tree


def _peek(src: FileContent) -> bytes:
    try:
        with open(src.path, "rb") as fh:
            fh.seek(src.offset)
            return fh.read(min(4, src.size))
    except OSError as e:
        raise BuildError(f"{src.path}: {e}") from e
