"""``mobykit pkg build``: a recipe -> an OCI image in the mobykit cache, tagged by content.

The tag is a hash of everything the image is made from — the recipe, every file in the recipe
directory, the exact Debian package versions and their sha256 from apt's index, and this
builder's format version — and it is known before anything is downloaded. So an unchanged recipe
is answered from the cache in the time apt-cache takes, and the same inputs always give the same
tag and (the layer tar being canonical and gzip's header fixed) the same image digest.

The tag names an OCI index of the image and an SPDX attestation listing the Debian packages the
recipe unpacked (``recipe_sbom``), in BuildKit's shape: ``mobykit build`` reads it as it reads the
SBOMs of images pulled from registries and merges it into the image's SBOM.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from mobykit.errors import BuildError, CacheMiss, ImageError
from mobykit.image import sbom_oci
from mobykit.image.cache import OCI_CONFIG, OCI_MANIFEST, Cache
from mobykit.image.sbom_spdx import DOCUMENT_ID, Document, namespace, spdx_time
from mobykit.image.tree import Entry, FileContent, Tree, write_tar
from mobykit.pkg import apt, kernel
from mobykit.pkg import recipe as recipe_mod
from mobykit.pkg.trees import deb_tree, dir_tree, filtered, keep_paths, materialize, resolve_link

# /2: images are an index with an SPDX attestation of the Debian packages (mobykit.image.sbom_oci)
BUILDER_VERSION = "mobykit-pkg/2"
LABEL = "org.mobyproject.config"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ARCH = "amd64"
_LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib", "usr/lib")


@dataclass
class PkgResult:
    ref: str  # mobykit/NAME:TAG, as a spec writes it
    digest: str  # the image manifest's digest (the tag names an index of it and its SBOM attestation)
    rebuilt: bool


def _json(doc: object) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def deb_cache_dir(cache: Cache) -> Path:
    env = os.environ.get("MOBYKIT_DEB_CACHE")
    return Path(env) if env else cache.root / "debs"


def _recipe_files(r: recipe_mod.Recipe) -> dict[str, str]:
    """sha256 (or link target) and executable bit of every file in the recipe directory."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(r.dir):
        dirnames.sort()
        for fn in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            p = Path(dirpath) / fn
            rel = p.relative_to(r.dir).as_posix()
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = apt.sha256_file(p) + (":x" if os.access(p, os.X_OK) else "")
    return out


def resolve_packages(r: recipe_mod.Recipe, memo: Path) -> tuple[list[apt.Package], apt.Package | None]:
    """Exact records for the recipe's packages, and (kernel recipes) the real kernel package."""
    found = apt.resolve_cached(r.packages + ([r.kernel.package] if r.kernel else []), memo)
    pkgs, kpkg = found[: len(r.packages)], None
    if r.kernel is not None:
        kpkg = found[-1]
        real = [d for d in apt.depends_matching(kpkg, "linux-image-") if re.match(r"linux-image-\d", d)]
        if real:  # a metapackage such as linux-image-cloud-amd64: follow it to the versioned one
            kpkg = apt.resolve_cached([real[0]], memo)[0]
    return pkgs, kpkg


def input_hash(r: recipe_mod.Recipe, pkgs: list[apt.Package], kpkg: apt.Package | None) -> str:
    doc = {
        "builder": BUILDER_VERSION,
        "zlib": zlib.ZLIB_RUNTIME_VERSION,
        "recipe": r.raw,
        "name": r.name,
        "files": _recipe_files(r),
        "packages": [[p.name, p.version, p.arch, p.sha256] for p in pkgs],
        "kernel": [kpkg.name, kpkg.version, kpkg.arch, kpkg.sha256, kernel.FORMAT] if kpkg else None,
    }
    return hashlib.sha256(_json(doc)).hexdigest()


def _needed_libs(binary: Path) -> tuple[list[str], str | None]:
    """(sonames, interpreter) ``ldd`` reports for ``binary``. ldd is the loader's own answer; a
    soname the host lacks still shows up (as "not found"), which is all we need."""
    r = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    text = r.stdout + r.stderr
    if "not a dynamic executable" in text:
        return [], None
    names, interp = [], None
    for line in text.splitlines():
        line = line.strip()
        if "=>" in line:
            name = line.split("=>")[0].strip()
            if not name.startswith("linux-vdso"):
                names.append(name)
        elif line.startswith("/"):
            interp = line.split()[0]
    return names, interp


def _add_libs(full: Tree, out: Tree, binaries: list[str], scratch: Path, where: str) -> None:
    seen: set[str] = set()
    todo = list(binaries)
    while todo:
        path = todo.pop(0)
        final, _ = resolve_link(full, path)
        if final in seen:
            continue
        seen.add(final)
        e = full.get(final)
        if e is None or e.type != "file":
            raise BuildError(f"{where}: libs_for: {path} is not a file in the packages")
        names, interp = _needed_libs(materialize(e, scratch / "ldd" / final))
        keep = []
        if interp:
            keep.append(interp.lstrip("/"))
        for soname in names:
            found = next((f"{d}/{soname}" for d in _LIB_DIRS if f"{d}/{soname}" in full), None)
            if found is None:
                raise BuildError(f"{where}: {path} needs {soname}, which none of the packages provides")
            keep.append(found)
            todo.append(found)
        keep_paths(full, out, keep, where)


