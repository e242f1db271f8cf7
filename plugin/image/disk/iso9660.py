"""ISO 9660 images with Rock Ridge, written by xorriso from a staging directory, byte-reproducible.

Why a staging directory and commands: xorriso reads files only from disk, and a directory written
by an unprivileged builder carries the builder's owner and whatever modes it could give. So the
staging copy is written with owner-readable modes, and the image gets the tree's real metadata by
xorriso commands (``-chown``, ``-chgrp``, ``-chmod``), read from a file so a tree of any size fits.
Every name is quoted with xorriso's backslash codes, and patterns are off, so no file name is
read as a pattern or breaks a command.

What Rock Ridge as Linux mounts it cannot carry, and so is left out of an ISO's tree: extended
attributes (xorriso's AAIP is ignored by the kernel's isofs) and device nodes (xorriso can only
copy them from the builder's disk, which takes privilege, so a root and a user build would
differ). Neither matters to a booted image: ``/dev`` is a devtmpfs mounted by the init, and runc
gives every container its own ``/dev``.

Hard links: each path is a node of its own with the tree's metadata, and xorriso stores the
content once for all of them (the staging copy has them as hard links). Recording them as Rock
Ridge hard links (``-hardlinks on``) would also record the staging copy's inode numbers, which
differ from build to build.

Reproducibility: the volume dates, the volume "uuid" (a date, by definition) and every file date
are the build's timestamp (``SOURCE_DATE_EPOCH``, set by ``tools.run``, covers the rest); the volume id and the GPT disk GUID
(EFI ISOs) come from the image id; the image's own files are written in a fixed order.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from mobykit.image.disk import tools
from mobykit.image.tree import Entry, FileCache

STAGED_FILE_MODE = 0o644
STAGED_DIR_MODE = 0o755
FIRST_WEIGHT = 1 << 29  # xorriso writes higher sort weights first; its boot catalog has 10**9


def volume_id(prefix: str, image_id: str) -> str:
    """An ISO volume id (at most 32 d-characters) naming the image: ``PREFIX_<first hex digits>``."""
    from mobykit.image.disk.ids import short_hex

    return f"{prefix}_{short_hex(image_id, 32)}"[:32].upper()


def quote(path: str) -> str:
    """``path`` as one quoted xorriso word (``-backslash_codes in_double_quotes``): anything but
    plain printable ASCII, and the quote and backslash themselves, as ``\\xHH`` codes."""
    raw = path.encode("utf-8", "surrogateescape")
    return '"' + "".join(chr(b) if 0x20 <= b < 0x7F and b not in (0x22, 0x5C) else f"\\x{b:02x}" for b in raw) + '"'


class Staging:
    """A directory xorriso maps into the image at ``/``, and the commands that give its entries
    the tree's owners and modes."""

    def __init__(self, root: Path):
        self.root = root
        self.commands: list[str] = []
        self.left_out: list[str] = []  # device nodes (see the module docstring)
        self.files = 0
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, STAGED_DIR_MODE)  # not the builder's umask

    def add_entries(self, entries: Iterable[Entry], prefix: str = "") -> None:
        """Write ``entries`` (canonical order) under ``prefix`` and record their metadata."""
        files = FileCache()
        dirs: list[Path] = []
        kinds: dict[str, str] = {}  # staged path -> entry type, for the hard links to it
        try:
            for entry in entries:
                iso_path = "/" + "/".join(p for p in (prefix.strip("/"), entry.path) if p)
                target = self.root / iso_path.lstrip("/")
                if entry.type == "dir":
                    target.mkdir(mode=STAGED_DIR_MODE, exist_ok=True)
                    dirs.append(target)
                elif entry.type == "file":
                    with open(target, "wb") as out:
                        for chunk in entry.source.chunks(files) if entry.source is not None else ():
                            out.write(chunk)
                    os.chmod(target, STAGED_FILE_MODE)
                elif entry.type == "hardlink":
                    # Each path is its own node in the image (xorriso stores the shared content once)
                    # and gets the metadata the link entry carries, which is its holder's.
                    link_to = "/".join(p for p in (prefix.strip("/"), entry.linkname) if p)
                    kind = kinds.get(link_to, "file")
                    if kind == "left out":
                        self.left_out.append(iso_path)
                        continue
                    os.link(self.root / link_to, target, follow_symlinks=False)
                    if kind == "symlink":
                        continue
                elif entry.type == "symlink":
                    os.symlink(entry.linkname, target)
                elif entry.type == "fifo":
                    os.mkfifo(target)
                    os.chmod(target, STAGED_FILE_MODE)
                else:
                    self.left_out.append(iso_path)
                    kinds[iso_path.lstrip("/")] = "left out"
                    continue
                kinds.setdefault(iso_path.lstrip("/"), entry.type)
                self._metadata(iso_path, entry)
        finally:
            files.close()
        for d in dirs:  # the directory's own mode is set by command; keep it writable here
            os.chmod(d, STAGED_DIR_MODE)

    def _parents(self, iso_path: str) -> Path:
        """The staging path of ``iso_path``, its missing parents made 0755 (root-owned in the image)."""
        target = self.root / iso_path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        for parent in target.relative_to(self.root).parents:
            if parent != Path("."):
                os.chmod(self.root / parent, STAGED_DIR_MODE)
        return target

    def add_file(self, iso_path: str, source: Path, mode: int = 0o444) -> None:
        """A root-owned file of the boot loader (kernel, initrd, configs) at ``iso_path``."""
        target = self._parents(iso_path)
        target.unlink(missing_ok=True)
        try:
            target.hardlink_to(source)
        except OSError:
            shutil.copyfile(source, target)
        self.commands.append(f"-chmod 0{mode:o} {quote(iso_path)}")
        self._order(iso_path)

    def add_bytes(self, iso_path: str, data: bytes, mode: int = 0o444) -> None:
        target = self._parents(iso_path)
        target.write_bytes(data)
        self.commands.append(f"-chmod 0{mode:o} {quote(iso_path)}")
        self._order(iso_path)

    def _order(self, iso_path: str) -> None:
        """Write file contents in the order they were staged: by default libisofs orders them by
        the staging copy's inode numbers, which differ from build to build."""
        self.files += 1
        self.commands.append(f"-find {quote(iso_path)} -exec sort_weight {FIRST_WEIGHT - self.files} --")

    def _metadata(self, iso_path: str, entry: Entry) -> None:
        q = quote(iso_path)
        if entry.type in ("file", "hardlink"):
            self._order(iso_path)
        if entry.uid:
            self.commands.append(f"-chown {entry.uid} {q}")
        if entry.gid:
            self.commands.append(f"-chgrp {entry.gid} {q}")
        staged = STAGED_DIR_MODE if entry.type == "dir" else STAGED_FILE_MODE
        if entry.type != "symlink" and entry.mode & 0o7777 != staged:
            self.commands.append(f"-chmod 0{entry.mode & 0o7777:o} {q}")  # octal needs its leading 0


