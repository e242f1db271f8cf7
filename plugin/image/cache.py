"""The content-addressed image cache: an OCI image layout on disk.

Using the OCI layout (rather than a private format) means ``skopeo``, ``umoci`` and ``oras`` can read
and write our cache, and a cache can be copied to an offline machine as-is. Blobs are written to a
temp file in the cache and renamed into place, so a crash never leaves a half blob under its digest;
``index.json`` is rewritten under a lock file, sorted and stable, so two builds sharing a cache do
not lose each other's tags and the file is identical for identical contents.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from mobykit.errors import CacheMiss, ImageError, InvalidArgument
from mobykit.image import reference as refmod
from mobykit.image.reference import Reference

REF_NAME = "org.opencontainers.image.ref.name"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)

_CHUNK = 1 << 20

# Python's platform.machine() names -> the Go names used in OCI platform objects.
_GO_ARCH = {
    "x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm",
    "armv6l": "arm", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64", "i686": "386",
    "i386": "386",
}


def host_arch() -> str:
    """The host architecture in Go/OCI naming (amd64, arm64, ...)."""
    m = platform.machine().lower()
    return _GO_ARCH.get(m, m)


def default_root() -> Path:
    """``$MOBYKIT_CACHE`` or ``~/.cache/mobykit`` (``$XDG_CACHE_HOME`` honoured)."""
    env = os.environ.get("MOBYKIT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mobykit"


@dataclass(frozen=True)
class Layer:
    digest: str
    media_type: str
    size: int


@dataclass(frozen=True)
class ImageInfo:
    """One resolved image for one platform: what the build needs to unpack it and to key on it."""

    ref: str
    digest: str  # the platform manifest
    index_digest: str | None
    config: dict = field(hash=False)
    layers: list[Layer] = field(hash=False)


def check_digest(digest: str, where: str = "") -> str:
    if not isinstance(digest, str) or not refmod._DIGEST.match(digest):
        raise ImageError(f"unsupported or malformed digest {digest!r}", image=where or None)
    return digest


def media_type_of(doc: dict) -> str:
    """A manifest's media type; OCI lets it be omitted, so infer it from the shape."""
    mt = doc.get("mediaType")
    if mt:
        return mt
    return OCI_INDEX if "manifests" in doc else OCI_MANIFEST


def select_platform(index: dict, arch: str, where: str) -> dict:
    """The descriptor for linux/<arch> in a manifest list / OCI index.

    arm64 images sometimes carry variant "v8" and sometimes none; both are the same platform. For
    "arm" the highest variant is taken only when the caller did not ask for one (arm/v7 style).
    """
    want_arch, _, want_variant = arch.partition("/")
    found = []
    for d in index.get("manifests") or []:
        p = d.get("platform") or {}
        if p.get("os") != "linux" or p.get("architecture") != want_arch:
            continue
        variant = p.get("variant") or ""
        if want_variant and variant != want_variant and not (want_arch == "arm64" and want_variant == "v8" and not variant):
            continue
        found.append(d)
    if not found:
        have = sorted(
            "{}/{}{}".format(
                (d.get("platform") or {}).get("os", "?"),
                (d.get("platform") or {}).get("architecture", "?"),
                "/" + (d.get("platform") or {})["variant"] if (d.get("platform") or {}).get("variant") else "",
            )
            for d in index.get("manifests") or []
        )
        raise ImageError(f"no linux/{arch} image in the manifest list (has: {', '.join(have) or 'nothing'})", image=where)
    return found[0]


