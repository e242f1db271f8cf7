"""Sources -> one canonical Tree, laid out as LinuxKit lays out its build tar:

- ``boot/kernel``, ``boot/cmdline``, ``boot/ucode.cpio`` from the kernel image, and the contents of
  its ``kernel.tar`` (modules) at the root;
- every ``init`` image's root filesystem at the root, later images over earlier ones;
- each ``volumes`` entry at ``containers/volumes/NAME``: ``lower/`` (empty, the image's root
  filesystem, or the image as an OCI image layout), ``merged/`` (what binds name; the init mounts
  lower there) and, unless the volume is read-only, ``tmp/`` (the init's tmpfs for the overlay's
  upper layer), as LinuxKit lays them out; a ``persistent`` volume has a ``persistent`` file
  (``rw`` / ``ro``) instead of ``tmp/``: the guest mounts the machine's disk of that name;
- one OCI bundle per onboot/service/onshutdown entry (``mobykit.image.bundle``);
- the ``files`` section, so it can override anything above;
- the SBOM (``mobykit.image.sbom``) at ``/sbom.spdx.json`` last, as ``linuxkit build`` writes it
  after everything else: it needs to know where each image was unpacked.

Each image is unpacked once however many entries use it; contents stay in the work directory
and are only referenced by the Tree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import yaml

from mobykit.core import paths
from mobykit.errors import ImageError, SpecError
from mobykit.image.bundle import add_bundle
from mobykit.image.cache import Cache, ImageInfo
from mobykit.image.sbom import SBOM_PATH, Placement
from mobykit.image.tree import Entry, FileContent, Tree

KINDS = ("onboot", "services", "onshutdown")


def local_inputs(spec) -> dict[str, str]:
    """sha256 of every local file the spec copies in (``files[].source``), keyed by its path, so a
    changed file changes the input key. A missing optional source is recorded as absent."""
    digests: dict[str, str] = {}
    for f in spec.files:
        if not f.source:
            continue
        path = Path(f.source)
        h = hashlib.sha256()
        try:
            with _open_source(f) as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        except FileNotFoundError:
            if f.optional:
                digests[str(path)] = "absent"
                continue
            raise SpecError(f"source file {path} does not exist", file=f.file, line=f.line, field=f"{f.field}.source") from None
        digests[str(path)] = "sha256:" + h.hexdigest()
    return digests


def _open_source(f):
    """A ``files:`` entry's source, opened once through the server's path policy (so a server reads
    only under its allowed roots, and a symlink swapped in after the spec was checked is caught)."""
    where = {"file": f.file, "line": f.line}
    try:
        return paths.open_file(f.source, f"{f.field}.source", **where)
    except IsADirectoryError:
        raise SpecError(f"source {f.source} is a directory; only files can be copied",
                        field=f"{f.field}.source", **where) from None
    except FileNotFoundError:
        raise
    except OSError as e:
        raise SpecError(f"cannot read source {f.source}: {e.strerror}", field=f"{f.field}.source", **where) from None


class _Unpacker:
    """Unpacks each image digest once; layer tars shared between images are decompressed once."""

    def __init__(self, cache: Cache, images: dict[str, ImageInfo], work: Path, progress):
        self.cache, self.images, self.work, self.progress = cache, images, work, progress
        self.trees: dict[str, Tree] = {}

    def __call__(self, ref: str) -> Tree:
        from mobykit.image.layers import unpack_image

        info = self.images[ref]
        if info.digest not in self.trees:
            # One work dir for all images: layers are named by digest there, so a layer that two
            # images share is decompressed once.
            task = self.progress.task(f"unpack {ref}", total=sum(layer.size for layer in info.layers) or None)
            self.trees[info.digest] = unpack_image(self.cache, info, self.work / "layers")
            task.advance(sum(layer.size for layer in info.layers))
            task.done()
        return self.trees[info.digest]


def assemble(spec, images: dict[str, ImageInfo], cache: Cache, work: Path, progress=None,
             sbom: Callable[[list[Placement]], bytes] | None = None,
             oci_volumes: dict[str, list[ImageInfo]] | None = None) -> Tree:
    """The image's tree. ``sbom`` (``mobykit.image.sbom.ImageSbom``) is given where each image
    was unpacked and returns the document to put at ``SBOM_PATH``. ``oci_volumes``: for each
    ``format: oci`` volume (by name), its image for each of its platforms, in order."""
    from mobykit.image.progress import silent

    unpack = _Unpacker(cache, images, work, progress or silent())
    tree = Tree()
    placements: list[Placement] = []
    if spec.kernel is not None:
        _add_kernel(tree, spec.kernel, unpack(spec.kernel.image), work)
        placements.append(Placement(spec.kernel.image, ""))
    for ref in spec.init:
        tree.graft("", unpack(ref))
        placements.append(Placement(ref, ""))
    for vol in spec.volumes:
        lower = f"{vol.dir}/lower"
        tree.add_dir(vol.dir, mode=0o755)
        if vol.image and vol.is_oci:
            _add_oci_layout(tree, lower, vol.image, (oci_volumes or {})[vol.name], cache)
        elif vol.image:
            tree.graft(lower, unpack(vol.image))
            placements.append(Placement(vol.image, lower))
        else:
            tree.add_dir(lower, mode=0o755)
        tree.add_dir(f"{vol.dir}/merged", mode=0o755)
        if vol.persistent:  # the guest mounts the machine's disk on merged/ (mobykit-volumes)
            tree.add_bytes(f"{vol.dir}/persistent", b"ro" if vol.readonly else b"rw", mode=0o644)
        elif not vol.readonly:
            tree.add_dir(f"{vol.dir}/tmp", mode=0o755)
    for kind in KINDS:
        for entry in getattr(spec, kind):
            rootfs = unpack(entry.image)
            add_bundle(tree, entry.prefix, entry, images[entry.image], rootfs, spec)
            # add_bundle unpacks a writable bundle's image in lower/ (the overlay's lower layer), a read-only one in rootfs/
            lower = tree.get(f"{entry.prefix}/lower")
            root = "lower" if lower is not None and lower.type == "dir" else "rootfs"
            placements.append(Placement(entry.image, f"{entry.prefix}/{root}"))
    _add_files(tree, spec, work)
    if sbom is not None:
        tree.add_bytes(SBOM_PATH, sbom(placements), mode=0o644)
    share_identical_files(tree)
    return tree


def _add_oci_layout(tree: Tree, root: str, ref: str, infos: list[ImageInfo], cache: Cache) -> None:
    """``ref`` as an OCI image layout at ``root``: ``oci-layout``, ``index.json`` naming one
    manifest per platform (annotated with the reference), and every blob those manifests need,
    referenced straight from the cache (the tar copies them; nothing is unpacked)."""
    from mobykit.image.cache import media_type_of

    tree.add_dir(root, mode=0o755)
    tree.add_bytes(f"{root}/oci-layout", b'{"imageLayoutVersion":"1.0.0"}', mode=0o644)
    manifests, blobs = [], []
    for info in infos:
        doc = cache.read_json(info.digest)
        platform = {"architecture": info.config.get("architecture", ""), "os": info.config.get("os", "linux")}
        if info.config.get("variant"):
            platform["variant"] = info.config["variant"]
        manifests.append({"mediaType": media_type_of(doc), "digest": info.digest,
                          "size": cache.blob_path(info.digest).stat().st_size, "platform": platform,
                          "annotations": {"org.opencontainers.image.ref.name": ref}})
        blobs += [info.digest, doc["config"]["digest"], *(layer.digest for layer in info.layers)]
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests}
    tree.add_bytes(f"{root}/index.json", json.dumps(index, sort_keys=True, separators=(",", ":")).encode(), mode=0o644)
    tree.add_dir(f"{root}/blobs", mode=0o755)
    for digest in dict.fromkeys(blobs):
        algo, _, hexdigest = digest.partition(":")
        if f"{root}/blobs/{algo}" not in tree:
            tree.add_dir(f"{root}/blobs/{algo}", mode=0o755)
        path = cache.blob_path(digest)
        size = path.stat().st_size
        tree.add(Entry(path=f"{root}/blobs/{algo}/{hexdigest}", type="file", mode=0o644, size=size,
                       source=FileContent(path, 0, size)))


def share_identical_files(tree: Tree, min_size: int = 4096) -> int:
    """Make files with the same bytes and metadata one hard-linked file; returns how many paths
    became links. LinuxKit links a bundle to an earlier one of the same image; matching on
    content goes further (the same busybox in five images is stored once), which makes the
    initrd smaller and the guest's copy of it to a tmpfs faster. Safe because the root is
    read-only at runtime and links share only what was equal: mode, owner, xattrs and bytes.
    Candidates are grouped by size first, so only same-size files are ever hashed."""
    from collections import defaultdict

    from mobykit.image.tree import FileCache

    by_shape: dict[tuple, list[Entry]] = defaultdict(list)
    for entry in tree:
        if entry.type == "file" and entry.size >= min_size and entry.source is not None:
            by_shape[(entry.size, entry.mode, entry.uid, entry.gid, tuple(sorted(entry.xattrs.items())))].append(entry)
    files = FileCache()
    links = []
    try:
        for group in by_shape.values():
            if len(group) < 2:
                continue
            by_digest: dict[bytes, list[str]] = defaultdict(list)
            for entry in group:
                h = hashlib.sha256()
                for chunk in entry.source.chunks(files):
                    h.update(chunk)
                by_digest[h.digest()].append(entry.path)
            for paths in by_digest.values():
                links += [(path, paths[0]) for path in paths[1:]]  # paths are in canonical order
    finally:
        files.close()
    for path, holder in links:
        tree.add(Entry(path=path, type="hardlink", mode=0, linkname=holder))
    return len(links)


def _kernel_file(kernel_tree: Tree, path: str, what: str, ref: str, required: bool) -> Entry | None:
    entry = kernel_tree.get(path.lstrip("/"))
    if entry is None or entry.type != "file":
        if required:
            raise ImageError(f"kernel image has no {what} file {path!r}", image=ref, path=path)
        return None
    return entry


def _add_kernel(tree: Tree, kernel, kernel_tree: Tree, work: Path) -> None:
    ref = kernel.image
    binary = _kernel_file(kernel_tree, kernel.binary_name or "kernel", "kernel binary", ref, True)
    tree.add(dataclasses.replace(binary, path="boot/kernel", mode=0o644, uid=0, gid=0))
    tree.add_bytes("boot/cmdline", (kernel.cmdline or "").encode(), mode=0o644)
    if kernel.tar_name:
        # The default name may be absent (a kernel image without modules); a named one must exist.
        modules = _kernel_file(kernel_tree, kernel.tar_name, "modules tar", ref, kernel.tar_name != "kernel.tar")
        if modules is not None:
            from mobykit.image.layers import unpack_tar_entry

            tree.graft("", unpack_tar_entry(modules, work / "kernel-tar", image=ref))
    if kernel.ucode:
        ucode = _kernel_file(kernel_tree, kernel.ucode, "microcode", ref, True)
        tree.add(dataclasses.replace(ucode, path="boot/ucode.cpio", mode=0o644, uid=0, gid=0))


def _add_files(tree: Tree, spec, work: Path) -> None:
    """The ``files`` section, LinuxKit's way: default modes 0600/0700, missing leading directories
    made with the entry's owner and a searchable version of its mode."""
    for i, f in enumerate(spec.files):
        path = f.path.strip("/")
        parent = path.rpartition("/")[0]
        missing = []
        while parent and parent not in tree:
            missing.append(parent)
            parent = parent.rpartition("/")[0]
        for d in reversed(missing):
            tree.add_dir(d, mode=f.parent_dir_mode, uid=f.uid, gid=f.gid)
        if f.directory:
            tree.add_dir(path, mode=f.effective_mode, uid=f.uid, gid=f.gid)
        elif f.symlink is not None:
            tree.add(Entry(path=path, type="symlink", mode=0o777, uid=f.uid, gid=f.gid, linkname=f.symlink))
        elif f.source and not f.metadata and f.contents is None:
            # Copied into the work directory from the one checked open: the tar is later written
            # from that copy, never by opening the user's path again.
            try:
                with _open_source(f) as fh:
                    copy = work / "files" / str(i)
                    copy.parent.mkdir(exist_ok=True)
                    with open(copy, "wb") as out:
                        shutil.copyfileobj(fh, out, 1 << 20)
            except FileNotFoundError:
                if f.optional:
                    continue
                raise SpecError(f"source file {f.source} does not exist", file=f.file, line=f.line,
                                field=f"{f.field}.source") from None
            size = copy.stat().st_size
            tree.add(Entry(path=path, type="file", mode=f.effective_mode, uid=f.uid, gid=f.gid, size=size,
                           source=FileContent(copy, 0, size)))
        else:
            tree.add_bytes(path, _file_contents(f, spec), mode=f.effective_mode, uid=f.uid, gid=f.gid)


def _file_contents(f, spec) -> bytes:
    if f.metadata:
        doc = spec.canonical()
        if f.metadata == "json":
            return json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"
        return yaml.safe_dump(doc, sort_keys=True, default_flow_style=False).encode()
    return (f.contents or "").encode()


__all__ = ["assemble", "local_inputs"]