def write_iso(out: Path, staging: Staging, *, volid: str, mtime: int, mkisofs: Sequence[str],
              native: Sequence[str] = ()) -> Path:
    """Write the ISO at ``out`` from ``staging``: boot options as ``xorriso -as mkisofs`` arguments
    (``mkisofs``), then the ownership and mode commands, then any other native commands."""
    # xorriso reads a time of 0 as "unset" and stamps the time of day instead, so the default
    # build time (1970-01-01 00:00:00) becomes one second later in an ISO.
    when = max(mtime, 1)
    uuid = time.strftime("%Y%m%d%H%M%S00", time.gmtime(when))  # the volume "uuid": its dates, to 1/100 s
    commands = staging.root.parent / f".{out.name}.xorriso"
    # Everything root-owned first (the staging copy belongs to whoever builds), then the tree's own.
    commands.write_text("\n".join(["-chown_r 0 /", "-chgrp_r 0 /", *staging.commands, ""]))
    try:
        out.unlink(missing_ok=True)
        tools.run(["xorriso", "-no_rc", "-report_about", "SORRY", "-abort_on", "FAILURE",
                   "-iso_rr_pattern", "off", "-disk_pattern", "off", "-backslash_codes", "in_double_quotes",
                   "-hardlinks", "off", "-acl", "off", "-xattr", "off",
                   "-as", "mkisofs", "-o", str(out.resolve()), "-V", volid, "-R", "-l", *mkisofs, ".", "--",
                   "-options_from_file", str(commands.resolve()), *native,
                   "-volume_date", "uuid", uuid, "-volume_date", "all_file_dates", f"={when}"],
                  mtime=when, cwd=staging.root)  # relative paths (-hide, -e, -b) mean the same in every build
    finally:
        commands.unlink(missing_ok=True)
    return out
