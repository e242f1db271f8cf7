"""Output formats over the canonical tar, in the shape of LinuxKit's ``moby/output.go``: one
function per format name, registered here by ``@register(name)``, each reading the canonical tar
(or the tree it was written from) and writing its files into the staging directory. Every file is
written under a temporary name (``Staged``) and renamed only when the whole format has succeeded, so
a failed build leaves nothing half-written behind.

The formats themselves live one family per module in ``mobykit.image.formats`` (imported at the
end of this module, so ``FORMATS`` is complete once this module is); shared disk-layout code
(partition tables, FAT and ext4 images, boot loaders, deterministic ids) is in ``mobykit.image.disk``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mobykit.image.pgzip import GZIP_LEVEL, ParallelGzip  # noqa: F401  (re-exported: tests, bench)
from mobykit.image.tree import Tree

FORMATS: dict[str, Callable[[OutputContext], list[Path]]] = {}
IMAGE_ID_PATH = "etc/mobykit/image-id"


@dataclass
class OutputContext:
    name: str
    outdir: Path  # the staging directory the build renames from
    tar_path: Path  # the canonical tar
    image_id: str  # "sha256:<hex>" of the canonical tar
    mtime: int  # the one timestamp of every output
    # The Tree the canonical tar was written from, when the build still holds it: the same entries
    # as the tar, so a format may use a copy of it instead of parsing the tar again.
    tree: Tree | None = None
    size: int | None = None  # --size in bytes, for disk formats (None: the smallest that fits)
    # Scratch space that lives as long as the build (removed with it) and what formats computed
    # there for others (e.g. the kernel, initrd and cmdline every bootable format starts from).
    workdir: Path | None = None
    shared: dict[str, Any] = field(default_factory=dict)

    def canonical_tree(self) -> Tree:
        """A Tree of the canonical tar that the caller may change."""
        from mobykit.image.tree import read_tar

        return self.tree.copy() if self.tree is not None else read_tar(self.tar_path)

    def scratch(self, name: str) -> Path:
        """A fresh directory for one format's intermediate files, removed with the build (or, for
        a context made without a build's ``workdir``, when the context is collected)."""
        import shutil
        import tempfile
        import weakref

        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="mobykit-formats-"))
            weakref.finalize(self, shutil.rmtree, self.workdir, True)
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.workdir))


def register(name: str) -> Callable[[Callable[[OutputContext], list[Path]]], Callable[[OutputContext], list[Path]]]:
    def deco(fn: Callable[[OutputContext], list[Path]]) -> Callable[[OutputContext], list[Path]]:
        FORMATS[name] = fn
        return fn

    return deco


class Staged:
    """Files written under ``.NAME.tmp`` and renamed together by ``commit``; removed on failure.
    As a context manager (``with Staged(dir) as staged: ... return staged.commit()``) it removes
    them when the block raises, so no format repeats that clean-up."""

    def __init__(self, outdir: Path):
        self.outdir = Path(outdir)
        self.files: list[tuple[Path, Path]] = []

    def __enter__(self) -> Staged:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()

    def path(self, name: str) -> Path:
        final = self.outdir / name
        tmp = self.outdir / f".{name}.tmp"
        self.files.append((tmp, final))
        return tmp

    def commit(self) -> list[Path]:
        for tmp, final in self.files:
            os.replace(tmp, final)
        return [final for _, final in self.files]

    def discard(self) -> None:
        for tmp, _ in self.files:
            tmp.unlink(missing_ok=True)


_Staged = Staged  # the old private name

from mobykit.image import formats  # noqa: E402,F401  (registers every format)
