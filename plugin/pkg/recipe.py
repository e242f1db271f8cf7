"""A package recipe (``specs/pkgs/NAME/build.yml``): which Debian packages make an image, which of
their paths to keep, what to add from the recipe directory, and the image's config and LinuxKit
label. Validated by hand field by field so every error names ``file:line: field``.

Fields (all optional but at least one source of content):
    name: str                         image name (default: the directory name); ref is mobykit/<name>
    packages: [str]                   Debian packages, "name" or "name=version"
    keep: [glob]                      paths of the packages to keep (default all); a directory keeps its subtree
    libs_for: [path]                  ELF binaries whose shared libraries (and loader) are kept too
    busybox_applets: path             a busybox binary: add a symlink for every applet it has
    kernel: {package: str, modules: [str]}   see mobykit.pkg.kernel
    files: [{source, dest, mode, uid, gid}]  copy a file or directory of the recipe dir into the image
    symlinks: {path: target}
    remove: [path]                    drop paths (and subtrees) at the end
    entrypoint / cmd / env: [str]; workingdir: str; user: str
    label: mapping                    the org.mobyproject.config label (LinuxKit's service config)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mobykit.core import paths
from mobykit.errors import SpecError
from mobykit.spec.yamlfile import Document, parse

FIELDS = {
    "name", "packages", "keep", "libs_for", "busybox_applets", "kernel", "files", "symlinks", "remove",
    "entrypoint", "cmd", "env", "workingdir", "user", "label",
}  # fmt: skip
_NAME = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*$")
_PKG = re.compile(r"^[a-z0-9][a-z0-9+.-]+(?:=[A-Za-z0-9.+~:-]+)?$")
_MODULE = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class FileSpec:
    source: Path  # absolute, inside the recipe directory
    dest: str  # image path, no leading slash ("" = the root)
    mode: int | None = None
    uid: int = 0
    gid: int = 0


@dataclass
class KernelSpec:
    package: str
    modules: list[str] = field(default_factory=list)


@dataclass
class Recipe:
    dir: Path
    file: str
    name: str
    packages: list[str] = field(default_factory=list)
    keep: list[str] = field(default_factory=list)
    libs_for: list[str] = field(default_factory=list)
    busybox_applets: str | None = None
    kernel: KernelSpec | None = None
    files: list[FileSpec] = field(default_factory=list)
    symlinks: dict[str, str] = field(default_factory=dict)
    remove: list[str] = field(default_factory=list)
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: list[str] = field(default_factory=list)
    workingdir: str = ""
    user: str = ""
    label: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def repository(self) -> str:
        return f"mobykit/{self.name}"


def _image_path(doc: Document, value: Any, where: tuple) -> str:
    if not isinstance(value, str) or not value.strip():
        raise doc.error("must be a non-empty path", where)
    parts = [p for p in value.split("/") if p and p != "."]
    if ".." in parts:
        raise doc.error(f"{value!r}: '..' is not allowed in an image path", where)
    return "/".join(parts)


def _str_list(doc: Document, data: dict, key: str, pattern: re.Pattern | None = None) -> list[str]:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise doc.error("must be a list of strings", (key,))
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise doc.error("must be a non-empty string", (key, i))
        if pattern is not None and not pattern.match(item):
            raise doc.error(f"{item!r} is not a valid name", (key, i))
    return list(value)


def _file_specs(doc: Document, data: dict, base: Path) -> list[FileSpec]:
    value = data.get("files")
    if value is None:
        return []
    if not isinstance(value, list):
        raise doc.error("must be a list of {source, dest}", ("files",))
    out = []
    for i, item in enumerate(value):
        where = ("files", i)
        if not isinstance(item, dict):
            raise doc.error("must be a mapping with source and dest", where)
        extra = set(item) - {"source", "dest", "mode", "uid", "gid"}
        if extra:
            raise doc.error(f"unknown field {sorted(extra)[0]!r}", (*where, sorted(extra)[0]))
        src = item.get("source")
        if not isinstance(src, str) or not src or Path(src).is_absolute() or ".." in Path(src).parts:
            raise doc.error("must be a relative path inside the recipe directory", (*where, "source"))
        path = base / src
        if not paths.current().allows(Path(os.path.realpath(path.parent)) / path.name):
            # A symlinked directory on the way out of the recipe: a server must not copy from it.
            # (A symlink as the last component is copied as a link, never followed.)
            raise doc.error(f"{src}: leads outside the paths this server may read "
                            f"({paths.current().describe()})", (*where, "source"))
        if not path.exists() and not path.is_symlink():
            raise doc.error(f"{path} does not exist", (*where, "source"))
        dest = item.get("dest", "/")
        dest_clean = "" if dest in ("/", "") else _image_path(doc, dest, (*where, "dest"))
        mode = item.get("mode")
        if mode is not None:
            if isinstance(mode, str) and re.fullmatch(r"0?[0-7]{3,4}", mode):
                mode = int(mode, 8)
            elif not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o7777:
                raise doc.error('must be an octal string such as "0755"', (*where, "mode"))
        ids = {}
        for k in ("uid", "gid"):
            v = item.get(k, 0)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise doc.error("must be a non-negative integer", (*where, k))
            ids[k] = v
        out.append(FileSpec(path, dest_clean, mode, ids["uid"], ids["gid"]))
    return out


def load(recipe_dir: Path | str) -> Recipe:
    """Read and validate ``recipe_dir/build.yml`` (or a path to the build.yml itself)."""
    p = Path(recipe_dir)
    path = p if p.name == "build.yml" or p.is_file() else p / "build.yml"
    shown = str(path)
    try:
        text = paths.read_bytes(path, "package recipe")
    except OSError as e:
        raise SpecError(f"cannot read recipe: {e.strerror}", file=shown) from None
    doc = parse(text, shown)
    data = doc.data
    if not isinstance(data, dict):
        raise SpecError("a recipe must be a YAML mapping", file=shown, line=1)
    for key in data:
        if key not in FIELDS:
            raise doc.error(f"unknown field (known: {', '.join(sorted(FIELDS))})", (key,))
    base = path.parent.resolve()
    name = data.get("name", base.name)
    if not isinstance(name, str) or not _NAME.match(name):
        raise doc.error(f"{name!r} is not a valid image name (lowercase letters, digits, . _ -)", ("name",))
    r = Recipe(dir=base, file=shown, name=name, raw=data)
    r.packages = _str_list(doc, data, "packages", _PKG)
    r.keep = [_image_path(doc, k, ("keep", i)) for i, k in enumerate(_str_list(doc, data, "keep"))]
    r.libs_for = [_image_path(doc, k, ("libs_for", i)) for i, k in enumerate(_str_list(doc, data, "libs_for"))]
    r.remove = [_image_path(doc, k, ("remove", i)) for i, k in enumerate(_str_list(doc, data, "remove"))]
    if "busybox_applets" in data:
        r.busybox_applets = _image_path(doc, data["busybox_applets"], ("busybox_applets",))
    if "kernel" in data:
        k = data["kernel"]
        if not isinstance(k, dict) or not isinstance(k.get("package"), str) or not _PKG.match(k["package"]):
            raise doc.error("must be a mapping with package: <Debian kernel package>", ("kernel", "package"))
        extra = set(k) - {"package", "modules"}
        if extra:
            raise doc.error("unknown field", ("kernel", sorted(extra)[0]))
        mods = k.get("modules") or []
        if not isinstance(mods, list):
            raise doc.error("must be a list of module names", ("kernel", "modules"))
        for i, m in enumerate(mods):
            if not isinstance(m, str) or not _MODULE.match(m):
                raise doc.error(f"{m!r} is not a module name", ("kernel", "modules", i))
        r.kernel = KernelSpec(k["package"], [m.replace("-", "_") for m in mods])
    r.files = _file_specs(doc, data, base)
    links = data.get("symlinks") or {}
    if not isinstance(links, dict):
        raise doc.error("must be a mapping of path: target", ("symlinks",))
    for k, v in links.items():
        if not isinstance(v, str) or not v:
            raise doc.error("target must be a non-empty string", ("symlinks", k))
        r.symlinks[_image_path(doc, k, ("symlinks", k))] = v
    for key in ("entrypoint", "cmd"):
        if key in data:
            setattr(r, key, _str_list(doc, data, key))
    r.env = _str_list(doc, data, "env")
    for i, e in enumerate(r.env):
        if "=" not in e:
            raise doc.error(f"{e!r} is not NAME=value", ("env", i))
    for key in ("workingdir", "user"):
        v = data.get(key, "")
        if not isinstance(v, str):
            raise doc.error("must be a string", (key,))
        setattr(r, key, v)
    if "label" in data:
        if not isinstance(data["label"], dict):
            raise doc.error("must be a mapping (the org.mobyproject.config label)", ("label",))
        r.label = data["label"]
    if not (r.packages or r.kernel or r.files or r.symlinks):
        raise SpecError("a recipe needs packages, kernel, files or symlinks", file=shown, line=1)
    if (r.keep or r.libs_for or r.busybox_applets) and not r.packages:
        raise doc.error("needs packages to take paths from", ("packages",))
    return r
