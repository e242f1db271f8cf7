"""The root file system of the formats that boot it from a device (``iso-efi``: the ISO itself;
``kernel+squashfs``: a squashfs image) instead of from the initrd, and the small "root loader"
initrd that mounts it.

``root_tree`` is the tree those formats write: the canonical tree without ``boot/`` (the kernel
and its command line are the boot loader's, as in every LinuxKit format) plus
``etc/mobykit/image-id``, exactly what ``kernel+initrd`` puts in its cpio.

Why a loader initrd at all, where LinuxKit boots these formats with no initrd and ``root=``: its
kernels have the CD-ROM, virtio and file system drivers built in and its init accepts a read-only
root. Ours is Debian's cloud kernel, where ``ata_piix``, ``sr_mod``, ``virtio_blk``, ``isofs`` and
``squashfs`` are modules, and our init (``specs/pkgs/init``) expects the writable root an initramfs
is until it makes it read-only itself (stage 1 bind-mounts ``/`` onto ``/newroot``; ``/etc/resolv.conf``
becomes a link into ``/run``). So the loader - busybox and the kernel modules of the image
itself, plus the script below - loads the drivers, finds the device whose file system carries
this image's id (``root=`` is tried first when the command line has one), puts a tmpfs overlay
over it (files stay on the device; only changes take RAM) and hands over to the image's ``/init``
unchanged: the init cannot tell it from an initramfs boot.
"""

from __future__ import annotations

import struct
from dataclasses import replace
from pathlib import Path

from mobykit.errors import BuildError
from mobykit.image.outputs import IMAGE_ID_PATH, OutputContext
from mobykit.image.tree import Entry, Tree

BUSYBOX = "bin/busybox"
MODULE_DIRS = ("lib/modules", "usr/lib/modules")
# Drivers for every place the root may be: qemu's pc IDE CD-ROM (ata_piix, sr_mod), virtio disks
# and SCSI (virtio_pci, virtio_blk, virtio_scsi, sd_mod), the file systems and the overlay.
# Missing ones (built in, or not in the image's kernel.tar) are skipped.
MODULES = ("virtio_pci", "virtio_blk", "virtio_scsi", "sd_mod", "ata_piix", "sr_mod", "isofs", "squashfs",
           "overlay")
APPLETS = ("sh", "mount", "umount", "mkdir", "cat", "sleep", "modprobe", "switch_root", "poweroff")

LOADER = r"""#!/bin/sh
# mobykit root loader: PID 1 of the small initrd of the formats whose root file system is on a
# device (iso-efi, kernel+squashfs). Finds the device whose file system has this image's id,
# mounts it read-only under a tmpfs overlay and starts the image's own /init on it.
export PATH=/bin
mount -t devtmpfs -o nosuid,noexec,mode=0755 dev /dev
exec </dev/null >/dev/console 2>&1
mount -t proc -o nodev,nosuid,noexec proc /proc
mount -t sysfs -o nodev,nosuid,noexec sysfs /sys
read -r want </etc/mobykit/image-id
root=
for arg in $(cat /proc/cmdline); do
	case "$arg" in root=/dev/*) root=${arg#root=} ;; esac
done
modprobe -qa MODULES 2>/dev/null

# try DEV: mount it on /lower if its file system carries this image's id
try() {
	[ -b "$1" ] || return 1
	for t in squashfs iso9660; do
		mount -t "$t" -o ro "$1" /lower 2>/dev/null || continue
		got=
		[ -f /lower/etc/mobykit/image-id ] && read -r got </lower/etc/mobykit/image-id
		[ "$got" = "$want" ] && return 0
		umount /lower
	done
	return 1
}

found=
i=0
while [ -z "$found" ] && [ $i -lt 300 ]; do
	if [ -n "$root" ] && try "$root"; then
		found=$root
		break
	fi
	for b in /sys/class/block/*; do
		if try "/dev/${b##*/}"; then
			found=/dev/${b##*/}
			break
		fi
	done
	[ -n "$found" ] || sleep 0.1
	i=$((i + 1))
done
if [ -z "$found" ]; then
	echo "mobykit: no device holds the root file system of $want${root:+ (root=$root)}"
	sleep 5
	poweroff -f
fi

mount -t tmpfs -o mode=0755 rw /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work root /newroot || {
	echo "mobykit: cannot mount an overlay over $found"
	sleep 5
	poweroff -f
}
umount /proc /sys
mkdir -p /newroot/dev
mount -o move /dev /newroot/dev
exec switch_root /newroot /init
"""


