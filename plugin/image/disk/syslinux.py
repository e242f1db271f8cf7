"""SYSLINUX as the BIOS boot loader of FAT partitions (Debian's syslinux and syslinux-common).

How: ``syslinux --install`` on the FAT partition image (before it is placed on the disk) writes
its boot sector and ``ldlinux.sys``/``ldlinux.c32`` through mtools, and ``mbr.bin`` in the disk's
first 440 bytes boots the active partition. Reproducible: the installer copies its files with
mtools, which stamps them from ``SOURCE_DATE_EPOCH`` (``tools.run`` sets it); without it the two
directory entries carry the time of the build (these are the bytes that differed between builds
when it was first tried). Nothing else it writes depends on time or chance.
"""

from __future__ import annotations

from pathlib import Path

from mobykit.image.disk import fat, tools

MBR_BIN = "/usr/lib/syslinux/mbr/mbr.bin"
MBR_CODE = 440  # mbr.bin is exactly the boot code part of sector 0


def config(cmdline: str, *, kernel: str = "/kernel", initrd: str = "/initrd.img") -> str:
    """``syslinux.cfg``: no menu, no wait, serial port 0 at 115200 (SERIAL must come first) as well
    as the screen, and the spec's command line on APPEND unchanged (syslinux passes the rest of
    the line as it is; a configuration line cannot hold a newline, and the kernel reads either as
    a separator)."""
    lines = ["SERIAL 0 115200", "PROMPT 0", "TIMEOUT 0", "DEFAULT linux", "", "LABEL linux",
             f"  LINUX {kernel}", f"  INITRD {initrd}"]
    args = " ".join(cmdline.split("\n")).strip()
    if args:
        lines.append(f"  APPEND {args}")
    return "\n".join(lines) + "\n"


def install(partition_image: Path, *, mtime: int) -> None:
    """Make the FAT file system in ``partition_image`` bootable by syslinux."""
    # The installer carries ldlinux.sys and ldlinux.c32 itself and copies them with mtools, which
    # stamps them from SOURCE_DATE_EPOCH: clamped to what FAT can store, as fat.make_image does.
    tools.run(["syslinux", "--install", str(partition_image)], mtime=max(mtime, fat.FAT_EPOCH))


def mbr_code() -> bytes:
    """syslinux's MBR boot code: loads the active partition's boot sector."""
    code = tools.need_file(MBR_BIN).read_bytes()
    if len(code) > MBR_CODE:
        raise ValueError(f"{MBR_BIN} is {len(code)} bytes, more than the {MBR_CODE} bytes of MBR boot code")
    return code
