"""Spec files -> one validated, merged Spec.

Each file is read (size-capped), parsed with positions, schema- and semantics-checked, turned
into the model, then the files are merged in command-line order (mobykit.spec.merge). Checks
that need the whole picture (unique service names, uid/gid names in ``files``, a kernel section
with no image) run on the merged result. Nothing is fetched and nothing is written.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from mobykit.core import paths
from mobykit.errors import SpecError
from mobykit.spec import merge, volumes
from mobykit.spec.model import FileEntry, ImageEntry, Kernel, Spec, Volume
from mobykit.spec.validate import check_document, safe_file_path
from mobykit.spec.yamlfile import MAX_BYTES, Document, parse

# 2017 Moby names -> LinuxKit names.
SECTION_NAMES = {"onboot": "onboot", "system": "onboot", "services": "services", "daemon": "services",
                 "onshutdown": "onshutdown"}
TRUST_NOTE = "trust: accepted but not enforced (Docker Content Trust is not checked; pin images by digest instead)"


@dataclass(frozen=True)
class SpecSource:
    """One spec document as a request names it: a file (``path``) or text sent inline (``text``).

    Why not just a path: a server must say which request field named a file it refuses to read
    (``field``), and an inline spec has no directory of its own, so its relative ``source:`` and
    ``@pkg:`` entries are taken from ``base`` (the server's first allowed root), not from wherever
    the text happens to be kept. ``name`` is what error messages call the document."""

    name: str
    path: Path | None = None
    text: str | None = None
    base: Path | None = None
    field: str = "spec"

    @classmethod
    def of(cls, spec: str | Path | SpecSource) -> SpecSource:
        if isinstance(spec, SpecSource):
            return spec
        return cls(name=str(spec), path=Path(spec))

    def directory(self) -> Path:
        """Where relative paths written in this document are taken from."""
        if self.base is not None:
            return self.base
        if self.path is not None and str(self.path) != "-":
            return self.path.parent
        return paths.current().base()


def read_document(path: str | Path | SpecSource) -> tuple[Document, Path]:
    """Read and parse one file; ``-`` is standard input. Returns the document and the directory
    relative sources are resolved against. The file is opened through the server's path policy
    (``mobykit.core.paths``); an inline source is parsed from its text."""
    src = SpecSource.of(path)
    shown = src.name
    if src.text is not None:
        data = src.text.encode()
    elif shown == "-" and src.path is not None and str(src.path) == "-":
        data = sys.stdin.buffer.read(MAX_BYTES + 1)
    else:
        assert src.path is not None
        try:
            with paths.open_file(src.path, src.field) as fh:
                data = fh.read(MAX_BYTES + 1)
        except IsADirectoryError:
            raise SpecError("is a directory, not a spec file", file=shown) from None
        except OSError as e:
            raise SpecError(f"cannot read: {e.strerror}", file=shown) from None
    base = src.directory() if str(src.path) != "-" else Path.cwd()
    if len(data) > MAX_BYTES:
        raise SpecError(f"file is larger than {MAX_BYTES} bytes; a spec is a few KiB", file=shown)
    return parse(data, shown), base


def spec_from_document(doc: Document, base: Path) -> Spec:
    """A checked document -> model objects carrying their file, line and field."""
    data = doc.data
    spec = Spec(sources=[doc.file])
    if "kernel" in data:
        k = data["kernel"]
        spec.kernel = Kernel(image=k.get("image") or None, cmdline=k.get("cmdline"), binary=k.get("binary"),
                             tar=k.get("tar"), ucode=k.get("ucode"), file=doc.file, line=doc.line(("kernel",)))
    init = data.get("init", [])
    spec.init = list(init) if isinstance(init, list) else [init]
    for section, kind in SECTION_NAMES.items():
        for i, raw in enumerate(data.get(section, [])):
            path = (section, i)
            getattr(spec, kind).append(ImageEntry(
                name=raw["name"], image=raw["image"],
                config={k: v for k, v in raw.items() if k not in ("name", "image")},
                kind=kind, index=i, file=doc.file, line=doc.line(path), field=f"{section}[{i}]",
                lines={**{k: doc.lines[path + (k,)] for k in raw if path + (k,) in doc.lines},
                       **_item_lines(doc, path, raw)},
            ))
    for i, raw in enumerate(data.get("volumes", [])):
        spec.volumes.append(Volume(
            name=raw["name"], image=raw.get("image"), readonly=bool(raw.get("readonly", False)),
            format=raw.get("format"), platforms=list(raw["platforms"]) if "platforms" in raw else None,
            persistent=bool(raw.get("persistent", False)),
            file=doc.file, line=doc.line(("volumes", i)), field=f"volumes[{i}]",
        ))
    for i, raw in enumerate(data.get("files", [])):
        spec.files.append(_file_entry(doc, base, i, raw))
    if "trust" in data:
        spec.trust = {k: list(v) for k, v in data["trust"].items() if v}
        spec.notes.append(TRUST_NOTE)
    for o in data.get("outputs", []):
        if o["format"] not in spec.outputs:
            spec.outputs.append(o["format"])
    return spec


def _item_lines(doc: Document, path: tuple, raw: dict) -> dict[str, int]:
    """Lines of the bind / mount items that may name a volume (``binds[1]``, ``mounts[0].source``),
    so an error found after merging still points at the item."""
    out = {}
    for key in ("binds", "binds.add", "mounts"):
        for i in range(len(raw.get(key) or [])):
            item = path + (key, i)
            if item in doc.lines:
                out[f"{key}[{i}]"] = doc.lines[item]
            if key == "mounts" and item + ("source",) in doc.lines:
                out[f"mounts[{i}].source"] = doc.lines[item + ("source",)]
    return out


def _file_entry(doc: Document, base: Path, i: int, raw: dict) -> FileEntry:
    f = FileEntry(path=safe_file_path(raw["path"]) or raw["path"], file=doc.file, line=doc.line(("files", i)),
                  field=f"files[{i}]")
    f.directory = bool(raw.get("directory", False))
    f.symlink = raw.get("symlink")
    f.contents = raw.get("contents")
    f.metadata = raw.get("metadata")
    f.optional = bool(raw.get("optional", False))
    if "mode" in raw:
        f.mode = int(raw["mode"], 8)
    f.uid_as_written = raw.get("uid")
    f.gid_as_written = raw.get("gid")
    if "source" in raw:
        f.source_as_written = raw["source"]
        src = raw["source"]
        # LinuxKit expands ~/ to the building user's home; relative paths are taken from the spec
        # file's directory so a spec builds the same from any working directory. On a server the
        # path must stay under its allowed roots (checked here, and again when the file is opened).
        if src == "~" or src.startswith("~/"):
            src = os.path.expanduser(src)
        f.source = str(Path(src) if os.path.isabs(src) else base / src)
        paths.resolve(f.source, f"{f.field}.source", file=f.file, line=f.line)
    return f


def _resolve_id(value, idmap: dict[str, int], f: FileEntry, key: str) -> int:
    if value is None or value == "" or value == "root":
        return 0
    if isinstance(value, int):
        return value
    if value.isdigit():
        return int(value)
    if value in idmap:
        return idmap[value]
    raise SpecError(
        f"no container named {value!r}: a {key} name means the id given to the container of that name",
        file=f.file, line=f.line, field=f"{f.field}.{key}",
    )


def finish(spec: Spec) -> Spec:
    """Checks and resolutions that need every file merged."""
    merge.check_unique_services(spec)
    merge.reindex(spec)
    volumes.check_unique(spec)
    volumes.check_references(spec)
    k = spec.kernel
    if k is not None and not k.image:
        raise SpecError("kernel section has no image", file=k.file, line=k.line, field="kernel.image")
    idmap = spec.idmap()
    for f in spec.files:
        f.uid = _resolve_id(f.uid_as_written, idmap, f, "uid")
        f.gid = _resolve_id(f.gid_as_written, idmap, f, "gid")
    return spec


def load(sources: list[str | Path | SpecSource]) -> Spec:
    """Load, validate and merge spec files in order; see the module docstring."""
    if not sources:
        raise SpecError("no spec file given")
    result: Spec | None = None
    for path in sources:
        doc, base = read_document(path)
        check_document(doc)
        one = spec_from_document(doc, base)
        result = one if result is None else merge.append(result, one)
    assert result is not None
    return finish(result)


def loads(text: str, file: str = "<string>", base: Path | None = None) -> Spec:
    """Load one spec from a string (tests, the flavor plugin's inline specs)."""
    doc = parse(text, file)
    check_document(doc)
    return finish(spec_from_document(doc, base or Path.cwd()))