def root_tree(ctx: OutputContext) -> Tree:
    """The image's root file system: the canonical tree minus ``boot/``, plus its image id."""
    tree = ctx.canonical_tree()
    tree.remove("boot")
    tree.add_bytes(IMAGE_ID_PATH, (ctx.image_id + "\n").encode(), mode=0o444)
    return tree


def _is_static_elf(head: bytes) -> bool:
    """True for an x86-64/any 64-bit little-endian ELF executable without a program interpreter."""
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
        return False
    phoff, = struct.unpack_from("<Q", head, 32)
    phentsize, phnum = struct.unpack_from("<HH", head, 54)
    for i in range(phnum):
        at = phoff + i * phentsize
        if at + 4 > len(head):
            return False  # program headers beyond what we read: cannot tell, refuse
        if struct.unpack_from("<I", head, at)[0] == 3:  # PT_INTERP: dynamically linked
            return False
    return True


def _head(entry: Entry, size: int = 65536) -> bytes:
    data = b""
    for chunk in entry.source.chunks() if entry.source is not None else ():
        data += chunk
        if len(data) >= size:
            break
    return data[:size]


def file_entry(tree: Tree, path: str) -> Entry | None:
    """The regular file at ``path``, through a hard link (its content may sit on another path)."""
    entry = tree.get(path)
    if entry is not None and entry.type == "hardlink":
        entry = tree.get(entry.linkname)
    return entry if entry is not None and entry.type == "file" else None


def loader_tree(root: Tree, image_id: str) -> Tree:
    """The loader initrd's tree: the image's static busybox and kernel modules, the script as
    ``/init``, the image id to look for, and the empty mount points."""
    busybox = file_entry(root, BUSYBOX)
    if busybox is None or not _is_static_elf(_head(busybox)):
        raise BuildError(
            f"/{BUSYBOX}: the root loader of this format runs the image's busybox before any library is "
            "mounted, so the image needs a statically linked /bin/busybox (mobykit's init package has one)")
    out = Tree()
    for d in ("dev", "proc", "sys", "lower", "rw", "newroot", "etc/mobykit"):
        out.add_dir(d)
    out.add(Entry(path="dev/console", type="char", mode=0o600, devmajor=5, devminor=1))
    out.add(replace(busybox, path=BUSYBOX, mode=0o755, uid=0, gid=0))
    for applet in APPLETS:
        out.add_symlink(f"bin/{applet}", "busybox")
    for entry in root:
        if not any(entry.path == d or entry.path.startswith(d + "/") for d in MODULE_DIRS):
            continue
        if entry.type == "hardlink":  # the group's holder may not be a module: store a copy
            holder = file_entry(root, entry.path)
            if holder is None:
                continue
            entry = replace(holder, path=entry.path)
        out.add(entry)
    lib = root.get("lib")
    if lib is not None and lib.type == "symlink":  # merged /usr: keep the path modprobe uses
        out.add(lib)
    out.add_bytes("init", LOADER.replace("MODULES", " ".join(MODULES)).encode(), mode=0o755)
    out.add_bytes(IMAGE_ID_PATH, (image_id + "\n").encode(), mode=0o444)
    return out


def loader_initrd(ctx: OutputContext) -> Path:
    """The gzip'd newc loader initrd of this build, made once however many formats need it."""
    if "root-loader" in ctx.shared:
        return ctx.shared["root-loader"]
    from mobykit.image.formats.initrd import write_cpio

    path = ctx.scratch("root-loader") / "loader.img"
    tree = loader_tree(root_tree(ctx), ctx.image_id)
    with open(path, "wb") as out:
        write_cpio(tree, out, ctx.mtime)  # gzip: the small loader, for any kernel
    ctx.shared["root-loader"] = path
    return path
