"""Importing images into the cache from files: OCI layouts (directory or tar) and ``docker save``.

This is how images get into an offline build machine. Archives are untrusted input: nothing is
ever extracted to disk; entries are read in place, every path is normalised and refused if it
would leave the archive (absolute, ``..``, links pointing outside), and every blob is checked
against its digest before it is renamed into the cache. Errors name the file and the entry.

``docker save`` output is not content-addressed the OCI way, so it is converted: the config is
stored as-is (its file name is its digest), each ``layer.tar`` is stored as-is with the
*uncompressed* OCI layer media type and verified against the config's ``rootfs.diff_ids``, and a
deterministic OCI manifest is written over them (same tarball -> same manifest digest).
"""

from __future__ import annotations

import abc
import json
import posixpath
import re
import tarfile
from pathlib import Path
from typing import BinaryIO

from mobykit.errors import ImageError, InvalidArgument, MobykitError
from mobykit.image import reference as refmod
from mobykit.image.cache import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_CONFIG,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    REF_NAME,
    Cache,
    media_type_of,
)

CONTAINERD_NAME = "io.containerd.image.name"
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_MAX_JSON = 16 << 20  # manifest.json / index.json / image configs: refuse absurd sizes


def _safe_rel(path: str, label: str, what: str) -> str:
    """Normalise an in-archive path; refuse anything that could address outside the archive."""
    if not isinstance(path, str) or not path or "\x00" in path:
        raise ImageError(f"{what}: invalid path {path!r}", image=label)
    p = path.replace("\\", "/")
    if p.startswith("/"):
        raise ImageError(f"{what}: absolute path {path!r} refused", image=label)
    norm = posixpath.normpath(p)
    if norm == ".." or norm.startswith("../"):
        raise ImageError(f"{what}: path {path!r} escapes the archive", image=label)
    return norm


class _Source(abc.ABC):
    """Where an archive's files are read from: a directory or a tar (the two importers share the
    layout logic and differ only here)."""

    label: str

    @abc.abstractmethod
    def exists(self, rel: str) -> bool: ...

    @abc.abstractmethod
    def open(self, rel: str, what: str) -> tuple[BinaryIO, int]: ...

    def read_json(self, rel: str, what: str):
        f, size = self.open(rel, what)
        with f:
            if size > _MAX_JSON:
                raise ImageError(f"{what}: {rel} is too large ({size} bytes) for a JSON document", image=self.label)
            data = f.read()
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ImageError(f"{rel}: not valid JSON: {e}", image=self.label) from None

    @abc.abstractmethod
    def identity(self, rel: str, what: str) -> str:
        """What ``rel`` finally names after following links (to compare two entries)."""

    def close(self) -> None:  # noqa: B027 - a directory holds nothing open; the tar source closes its file
        return None


class _DirSource(_Source):
    def __init__(self, root: Path):
        self.root = root.resolve()
        self.label = str(root)

    def _resolve(self, rel: str, what: str) -> Path:
        rel = _safe_rel(rel, self.label, what)
        p = (self.root / rel).resolve()
        if p != self.root and self.root not in p.parents:
            raise ImageError(f"{what}: {rel} is a link leading outside the directory", image=self.label)
        return p

    def exists(self, rel: str) -> bool:
        return self._resolve(rel, rel).is_file()

    def open(self, rel: str, what: str) -> tuple[BinaryIO, int]:
        p = self._resolve(rel, what)
        if not p.is_file():
            raise ImageError(f"{what}: {rel} is missing or not a regular file", image=self.label)
        return open(p, "rb"), p.stat().st_size

    def identity(self, rel: str, what: str) -> str:
        return str(self._resolve(rel, what))


class _TarSource(_Source):
    def __init__(self, path: Path):
        self.label = str(path)
        try:
            self.tf = tarfile.open(path, "r:*")
            members = self.tf.getmembers()
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ImageError(f"not a readable tar archive: {e}", image=self.label) from None
        self.members: dict[str, tarfile.TarInfo] = {}
        for m in members:
            name = _safe_rel(m.name, self.label, f"entry {m.name!r}")
            if m.issym() or m.islnk():
                target = m.linkname if m.islnk() else posixpath.join(posixpath.dirname(name), m.linkname)
                _safe_rel(target, self.label, f"entry {m.name!r} (link to {m.linkname!r})")
            self.members[name] = m

    def _member(self, rel: str, what: str, depth: int = 0) -> tarfile.TarInfo:
        rel = _safe_rel(rel, self.label, what)
        m = self.members.get(rel)
        if m is None:
            raise ImageError(f"{what}: entry {rel} is missing from the archive", image=self.label)
        if depth > 16:
            raise ImageError(f"{what}: entry {rel}: too many levels of links", image=self.label)
        if m.issym():
            return self._member(posixpath.join(posixpath.dirname(rel), m.linkname), what, depth + 1)
        if m.islnk():
            return self._member(m.linkname, what, depth + 1)
        if not m.isreg():
            raise ImageError(f"{what}: entry {rel} is not a regular file", image=self.label)
        return m

    def exists(self, rel: str) -> bool:
        try:
            self._member(rel, rel)
            return True
        except ImageError:
            return False

    def open(self, rel: str, what: str) -> tuple[BinaryIO, int]:
        m = self._member(rel, what)
        f = self.tf.extractfile(m)
        assert f is not None  # regular member
        return f, m.size

    def identity(self, rel: str, what: str) -> str:
        return self._member(rel, what).name

    def close(self) -> None:
        self.tf.close()