class Cache:
    """An OCI image layout used as a content-addressed cache of images pulled or imported."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root).expanduser() if root is not None else default_root()

    # --- layout ---------------------------------------------------------------------------
    @property
    def _blobs(self) -> Path:
        return self.root / "blobs" / "sha256"

    def _init(self) -> None:
        """Create the layout on first write (never on read: a lookup must not write anything)."""
        if self.root.exists() and not self.root.is_dir():
            raise InvalidArgument(f"cache {self.root} is not a directory")
        self._blobs.mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)
        layout = self.root / "oci-layout"
        if not layout.exists():
            self._atomic_write(layout, b'{"imageLayoutVersion":"1.0.0"}')
        if not (self.root / "index.json").exists():
            with self._locked():
                if not (self.root / "index.json").exists():
                    self._write_index([])

    def tmpdir(self) -> Path:
        """Scratch directory on the cache's filesystem, so results can be renamed into place.
        Shared: make your own entries in it with ``tempfile.mkdtemp(dir=...)`` and remove them."""
        self._init()
        return self.root / "tmp"

    def _atomic_write(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    # --- blobs ----------------------------------------------------------------------------
    def _path(self, digest: str) -> Path:
        check_digest(digest)
        return self._blobs / digest.split(":", 1)[1]

    def has_blob(self, digest: str) -> bool:
        return self._path(digest).is_file()

    def blob_path(self, digest: str) -> Path:
        p = self._path(digest)
        if not p.is_file():
            raise CacheMiss(f"blob {digest} is not in the cache {self.root}")
        return p

    def open_blob(self, digest: str) -> BinaryIO:
        return open(self.blob_path(digest), "rb")

    def read_blob(self, digest: str) -> bytes:
        with self.open_blob(digest) as f:
            return f.read()

    def read_json(self, digest: str) -> dict:
        try:
            doc = json.loads(self.read_blob(digest))
        except (ValueError, UnicodeDecodeError) as e:
            raise ImageError(f"blob is not valid JSON: {e}", image=digest) from None
        if not isinstance(doc, dict):
            raise ImageError("blob is not a JSON object", image=digest)
        return doc

    def write_blob(self, data: bytes | BinaryIO, expected: str | None = None, *, size: int | None = None,
                   progress=None) -> str:
        """Store ``data`` under its sha256 and return ``sha256:<hex>``.

        With ``expected`` (and optionally ``size``) the content is verified *before* it is renamed
        into place: a blob in the cache always matches its name. ``progress`` is an optional
        Progress task handle advanced by the bytes written.
        """
        if expected is not None:
            check_digest(expected)
            if self.has_blob(expected) and isinstance(data, bytes | bytearray):
                # still verify the caller's bytes, so a mismatch is reported even if cached
                if "sha256:" + hashlib.sha256(data).hexdigest() != expected:
                    raise ImageError(f"digest mismatch: content is not {expected}", image=expected)
                return expected
        self._init()
        h = hashlib.sha256()
        n = 0
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", prefix="blob-")
        try:
            with os.fdopen(fd, "wb") as f:
                if isinstance(data, bytes | bytearray | memoryview):
                    h.update(data)
                    f.write(data)
                    n = len(data)
                    if progress is not None:
                        progress.advance(n)
                else:
                    while True:
                        chunk = data.read(_CHUNK)
                        if not chunk:
                            break
                        h.update(chunk)
                        f.write(chunk)
                        n += len(chunk)
                        if progress is not None:
                            progress.advance(len(chunk))
                        if size is not None and n > size:
                            raise ImageError(f"blob is larger than its descriptor's {size} bytes", image=expected)
                f.flush()
                os.fsync(f.fileno())
            digest = "sha256:" + h.hexdigest()
            if expected is not None and digest != expected:
                raise ImageError(f"digest mismatch: expected {expected}, content is {digest}", image=expected)
            if size is not None and n != size:
                raise ImageError(f"size mismatch: descriptor says {size} bytes, content is {n}", image=digest)
            os.chmod(tmp, 0o644)
            os.replace(tmp, self._path(digest))
            return digest
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    # --- index.json -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / "index.json.lock", "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _read_index(self) -> list[dict]:
        p = self.root / "index.json"
        if not p.exists():
            return []
        try:
            doc = json.loads(p.read_bytes())
            manifests = doc.get("manifests") or []
        except (ValueError, AttributeError) as e:
            raise ImageError(f"{p}: not a valid OCI index: {e}") from None
        return [m for m in manifests if isinstance(m, dict)]

    def _write_index(self, manifests: list[dict]) -> None:
        manifests = sorted(manifests, key=lambda m: ((m.get("annotations") or {}).get(REF_NAME, ""), m.get("digest", "")))
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        data = json.dumps(doc, sort_keys=True, indent=2).encode() + b"\n"
        self._atomic_write(self.root / "index.json", data)

    def tag(self, ref: Reference | str, manifest_digest: str) -> None:
        """Point ``ref`` (normalised) at a manifest or index already in the cache."""
        r = refmod.parse(ref) if isinstance(ref, str) else ref
        doc = self.read_json(manifest_digest)
        desc = {
            "mediaType": media_type_of(doc),
            "digest": manifest_digest,
            "size": self.blob_path(manifest_digest).stat().st_size,
            "annotations": {REF_NAME: str(r)},
        }
        self._init()
        with self._locked():
            manifests = [m for m in self._read_index() if (m.get("annotations") or {}).get(REF_NAME) != str(r)]
            manifests.append(desc)
            self._write_index(manifests)

    def lookup(self, ref: Reference | str) -> str | None:
        """The digest a tag points at in index.json, or None."""
        name = str(refmod.parse(ref) if isinstance(ref, str) else ref)
        for m in self._read_index():
            if (m.get("annotations") or {}).get(REF_NAME) == name:
                return m.get("digest")
        return None

    # --- resolution -----------------------------------------------------------------------
    def resolve(self, ref: Reference | str, arch: str) -> ImageInfo:
        """The image ``ref`` names for linux/<arch>, from the cache alone (never the network).

        CacheMiss if the tag is unknown or any blob the image needs (manifest, config, layer) is
        missing, so a partial pull is never mistaken for a complete image.
        """
        r = refmod.parse(ref) if isinstance(ref, str) else ref
        if r.digest:
            top = r.digest
        else:
            top = self.lookup(r)
            if top is None:
                raise CacheMiss(f"{r} is not in the cache {self.root}")
        if not self.has_blob(top):
            raise CacheMiss(f"{r}: manifest {top} is not in the cache {self.root}")
        return self.image_from_manifest(str(r), top, arch)

    def image_from_manifest(self, ref: str, top: str, arch: str) -> ImageInfo:
        doc = self.read_json(top)
        index_digest = None
        mt = media_type_of(doc)
        if mt in INDEX_TYPES:
            index_digest = top
            desc = select_platform(doc, arch, ref)
            top = check_digest(desc.get("digest"), ref)
            if not self.has_blob(top):
                raise CacheMiss(f"{ref}: linux/{arch} manifest {top} is not in the cache {self.root}")
            doc = self.read_json(top)
            mt = media_type_of(doc)
        if mt not in MANIFEST_TYPES:
            raise ImageError(f"unsupported manifest media type {mt!r}", image=ref)
        try:
            cdesc = doc["config"]
            layers = [Layer(check_digest(ld["digest"], ref), ld["mediaType"], int(ld["size"])) for ld in doc.get("layers") or []]
        except (KeyError, TypeError, ValueError) as e:
            raise ImageError(f"manifest {top} is malformed: {e!r}", image=ref) from None
        cdigest = check_digest(cdesc.get("digest"), ref)
        if not self.has_blob(cdigest):
            raise CacheMiss(f"{ref}: config {cdigest} is not in the cache {self.root}")
        for layer in layers:
            if not self.has_blob(layer.digest):
                raise CacheMiss(f"{ref}: layer {layer.digest} is not in the cache {self.root}")
        config = self.read_json(cdigest)
        have = config.get("architecture")
        if index_digest is None and have and have != arch.partition("/")[0]:
            # a single-platform image for another architecture would build an image that cannot run
            raise ImageError(f"image is linux/{have}, not linux/{arch}", image=ref)
        return ImageInfo(ref=ref, digest=top, index_digest=index_digest, config=config, layers=layers)

    def _reachable(self, digest: str, seen: set[str]) -> None:
        if digest in seen or not self.has_blob(digest):
            return
        seen.add(digest)
        try:
            doc = self.read_json(digest)
        except ImageError:
            return
        for d in doc.get("manifests") or []:
            if isinstance(d, dict) and isinstance(d.get("digest"), str):
                self._reachable(d["digest"], seen)
        for d in [doc.get("config")] + list(doc.get("layers") or []):
            if isinstance(d, dict) and isinstance(d.get("digest"), str) and self.has_blob(d["digest"]):
                seen.add(d["digest"])

    def images(self) -> list[tuple[str, str, int]]:
        """(ref, digest, bytes) for every tag; bytes counts the blobs of the image held locally."""
        out = []
        for m in self._read_index():
            name = (m.get("annotations") or {}).get(REF_NAME)
            digest = m.get("digest")
            if not name or not isinstance(digest, str):
                continue
            seen: set[str] = set()
            try:
                self._reachable(digest, seen)
            except ImageError:
                pass
            out.append((name, digest, sum(self._path(d).stat().st_size for d in seen)))
        return sorted(out)

    def clean_tmp(self) -> None:
        """Remove leftovers of interrupted writes (safe only when no other process is writing)."""
        shutil.rmtree(self.root / "tmp", ignore_errors=True)
