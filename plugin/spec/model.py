"""The validated spec as dataclasses: what the build pipeline consumes.

Every entry remembers the file, line and field it came from, so errors found later (an image
label that does not parse, a uid name that does not resolve, a missing source file) can still
point at the line the user wrote.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from dataclasses import field as _field
from typing import Any

KINDS = ("onboot", "services", "onshutdown")


@dataclass
class Kernel:
    """``kernel:``. ``binary`` defaults to ``kernel``; ``tar`` to ``kernel.tar`` ("" or "none": no
    modules tarball); ``ucode`` is unset unless given. Unset fields are None so a later spec file
    overrides only what it sets (LinuxKit's AppendConfig)."""

    image: str | None = None
    cmdline: str | None = None
    binary: str | None = None
    tar: str | None = None
    ucode: str | None = None
    file: str | None = None
    line: int | None = None

    @property
    def binary_name(self) -> str:
        return self.binary or "kernel"

    @property
    def tar_name(self) -> str | None:
        if self.tar is None:
            return "kernel.tar"
        return None if self.tar in ("", "none") else self.tar


@dataclass
class ImageEntry:
    """One onboot / services / onshutdown container.

    ``config`` holds every other field exactly as written (LinuxKit's names, e.g.
    ``capabilities.add``); a field that is absent is absent, which is how "not set, fall back to
    the image label" is told apart from "set to empty".
    """

    name: str
    image: str
    config: dict[str, Any] = _field(default_factory=dict)
    kind: str = "services"
    index: int = 0
    file: str | None = None
    line: int | None = None
    field: str | None = None  # e.g. "services[1]" in its own file
    lines: dict[str, int] = _field(default_factory=dict)  # config key -> line

    @property
    def prefix(self) -> str:
        """Where LinuxKit puts the bundle: services by name, onboot/onshutdown numbered in order."""
        if self.kind == "services":
            return f"containers/services/{self.name}"
        return f"containers/{self.kind}/{self.index:03d}-{self.name}"

    def where(self, key: str | None = None) -> tuple[str | None, int | None, str | None]:
        """(file, line, field) of this entry or one of its config keys, for SpecError."""
        if key is None:
            return self.file, self.line, self.field
        return self.file, self.lines.get(key, self.line), f"{self.field}.{key}" if self.field else key

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "image": self.image, **copy.deepcopy(self.config)}


@dataclass
class FileEntry:
    """One ``files:`` entry. ``path`` has no leading ``/``; ``source`` is resolved (``~`` expanded,
    relative to the spec file's directory) while ``source_as_written`` keeps the text; ``mode`` is
    the parsed octal mode or None for LinuxKit's default (0600 files, 0700 directories, 0777
    symlinks); ``uid``/``gid`` are numbers, names already resolved (LinuxKit: a name is the id
    allocated to the container of that name, ``root`` is 0)."""

    path: str
    directory: bool = False
    symlink: str | None = None
    contents: str | None = None
    source: str | None = None
    source_as_written: str | None = None
    metadata: str | None = None
    optional: bool = False
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    uid_as_written: int | str | None = None
    gid_as_written: int | str | None = None
    file: str | None = None
    line: int | None = None
    field: str | None = None

    @property
    def default_mode(self) -> int:
        if self.directory:
            return 0o700
        if self.symlink is not None:
            return 0o777
        return 0o600

    @property
    def effective_mode(self) -> int:
        return self.mode if self.mode is not None else self.default_mode

    @property
    def parent_dir_mode(self) -> int:
        """Mode LinuxKit gives leading directories it creates for this entry (owned by the same
        uid/gid): the entry's mode with the search bit added wherever a class has any access."""
        m = self.effective_mode
        for access, search in ((0o700, 0o100), (0o070, 0o010), (0o007, 0o001)):
            if m & access:
                m |= search
        return m

    def to_dict(self) -> dict[str, Any]:
        """As LinuxKit would write it back (metadata output and canonical form)."""
        d: dict[str, Any] = {"path": self.path}
        if self.directory:
            d["directory"] = True
        for key in ("symlink", "contents", "metadata"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if self.source_as_written is not None:
            d["source"] = self.source_as_written
        if self.optional:
            d["optional"] = True
        if self.mode is not None:
            d["mode"] = f"{self.mode:04o}"
        if self.uid_as_written is not None:
            d["uid"] = self.uid_as_written
        if self.gid_as_written is not None:
            d["gid"] = self.gid_as_written
        return d


VOLUME_BASE = "containers/volumes"


@dataclass
class Volume:
    """One ``volumes:`` entry (LinuxKit's build-time named volume). ``image`` unset: a blank
    directory; set: the image's root filesystem (``format`` unset or ``filesystem``) or the image
    as an OCI image layout (``format: oci``, for ``platforms``, default the build's). ``readonly``
    volumes may only be mounted ``ro``. ``persistent``: a blank volume the guest backs with the
    provider's disk of the same name (marker file ``persistent`` instead of ``tmp/``).
    Containers name it as the source of a bind."""

    name: str
    image: str | None = None
    readonly: bool = False
    format: str | None = None
    platforms: list[str] | None = None
    persistent: bool = False
    file: str | None = None
    line: int | None = None
    field: str | None = None

    @property
    def is_oci(self) -> bool:
        return self.format == "oci"

    @property
    def dir(self) -> str:
        """Where the build lays the volume out (no leading ``/``): ``lower/`` holds the content,
        ``merged/`` is what containers bind (the init mounts ``lower`` there: read-only bind, or
        an overlay with its upper layer on a tmpfs at ``tmp/``, which only writable volumes have)."""
        return f"{VOLUME_BASE}/{self.name}"

    @property
    def merged(self) -> str:
        """The absolute path a bind of this volume is rewritten to."""
        return f"/{self.dir}/merged"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name}
        if self.image is not None:
            d["image"] = self.image
        if self.readonly:
            d["readonly"] = True
        if self.format is not None:
            d["format"] = self.format
        if self.platforms is not None:
            d["platforms"] = list(self.platforms)
        if self.persistent:  # absent when false, so specs without it keep their canonical form
            d["persistent"] = True
        return d


