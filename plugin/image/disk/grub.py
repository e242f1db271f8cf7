"""GRUB as the EFI loader (``BOOTX64.EFI``) of EFI disks and ISOs, from Debian's grub-efi-amd64-bin.

Why GRUB and one standalone image: ``grub-mkimage`` writes a single EFI binary with its modules
and an embedded config, so the EFI partition needs nothing else, and its output depends only on
its inputs (byte-reproducible). The embedded config finds the partition or ISO holding the kernel
by a marker file and boots it with the spec's command line unchanged.
"""

from __future__ import annotations

from pathlib import Path

from mobykit.image.disk import tools

MODULES = ("part_gpt", "part_msdos", "fat", "iso9660", "ext2", "linux", "search", "search_fs_file",
           "normal", "echo", "test", "configfile", "gzio", "all_video", "serial", "terminal")


def config(cmdline: str, *, marker: str, kernel: str = "/boot/kernel", initrd: str = "/boot/initrd.img",
           root_arg: str = "") -> str:
    """The embedded grub config: serial console, no menu, boot ``kernel`` with ``cmdline``."""
    args = " ".join(a for a in (cmdline.strip(), root_arg) if a)
    # One single-quoted word: GRUB would otherwise expand $, split on ; and strip the quotes the
    # kernel itself parses (foo="a b"); `linux` joins its words with spaces, so the kernel gets the
    # spec's command line exactly.
    quoted = "'" + args.replace("'", "'\\''") + "'" if args else ""
    return "\n".join([
        "serial --unit=0 --speed=115200",
        "terminal_input console serial",
        "terminal_output console serial",
        f"search --no-floppy --file --set=root {marker}",
        f"linux {kernel} {quoted}".rstrip(),
        f"initrd {initrd}",
        "boot",
        "",
    ])


def efi_loader(out: Path, cfg: str, *, mtime: int = 0) -> Path:
    """Write ``BOOTX64.EFI`` with ``cfg`` embedded to ``out``."""
    tools.need_file("/usr/lib/grub/x86_64-efi/linux.mod")
    cfg_file = out.with_name(out.name + ".cfg")
    cfg_file.write_text(cfg)
    try:
        tools.run(["grub-mkimage", "-O", "x86_64-efi", "-o", str(out), "-p", "/EFI/BOOT", "-c", str(cfg_file),
                   *MODULES], mtime=mtime)
    finally:
        cfg_file.unlink(missing_ok=True)
    return out
