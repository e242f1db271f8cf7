"""Running the Debian tools disk formats are made with, as plain subprocesses.

Why a wrapper: a missing tool must say which Debian package to install (MissingTool, exit 2), a
failing one must say what it printed (BuildError), and every run gets the same environment: the
build's ``SOURCE_DATE_EPOCH`` (mtools, xorriso, mksquashfs honour it), ``E2FSPROGS_FAKE_TIME``
(mke2fs), ``TZ=UTC`` and ``LC_ALL=C``, so their outputs are byte-reproducible.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from mobykit.errors import BuildError, MissingTool

# Program -> the Debian package that has it (Debian 12).
PACKAGES = {
    "xorriso": "xorriso",
    "mkfs.fat": "dosfstools",
    "mcopy": "mtools",
    "mmd": "mtools",
    "syslinux": "syslinux",
    "sfdisk": "fdisk",
    "mke2fs": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "mksquashfs": "squashfs-tools",
    "qemu-img": "qemu-utils",
    "grub-mkimage": "grub-common",
}
# Data files -> the Debian package that installs them.
FILES = {
    "/usr/lib/ISOLINUX/isolinux.bin": "isolinux",
    "/usr/lib/ISOLINUX/isohdpfx.bin": "isolinux",
    "/usr/lib/syslinux/modules/bios/ldlinux.c32": "syslinux-common",
    "/usr/lib/syslinux/mbr/mbr.bin": "syslinux-common",
    "/usr/lib/syslinux/mbr/gptmbr.bin": "syslinux-common",
    "/usr/lib/grub/x86_64-efi": "grub-efi-amd64-bin",
    "/usr/lib/grub/i386-pc": "grub-pc-bin",
    "/usr/share/OVMF/OVMF_CODE.fd": "ovmf",
    "/usr/lib/syslinux/": "syslinux-common",  # the rest of syslinux's data (MBR variants, modules)
}


def need(program: str) -> str:
    """The path of ``program``, or MissingTool naming its Debian package."""
    found = shutil.which(program) or next(
        (p for p in (f"/usr/sbin/{program}", f"/sbin/{program}") if os.access(p, os.X_OK)), None)
    if found is None:
        package = PACKAGES.get(program, program)
        raise MissingTool(f"{program} is not installed (Debian package {package}: apt-get install {package})")
    return found


def need_file(path: str) -> Path:
    """A data file a format copies (boot sectors, loader modules, firmware), or MissingTool."""
    p = Path(path)
    if not p.exists():
        package = next((pkg for prefix, pkg in FILES.items() if path.startswith(prefix)), None)
        hint = f" (Debian package {package}: apt-get install {package})" if package else ""
        raise MissingTool(f"{path} is not installed{hint}")
    return p


def env(mtime: int) -> dict[str, str]:
    return {**os.environ, "SOURCE_DATE_EPOCH": str(mtime), "E2FSPROGS_FAKE_TIME": str(mtime),
            "TZ": "UTC", "LC_ALL": "C", "MTOOLS_SKIP_CHECK": "1"}


def run(argv: Sequence[str | Path], *, mtime: int = 0, input: bytes | None = None,
        cwd: Path | None = None) -> str:
    """Run a tool (its name resolved with ``need``); BuildError with its output when it fails."""
    args = [str(a) for a in argv]
    args[0] = need(args[0])
    try:
        r = subprocess.run(args, input=input, capture_output=True, env=env(mtime), cwd=cwd, check=False,
                           stdin=None if input is not None else subprocess.DEVNULL)
    except OSError as e:
        raise BuildError(f"{argv[0]}: cannot run: {e.strerror}") from None
    if r.returncode != 0:
        out = (r.stderr or r.stdout).decode(errors="replace").strip()[-2000:]
        raise BuildError(f"{argv[0]} failed (exit status {r.returncode}): {out}")
    return r.stdout.decode(errors="replace")