def _open_source(path: Path) -> _Source:
    if path.is_dir():
        return _DirSource(path)
    if path.is_file():
        return _TarSource(path)
    raise InvalidArgument(f"{path}: no such file or directory")


class _Importer:
    def __init__(self, cache: Cache, src: _Source, name: str | None, progress):
        self.cache, self.src, self.name = cache, src, name
        self.task = progress.task(f"import {Path(src.label).name}", None) if progress is not None else None

    def _copy_blob(self, desc: dict, what: str) -> str:
        """Copy the blob a descriptor names from blobs/sha256/<hex>, verifying digest and size."""
        digest, size = desc.get("digest"), desc.get("size")
        if not isinstance(digest, str) or not digest.startswith("sha256:") or not _HEX64.match(digest[7:]):
            raise ImageError(f"{what}: unsupported or malformed digest {digest!r}", image=self.src.label)
        if not isinstance(size, int) or size < 0:
            raise ImageError(f"{what}: descriptor {digest} has no valid size", image=self.src.label)
        if self.cache.has_blob(digest):
            return digest
        rel = f"blobs/sha256/{digest[7:]}"
        f, actual = self.src.open(rel, what)
        with f:
            if actual != size:
                raise ImageError(f"{what}: entry {rel} is {actual} bytes, descriptor says {size}", image=self.src.label)
            try:
                self.cache.write_blob(f, expected=digest, size=size, progress=self.task)
            except ImageError as e:
                raise ImageError(f"{what}: entry {rel}: {e.message}", image=self.src.label) from None
        return digest

    def _copy_tree(self, desc: dict, what: str) -> None:
        digest = self._copy_blob(desc, what)
        doc = self.cache.read_json(digest)
        mt = media_type_of(doc)
        if mt in INDEX_TYPES:
            for i, child in enumerate(doc.get("manifests") or []):
                if not isinstance(child, dict):
                    raise ImageError(f"{what}: manifests[{i}] is not an object", image=self.src.label)
                cdig = child.get("digest", "")
                # multi-platform layouts often hold only some platforms: copy those present
                if isinstance(cdig, str) and not self.cache.has_blob(cdig) and not self.src.exists(f"blobs/sha256/{cdig[7:]}"):
                    continue
                self._copy_tree(child, f"{what} -> {cdig}")
        elif mt in MANIFEST_TYPES:
            config = doc.get("config")
            if not isinstance(config, dict):
                raise ImageError(f"{what}: manifest {digest} has no config", image=self.src.label)
            self._copy_blob(config, f"{what}: config")
            for i, layer in enumerate(doc.get("layers") or []):
                if not isinstance(layer, dict):
                    raise ImageError(f"{what}: layers[{i}] is not an object", image=self.src.label)
                self._copy_blob(layer, f"{what}: layers[{i}]")
        else:
            raise ImageError(f"{what}: unsupported media type {mt!r}", image=self.src.label)

    def _ref_for(self, desc: dict, what: str) -> str | None:
        ann = desc.get("annotations") or {}
        full = ann.get(CONTAINERD_NAME)
        if full:
            return str(refmod.parse(full))
        value = ann.get(REF_NAME)
        if value and ("/" in value or "@" in value):
            return str(refmod.parse(value))
        if value:
            if not self.name:
                raise ImageError(f"{what}: {REF_NAME} {value!r} is only a tag; give the repository with --name",
                                 image=self.src.label)
            base = refmod.parse(self.name)
            return str(refmod.parse(f"{base.name}:{value}"))
        return str(refmod.parse(self.name)) if self.name else None

    def oci(self) -> list[tuple[str | None, str]]:
        layout = self.src.read_json("oci-layout", "oci-layout")
        if not isinstance(layout, dict) or not layout.get("imageLayoutVersion"):
            raise ImageError("oci-layout: no imageLayoutVersion", image=self.src.label)
        index = self.src.read_json("index.json", "index.json")
        manifests = index.get("manifests") if isinstance(index, dict) else None
        if not isinstance(manifests, list):
            raise ImageError("index.json: manifests: must be a list", image=self.src.label)
        plan = []
        for i, desc in enumerate(manifests):
            what = f"index.json: manifests[{i}]"
            if not isinstance(desc, dict):
                raise ImageError(f"{what}: not an object", image=self.src.label)
            plan.append((self._ref_for(desc, what), desc, what))  # refs checked before anything is copied
        out = []
        for ref, desc, what in plan:
            self._copy_tree(desc, what)
            out.append((ref, desc["digest"]))
        return out

    def _legacy_tags(self, layers: list, what: str) -> list[str]:
        """Tags from the legacy ``repositories`` file ({repo: {tag: top layer id}}), used only when
        manifest.json has no RepoTags: the id names the directory whose layer.tar is the top layer."""
        if not layers or not self.src.exists("repositories"):
            return []
        repos = self.src.read_json("repositories", "repositories")
        if not isinstance(repos, dict):
            raise ImageError("repositories: must be an object", image=self.src.label)
        top = self.src.identity(layers[-1], f"{what}: Layers[{len(layers) - 1}]")
        out = []
        for repo, tags in sorted(repos.items()):
            for tag, layer_id in sorted((tags or {}).items()):
                rel = f"{layer_id}/layer.tar"
                if isinstance(layer_id, str) and self.src.exists(rel) and self.src.identity(rel, "repositories") == top:
                    out.append(str(refmod.parse(f"{repo}:{tag}")))
        return out

    def docker_save(self) -> list[tuple[str | None, str]]:
        manifest = self.src.read_json("manifest.json", "manifest.json")
        if not isinstance(manifest, list):
            raise ImageError("manifest.json: must be a list", image=self.src.label)
        out = []
        for i, entry in enumerate(manifest):
            what = f"manifest.json[{i}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
                raise ImageError(f"{what}: Config: missing", image=self.src.label)
            layers = entry.get("Layers") or []
            tags = entry.get("RepoTags") or []
            if not isinstance(layers, list) or not isinstance(tags, list):
                raise ImageError(f"{what}: Layers and RepoTags must be lists", image=self.src.label)
            refs = [str(refmod.parse(t)) for t in tags] or self._legacy_tags(layers, what)
            if not refs and self.name:
                refs = [str(refmod.parse(self.name))]
            cfg_rel = _safe_rel(entry["Config"], self.src.label, f"{what}: Config")
            stem = posixpath.basename(cfg_rel).removesuffix(".json")
            expected = f"sha256:{stem}" if _HEX64.match(stem) else None
            f, size = self.src.open(cfg_rel, f"{what}: Config")
            with f:
                if size > _MAX_JSON:
                    raise ImageError(f"{what}: Config {cfg_rel} is too large", image=self.src.label)
                cfg_bytes = f.read()
            try:
                config_digest = self.cache.write_blob(cfg_bytes, expected=expected)
                config = json.loads(cfg_bytes)
                diff_ids = config["rootfs"]["diff_ids"]
            except ImageError as e:
                raise ImageError(f"{what}: entry {cfg_rel}: {e.message}", image=self.src.label) from None
            except (ValueError, KeyError, TypeError):
                raise ImageError(f"{what}: entry {cfg_rel}: not an image config with rootfs.diff_ids",
                                 image=self.src.label) from None
            if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
                raise ImageError(f"{what}: {len(layers)} Layers but the config lists "
                                 f"{len(diff_ids) if isinstance(diff_ids, list) else 'no'} diff_ids", image=self.src.label)
            descs = []
            for j, (rel, diff_id) in enumerate(zip(layers, diff_ids, strict=True)):
                lwhat = f"{what}: Layers[{j}]"
                rel = _safe_rel(rel, self.src.label, lwhat)
                lf, lsize = self.src.open(rel, lwhat)
                with lf:
                    try:
                        digest = self.cache.write_blob(lf, expected=diff_id, size=lsize, progress=self.task)
                    except ImageError as e:
                        raise ImageError(f"{lwhat}: entry {rel}: {e.message}", image=self.src.label) from None
                descs.append({"mediaType": OCI_LAYER_TAR, "digest": digest, "size": lsize})
            doc = {
                "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(cfg_bytes)},
                "layers": descs,
            }
            mdigest = self.cache.write_blob(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())
            out.extend([(r, mdigest) for r in refs] or [(None, mdigest)])
        return out