def _busybox_links(out: Tree, binary: str, scratch: Path, where: str) -> None:
    e = out.get(binary)
    if e is None or e.type != "file":
        raise BuildError(f"{where}: busybox_applets: {binary} is not a kept file")
    exe = materialize(e, scratch / "busybox")
    r = subprocess.run([str(exe), "--list-full"], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise BuildError(f"{where}: {binary} --list-full failed: {r.stderr.strip()}")
    for applet in sorted(r.stdout.split()):
        path = applet.strip("/")
        if path and path != binary and path not in out:
            out.add_symlink(path, "/" + binary)


def _assemble(r: recipe_mod.Recipe, pkgs: list[apt.Package], kpkg: apt.Package | None, debs: Path,
              work: Path) -> Tree:
    where = r.file
    full = Tree()
    for p in pkgs:
        full.graft("", deb_tree(apt.download(p, debs), work))
    tree = filtered(full, r.keep) if r.keep else full
    if r.libs_for:
        keep_paths(full, tree, r.libs_for, f"{where}: libs_for")
        _add_libs(full, tree, r.libs_for, work, where)
    if r.busybox_applets:
        _busybox_links(tree, r.busybox_applets, work, where)
    if kpkg is not None and r.kernel is not None:
        kwork = work / "kernel"
        kwork.mkdir()
        parts = kernel.build(deb_tree(apt.download(kpkg, debs), kwork), r.kernel.modules, kwork, where)
        for name, path in (("kernel", parts.vmlinuz), ("kernel.tar", parts.kernel_tar)):
            size = path.stat().st_size
            tree.add(Entry(path=name, type="file", mode=0o644, size=size, source=FileContent(path, 0, size)))
    for f in r.files:
        tree.graft("", dir_tree(f.source, f.dest, mode=f.mode, uid=f.uid, gid=f.gid))
    for path, target in sorted(r.symlinks.items()):
        tree.add_symlink(path, target)
    for path in r.remove:
        tree.remove(path)
    return tree


def image_config(r: recipe_mod.Recipe, diff_id: str) -> dict:
    cfg: dict = {"Env": r.env if any(e.startswith("PATH=") for e in r.env) else [DEFAULT_PATH, *r.env]}
    if r.entrypoint is not None:
        cfg["Entrypoint"] = r.entrypoint
    if r.cmd is not None:
        cfg["Cmd"] = r.cmd
    if r.workingdir:
        cfg["WorkingDir"] = r.workingdir
    if r.user:
        cfg["User"] = r.user
    if r.label is not None:
        cfg["Labels"] = {LABEL: json.dumps(r.label, sort_keys=True, separators=(",", ":"))}
    return {
        "architecture": ARCH,
        "os": "linux",
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": f"mobykit pkg build {r.name}"}],
    }


def recipe_sbom(r: recipe_mod.Recipe, ref: str, pkgs: list[apt.Package], kpkg: apt.Package | None,
                key: str) -> dict:
    """The SPDX document of what the recipe unpacked: every Debian package (the kernel's too),
    described by the document. It becomes the image's attestation, which ``mobykit build`` merges
    into the SBOM of every image using this one. Its namespace comes from the recipe's input hash
    and its date is 1970 like the layer's, so the same inputs give the same attestation digest."""
    doc = Document(name=ref, namespace=namespace(f"mobykit-pkg-{r.name}", key), created=spdx_time(0))
    for pkg in dict.fromkeys([*pkgs, *([kpkg] if kpkg else [])]):
        spdx = pkg.spdx()
        doc.packages.append(spdx.to_json())
        doc.relate(DOCUMENT_ID, "DESCRIBES", spdx.spdx_id)
    return doc.to_json()


def cached(cache: Cache, ref: str) -> str | None:
    """The manifest digest if ``ref`` is complete in the cache."""
    try:
        return cache.resolve(ref, ARCH).digest
    except (CacheMiss, ImageError):
        return None


def build(recipe_dir: Path | str, *, cache: Cache | None = None, force: bool = False, progress=None) -> PkgResult:
    """Build (or find in the cache) the image of one recipe."""
    cache = cache or Cache()
    r = recipe_mod.load(recipe_dir)
    debs = deb_cache_dir(cache)
    pkgs, kpkg = resolve_packages(r, debs / "resolved.json")
    key = input_hash(r, pkgs, kpkg)
    tag = key[:20]
    ref = f"{r.repository}:{tag}"
    if not force and (digest := cached(cache, ref)):
        return PkgResult(ref, digest, rebuilt=False)
    work = Path(tempfile.mkdtemp(dir=cache.tmpdir(), prefix=f"pkg-{r.name}-"))
    try:
        tree = _assemble(r, pkgs, kpkg, debs, work)
        layer = work / "layer.tar.gz"
        with open(layer, "wb") as raw:
            # filename="" and mtime=0: the gzip header then holds nothing that varies between runs
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
                diff_id = "sha256:" + write_tar(tree, gz, mtime=0)
        with open(layer, "rb") as f:
            layer_digest = cache.write_blob(f)
        config = _json(image_config(r, diff_id))
        config_digest = cache.write_blob(config)
        manifest = _json({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": LAYER_GZIP, "digest": layer_digest, "size": layer.stat().st_size}],
            "annotations": {"org.opencontainers.image.ref.name": tag, "org.mobyproject.recipe": r.name},
        })
        digest = cache.write_blob(manifest)
        # The tag names an index of the image and its SBOM attestation, as BuildKit writes them
        cache.tag(ref, sbom_oci.attach(cache, digest, ref, recipe_sbom(r, ref, pkgs, kpkg, key), ARCH))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return PkgResult(ref, digest, rebuilt=True)


def find_recipes(root: Path | str) -> list[Path]:
    """Every recipe directory directly under ``root`` (for --all)."""
    return sorted(p.parent for p in Path(root).glob("*/build.yml"))