@dataclass
class Spec:
    """A whole (merged) spec. ``trust`` is accepted and kept but not enforced (Docker Content Trust
    has no equivalent here; the build says so). ``outputs`` are the 2017 ``outputs: [{format}]``
    formats, used when the command line names none."""

    kernel: Kernel | None = None
    init: list[str] = _field(default_factory=list)
    onboot: list[ImageEntry] = _field(default_factory=list)
    services: list[ImageEntry] = _field(default_factory=list)
    onshutdown: list[ImageEntry] = _field(default_factory=list)
    files: list[FileEntry] = _field(default_factory=list)
    volumes: list[Volume] = _field(default_factory=list)
    trust: dict[str, list[str]] = _field(default_factory=dict)
    outputs: list[str] = _field(default_factory=list)
    sources: list[str] = _field(default_factory=list)  # spec files, in merge order
    notes: list[str] = _field(default_factory=list)  # things accepted but ignored, for the CLI to print

    def entries(self) -> list[ImageEntry]:
        """Every container entry in LinuxKit's order: onboot, onshutdown, services."""
        return [*self.onboot, *self.onshutdown, *self.services]

    def refs(self) -> list[str]:
        """Every image reference to resolve, in order (kernel, init, volumes, onboot, services,
        onshutdown), each once, as written."""
        out: list[str] = []
        if self.kernel is not None and self.kernel.image:
            out.append(self.kernel.image)
        out.extend(self.init)
        out.extend(v.image for v in self.volumes if v.image)
        for kind in KINDS:
            out.extend(e.image for e in getattr(self, kind))
        seen: set[str] = set()
        return [r for r in out if not (r in seen or seen.add(r))]

    def volume(self, name: str) -> Volume | None:
        return next((v for v in self.volumes if v.name == name), None)

    def idmap(self) -> dict[str, int]:
        """LinuxKit gives each container its own id (from 100: onboot, onshutdown, services) that a
        ``uid``/``gid`` name refers to."""
        return {e.name: 100 + i for i, e in enumerate(self.entries())}

    def canonical(self) -> dict[str, Any]:
        """Stable, JSON-able meaning of the spec, for hashing the build inputs and for
        ``metadata: yaml|json`` files. Independent of YAML formatting, key order and of the 2017
        names (``system``/``daemon`` appear as ``onboot``/``services``); image references are
        normalised (``alpine`` == ``docker.io/library/alpine:latest``)."""
        from mobykit.spec.refs import normalise

        doc: dict[str, Any] = {}
        if self.kernel is not None:
            k = {key: getattr(self.kernel, key) for key in ("image", "cmdline", "binary", "tar", "ucode")}
            if k["image"]:
                k["image"] = normalise(k["image"])
            doc["kernel"] = {key: v for key, v in k.items() if v is not None}
        doc["init"] = [normalise(r) for r in self.init]
        for kind in KINDS:
            doc[kind] = [_canonical_entry(e, normalise) for e in getattr(self, kind)]
        doc["files"] = [f.to_dict() for f in self.files]
        if self.volumes:  # absent when empty, so specs without volumes keep their input keys
            doc["volumes"] = [{**v.to_dict(), **({"image": normalise(v.image)} if v.image else {})}
                              for v in self.volumes]
        if self.trust:
            doc["trust"] = {k: list(v) for k, v in sorted(self.trust.items())}
        return doc


def _canonical_entry(e: ImageEntry, normalise) -> dict[str, Any]:
    d = e.to_dict()
    d["image"] = normalise(e.image)
    return d
