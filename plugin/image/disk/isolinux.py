"""ISOLINUX, the BIOS boot loader of ``iso-bios``, from Debian's isolinux and syslinux-common.

Why ISOLINUX: it is what LinuxKit's iso-bios uses, it needs two files and a four-line config, and
with xorriso's hybrid MBR (``isohdpfx.bin``) the same ISO also boots when written to a disk.
"""

from __future__ import annotations

from pathlib import Path

from mobykit.errors import BuildError
from mobykit.image.disk import tools

ISOLINUX_BIN = "/usr/lib/ISOLINUX/isolinux.bin"
HYBRID_MBR = "/usr/lib/ISOLINUX/isohdpfx.bin"
LDLINUX = "/usr/lib/syslinux/modules/bios/ldlinux.c32"


def files() -> dict[str, Path]:
    """The loader's files by their name in the ISO's ``/isolinux`` (MissingTool naming the package)."""
    return {"isolinux.bin": tools.need_file(ISOLINUX_BIN), "ldlinux.c32": tools.need_file(LDLINUX)}


def hybrid_mbr() -> Path:
    return tools.need_file(HYBRID_MBR)


def config(cmdline: str, *, kernel: str = "/boot/kernel", initrd: str = "/boot/initrd.img") -> str:
    """``isolinux.cfg``: serial console and screen, no prompt, boot ``kernel`` + ``initrd`` with the
    spec's command line exactly (APPEND takes the rest of its line literally)."""
    if any(ord(c) < 0x20 for c in cmdline):
        raise BuildError(f"kernel command line {cmdline!r}: a control character cannot be put in an isolinux config")
    return "\n".join([
        "SERIAL 0 115200",
        "DEFAULT linux",
        "PROMPT 0",
        "LABEL linux",
        f"  KERNEL {kernel}",
        f"  INITRD {initrd}",
        f"  APPEND {cmdline}".rstrip(),
        "",
    ])
