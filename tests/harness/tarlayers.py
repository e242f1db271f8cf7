"""Build real layer tars (with tarfile) and put them in a real Cache, for the image tests."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

import zstandard

from mobykit.image.cache import Cache, ImageInfo, Layer

GZIP_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD_TYPE = "application/vnd.oci.image.layer.v1.tar+zstd"
PLAIN_TYPE = "application/vnd.oci.image.layer.v1.tar"
TYPES = {"gzip": GZIP_TYPE, "zstd": ZSTD_TYPE, "plain": PLAIN_TYPE}


def f(name: str, data: bytes = b"", mode: int = 0o644, uid: int = 0, gid: int = 0, **pax) -> tuple:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.uid, info.gid, info.mtime = len(data), mode, uid, gid, 1234567
    info.uname, info.gname = "someone", "somegroup"
    if pax:
        info.pax_headers = pax
    return info, data


def d(name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, mode, uid, gid
    return info, None


def sym(name: str, target: str) -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
    return info, None


def hl(name: str, target: str) -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = tarfile.LNKTYPE, target, 0o644
    return info, None


def dev(name: str, kind: bytes = tarfile.CHRTYPE, major: int = 1, minor: int = 3) -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor, info.mode = kind, major, minor, 0o666
    return info, None


def fifo(name: str) -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.FIFOTYPE, 0o644
    return info, None


def whiteout(path: str) -> tuple:
    parent, _, base = path.rpartition("/")
    return f(f"{parent}/.wh.{base}" if parent else f".wh.{base}")


def opaque(directory: str) -> tuple:
    return f(f"{directory}/.wh..wh..opq")


def tar_bytes(*members: tuple, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def compress(data: bytes, kind: str) -> bytes:
    if kind == "gzip":
        return gzip.compress(data, mtime=0)
    if kind == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def add_image(cache: Cache, blobs: list[tuple[bytes, str]], ref: str = "example.com/test/image:1") -> ImageInfo:
    """``blobs``: (blob bytes, media type) per layer, lowest first."""
    layers = []
    for blob, media_type in blobs:
        digest = cache.write_blob(blob)
        layers.append(Layer(digest=digest, media_type=media_type, size=len(blob)))
    manifest = "sha256:" + hashlib.sha256(repr([lay.digest for lay in layers]).encode()).hexdigest()
    return ImageInfo(ref=ref, digest=manifest, index_digest=None, config={}, layers=layers)


def image_of(cache: Cache, *layers: bytes, kind: str = "gzip", ref: str = "example.com/test/image:1") -> ImageInfo:
    """An image whose layers are the given uncompressed tars, compressed as ``kind``."""
    return add_image(cache, [(compress(t, kind), TYPES[kind]) for t in layers], ref=ref)


def listing(tree) -> list[tuple[str, str]]:
    return [(e.path, e.type) for e in tree]


def contents(tree, path: str) -> bytes:
    entry = tree.get(path)
    assert entry is not None, path
    return entry.source.read() if entry.source is not None else b""


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))
