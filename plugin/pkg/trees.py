"""Trees from the pieces a recipe names: a .deb's data, a directory of the recipe, a filtered tree.

Why ``dpkg-deb --fsys-tarfile`` and not ``dpkg-deb -x``: the package's own tar keeps modes,
owners and setuid bits exactly, whoever runs the build, and mobykit.image.tree reads it as a Tree
whose contents stay in that tar (nothing extracted that is not kept).
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import stat
import subprocess
from pathlib import Path

from mobykit.errors import BuildError
from mobykit.image.tree import Entry, FileContent, Tree, read_tar


def deb_tree(deb: Path, work: Path) -> Tree:
    """The filesystem of ``deb`` as a Tree backed by ``work/<deb>.tar``."""
    out = work / (deb.name + ".tar")
    with open(out, "wb") as f:
        r = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=f, stderr=subprocess.PIPE, check=False)
    if r.returncode != 0:
        raise BuildError(f"{deb}: dpkg-deb cannot read it: {r.stderr.decode(errors='replace').strip()}")
    return read_tar(out)


def materialize(entry: Entry, dest: Path) -> Path:
    """Write a file entry's bytes to ``dest`` (for tools that need a real file: ldd, modinfo)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as f:
        if entry.source is not None:
            for chunk in entry.source.chunks():
                f.write(chunk)
    os.chmod(dest, 0o755 if entry.mode & 0o111 else 0o644)
    return dest


def resolve_link(tree: Tree, path: str, limit: int = 16) -> tuple[str, list[str]]:
    """Follow symlinks inside ``tree`` (never the host); returns the final path and every link on
    the way, so keeping a library keeps its soname links too."""
    chain = []
    for _ in range(limit):
        e = tree.get(path)
        if e is None or e.type != "symlink":
            return path, chain
        chain.append(path)
        target = e.linkname
        base = "" if target.startswith("/") else posixpath.dirname(path)
        path = posixpath.normpath(posixpath.join("/", base, target)).lstrip("/")
    raise BuildError(f"{path}: too many levels of symbolic links")


def filtered(tree: Tree, patterns: list[str]) -> Tree:
    """The entries of ``tree`` matching a glob in ``patterns`` (a matched directory keeps its
    subtree). Links are kept as links; their targets only if matched too."""
    out = Tree()
    keep_dirs: list[str] = []
    for entry in tree:
        p = entry.path
        if any(p.startswith(d + "/") for d in keep_dirs) or any(fnmatch.fnmatchcase(p, pat) for pat in patterns):
            if entry.type == "dir":
                keep_dirs.append(p)
            _copy(tree, out, entry)
    return out


def _copy(src: Tree, out: Tree, entry: Entry) -> None:
    if entry.type == "hardlink":
        holder = src.get(entry.linkname)
        if entry.linkname not in out and holder is not None:
            # the link's holder was not kept: this path becomes a plain copy of it
            out.add(Entry(path=entry.path, type="file", mode=holder.mode, uid=holder.uid, gid=holder.gid,
                          size=holder.size, source=holder.source, xattrs=dict(holder.xattrs)))
            return
    out.add(entry)


def keep_paths(src: Tree, out: Tree, paths: list[str], where: str) -> None:
    """Copy ``paths`` (following symlink chains, keeping every link) from ``src`` into ``out``."""
    for path in paths:
        final, chain = resolve_link(src, path)
        for link in chain:
            out.add(src.get(link))
        e = src.get(final)
        if e is None:
            raise BuildError(f"{where}: {path} is not in the packages")
        _copy(src, out, e)


def dir_tree(root: Path, prefix: str = "", *, mode: int | None = None, uid: int = 0, gid: int = 0) -> Tree:
    """A directory (or one file) of the recipe as a Tree at ``prefix``. Modes are normalised to
    0755/0644 by the executable bit (all git keeps) unless ``mode`` is given, so a checkout's umask
    never changes the image."""
    tree = Tree()

    def add(path: Path, rel: str) -> None:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            tree.add(Entry(path=rel, type="symlink", mode=0o777, uid=uid, gid=gid, linkname=os.readlink(path)))
        elif stat.S_ISDIR(st.st_mode):
            if rel:
                tree.add_dir(rel, 0o755, uid, gid)
            for child in sorted(os.listdir(path)):
                add(path / child, f"{rel}/{child}" if rel else child)
        elif stat.S_ISREG(st.st_mode):
            m = mode if mode is not None else (0o755 if st.st_mode & 0o111 else 0o644)
            tree.add(Entry(path=rel, type="file", mode=m, uid=uid, gid=gid, size=st.st_size,
                           source=FileContent(path, 0, st.st_size)))
        else:
            raise BuildError(f"{path}: only files, directories and symlinks can be copied into an image")

    if root.is_dir() and not root.is_symlink():
        add(root, prefix)
    else:
        if not prefix:
            raise BuildError(f"{root}: a single file needs a dest path")
        add(root, prefix)
    return tree