def import_path(cache: Cache, path: Path | str, *, name: str | None = None, progress=None) -> list[tuple[str | None, str]]:
    """Import an OCI layout directory, an OCI archive (a tar of one, optionally compressed) or a
    ``docker save`` tarball/directory into ``cache`` and tag what it names.

    ``name`` gives the repository (or full reference) for images the source names only by a tag
    or not at all. Returns (ref or None, digest) per image. Tags are written only after every blob
    of every image in the source has been verified, so a bad archive tags nothing.
    """
    path = Path(path)
    if name is not None:
        refmod.parse(name)  # fail on a bad --name before reading anything
    src = _open_source(path)
    imp = _Importer(cache, src, name, progress)
    try:
        if src.exists("oci-layout") and src.exists("index.json"):
            result = imp.oci()
        elif src.exists("manifest.json"):
            result = imp.docker_save()
        else:
            raise ImageError("neither an OCI image layout (no oci-layout/index.json) nor a docker save archive "
                             "(no manifest.json)", image=str(path))
        for ref, digest in result:
            if ref:
                cache.tag(ref, digest)
        return result
    except MobykitError:
        raise
    except (OSError, tarfile.TarError, EOFError) as e:
        raise ImageError(f"cannot read: {e}", image=str(path)) from None
    finally:
        if imp.task is not None:
            imp.task.done()
        src.close()
